"""The ``qemu`` sandbox: the pod VM of ``coco podvm build`` under QEMU with a vTPM.

:class:`coco.host.podvm.boot.PodVm` boots it (KVM where it works, TCG otherwise) with the initdata
as its config drive; the guest's init binds the initdata digest into PCR 8 and starts the agent on
the virtio-serial port, which the host reaches at the VM's ``agent.sock``. With ``tpm_state`` every VM's vTPM is a copy of that node vTPM state, so its
attestation key is the one the owner enrolled (:mod:`coco.host.podvm.vtpm`). QEMU and swtpm die with
the shim (``PR_SET_PDEATHSIG``), so a killed shim leaves no VM behind.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from coco.errors import PodVmError
from coco.host.podvm.boot import PodVm
from coco.host.runtime import SandboxError
from coco.host.runtime.sandbox import Sandbox, start_time

log = logging.getLogger(__name__)


class QemuSandbox(Sandbox):
    kind = "qemu"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.vm: PodVm | None = None

    def start(self, initdata: bytes | None, annotations: dict[str, str]) -> str:
        cfg = self.config.sandbox
        image = cfg.get("image")
        if not image:
            raise SandboxError(
                f"runtime config {self.config.path}: [hypervisor.qemu] image: expected the pod "
                "VM image directory (coco podvm build -o DIR)"
            )
        try:
            self.vm = PodVm(
                Path(image),
                initdata=initdata,
                memory=int(cfg.get("default_memory", 1024)),
                cpus=int(cfg.get("default_vcpus", 1)),
                accel=cfg.get("accel", "auto"),
                run_dir=self.state_dir / "vm",
                kernel_args=cfg.get("kernel_params", "").split(),
                tpm_state=Path(cfg["tpm_state"]) if cfg.get("tpm_state") else None,
            )
            self.vm.start()
            self.pid = self.vm.qemu.pid if self.vm.qemu else self.pid
            self.save_state(pids=[[p, start_time(p)] for p in self.vm.pids])
            self.vm.wait_ready(float(cfg.get("boot_timeout", 300)))
        except PodVmError as e:
            self.stop()
            raise SandboxError(f"qemu sandbox {self.sid}: {e}") from None
        except BaseException:
            self.stop()
            raise
        return f"unix://{self.vm.agent_socket}"

    def children(self) -> list[int]:
        return self.vm.pids if self.vm is not None else []

    def status(self) -> str:
        if self.vm is None or self.vm.qemu is None:
            return "stopped"
        code = self.vm.qemu.poll()
        return "running" if code is None else f"failed: qemu exited with status {code}"

    def stop(self) -> None:
        if self.vm is not None:
            self.vm.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)


SANDBOX = QemuSandbox
