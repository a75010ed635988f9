"""``coco pod``: a kubelet stand-in for one pod on one machine, over the CRI.

* :mod:`.cri`: the CRI client (gRPC ``runtime.v1`` RuntimeService and ImageService).
* :mod:`.manifest`: a Pod (or a workload's pod template) read from Kubernetes YAML.
* :mod:`.translate`: that pod as the CRI's PodSandboxConfig and ContainerConfigs, the way the
  kubelet fills them (labels, log paths, namespaces, security context, masked paths).
* :mod:`.logs`: the CRI container log format (``<time> <stream> <P|F> <text>``), read and followed.
* :mod:`.runner`: run a pod to completion (pull, sandbox, init containers, containers, logs,
  clean-up) and the list, logs, exec and delete commands.
"""

from coco.errors import HostError


class PodError(HostError):
    """A pod that could not be read, started, run or cleaned up; the message names the pod."""


class CriError(PodError):
    """The CRI runtime refused a call or could not be reached; carries its gRPC code."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code
