"""The pod VM: the guest a hypervisor boots for a confidential pod.

* :mod:`.build`: ``coco podvm build``: Debian's kernel, a busybox initramfs and a root image with
  Python, this project, runc, cryptsetup and tpm2-tools, cached by content.
* :mod:`.boot`: ``coco podvm boot`` and :class:`PodVm`: QEMU (KVM where it works, else TCG) with a
  vTPM from swtpm, the agent's virtio-serial channel, user networking and the initdata disk.
* :mod:`.guest_init`: the guest's pid 1 (copied into the image, never run on the host).
"""

from coco.host.podvm.boot import PodVm, detect_accel
from coco.host.podvm.build import Image, build

__all__ = ["Image", "PodVm", "build", "detect_accel"]
