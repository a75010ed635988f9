"""The ``qemu`` provider: pod VMs run directly by QEMU, no daemon (machines without libvirt).

Each VM is a :class:`coco.host.podvm.boot.PodVm` (the pod VM image, swtpm vTPM, the initdata
disk the guest's init extends into PCR 8) with QEMU user networking forwarding
``127.0.0.1:<free port>`` to the forwarder's 15150, plus the userdata as a ``cidata`` config drive
(the libvirt provider's, :func:`make_config_drive`) and ``coco.peerpod=1`` on the kernel command
line. Its run directory ``<data-dir>/<name>`` holds ``instance.json`` (tags, port, pids), which
:meth:`QemuProvider.list_instances` reads.

The VMs are children of the CAA and die with it (``PR_SET_PDEATHSIG``), so unlike libvirt's they
do not survive a CAA restart: the restarted CAA finds their sandboxes' VMs gone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import threading
from pathlib import Path

from coco.errors import CocoError
from coco.host.peerpods.provider import (
    Instance,
    InstanceTypeSpec,
    Provider,
    ProviderError,
    ProviderFactory,
    Tags,
    guest_last_words,
    instance_name,
)
from coco.host.peerpods.providers.libvirt import FORWARDER_PORT, free_port, make_config_drive
from coco.host.podvm.boot import PodVm

RECORD = "instance.json"


class _PeerPodVm(PodVm):
    """A PodVm with the userdata config drive attached."""

    config_drive: Path

    def qemu_args(self) -> list[str]:
        drive = f"file={self.config_drive},format=raw,if=virtio,readonly=on"
        return [*super().qemu_args(), "-drive", drive]


class QemuProvider(Provider):
    name = "qemu"

    def __init__(
        self,
        image: Path | None,
        data_dir: Path,
        cpu: int = 1,
        memory: int = 2048,
        kernel_args: tuple[str, ...] = (),
        tpm_state: Path | None = None,
    ) -> None:
        self.image = image
        self.kernel_args = kernel_args
        self.tpm_state = tpm_state
        self.data_dir = data_dir
        self.cpu = cpu
        self.memory = memory
        self._vms: dict[str, PodVm] = {}
        self._lock = threading.Lock()

    def config_verifier(self) -> None:
        if self.image is None:
            raise ProviderError("qemu provider: --podvm-image: expected a pod VM image directory")
        from coco.host.podvm.build import Image

        try:
            Image.open(self.image)
        except CocoError as e:
            raise ProviderError(f"qemu provider: {e}") from None

    def create_instance(
        self,
        pod_name: str,
        sandbox_id: str,
        userdata: str,
        spec: InstanceTypeSpec,
        tags: Tags,
        initdata: bytes | None = None,
    ) -> Instance:
        self.config_verifier()
        name = instance_name(pod_name, sandbox_id)
        run_dir = self.data_dir / name
        if run_dir.exists():
            raise ProviderError(f"qemu provider: VM {name} exists already ({run_dir})", name)
        run_dir.mkdir(parents=True)
        try:
            make_config_drive(userdata, name, run_dir / "cidata.iso")
            port = free_port()
            vm = _PeerPodVm(
                Path(spec.image) if spec.image else self.image,
                initdata=initdata,
                memory=spec.memory or self.memory,
                cpus=spec.vcpus or self.cpu,
                forwards=[(port, FORWARDER_PORT)],
                run_dir=run_dir / "vm",
                kernel_args=["coco.peerpod=1", *self.kernel_args],
                tpm_state=self.tpm_state,
            )
            vm.config_drive = run_dir / "cidata.iso"
            vm.start()
        except CocoError as e:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise ProviderError(f"qemu provider: starting VM {name}: {e}") from None
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        record = {"caa": tags.caa, "sandbox": tags.sandbox, "port": port, "pids": vm.pids}
        (run_dir / RECORD).write_text(json.dumps(record))
        with self._lock:
            self._vms[name] = vm
        return Instance(name, name, ("127.0.0.1",), tags, port)

    def delete_instance(self, instance_id: str) -> None:
        if "/" in instance_id or instance_id in ("", ".", ".."):
            raise ProviderError(f"qemu provider: {instance_id!r} is not a VM name")
        with self._lock:
            vm = self._vms.pop(instance_id, None)
        run_dir = self.data_dir / instance_id
        if vm is not None:
            vm.stop()
        else:
            for pid in _record(run_dir).get("pids", []):
                if _ours(pid, run_dir):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(run_dir, ignore_errors=True)

    def stopped(self, instance_id: str) -> str | None:
        with self._lock:
            vm = self._vms.get(instance_id)
        if vm is None or vm.qemu is None or vm.qemu.poll() is None:
            return None
        return f"qemu exited with status {vm.qemu.returncode}: {guest_last_words(vm.console_log)}"

    def list_instances(self, caa: str) -> list[Instance]:
        out = []
        for path in sorted(self.data_dir.glob(f"*/{RECORD}")) if self.data_dir.is_dir() else []:
            rec = _record(path.parent)
            if rec.get("caa") != caa:
                continue
            alive = any(_ours(p, path.parent) for p in rec.get("pids", []))
            if not alive and path.parent.name not in self._vms:
                shutil.rmtree(path.parent, ignore_errors=True)  # died with an earlier CAA
                continue
            tags = Tags(rec["caa"], rec.get("sandbox", ""))
            out.append(
                Instance(path.parent.name, path.parent.name, ("127.0.0.1",), tags, rec.get("port"))
            )
        return out

    def teardown(self) -> None:
        return


def _record(run_dir: Path) -> dict:
    try:
        rec = json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _ours(pid: object, run_dir: Path) -> bool:
    """``pid`` is alive and its command line names ``run_dir`` (not a recycled pid)."""
    if not isinstance(pid, int) or pid <= 1:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(run_dir).encode() in cmdline


class QemuFactory(ProviderFactory):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        env = os.environ.get
        parser.add_argument(
            "--podvm-image",
            type=Path,
            default=env("PODVM_IMAGE"),
            help="The pod VM image directory (`coco podvm build -o DIR`; PODVM_IMAGE).",
        )
        parser.add_argument(
            "--data-dir",
            type=Path,
            default=Path(env("QEMU_DATA_DIR", "/run/peerpod/qemu")),
            help="Where each VM's run directory goes.",
        )
        parser.add_argument(
            "--cpu",
            type=int,
            default=int(env("QEMU_CPU", "1")),
            help="vCPUs when the pod asks none (default 1).",
        )
        parser.add_argument(
            "--memory",
            type=int,
            default=int(env("QEMU_MEMORY", "2048")),
            help="MiB when the pod asks none (default 2048).",
        )
        parser.add_argument("--kernel-arg", dest="kernel_args", action="append", default=[],
                            metavar="ARG", help="An extra kernel argument for the pod VMs (repeatable).")  # fmt: skip
        parser.add_argument("--tpm-state", type=Path, default=env("QEMU_TPM_STATE"),
                            help="Each VM's vTPM starts as a copy of this swtpm state (the node's, "
                            "whose AK the owner enrolled; QEMU_TPM_STATE); default: a new vTPM.")  # fmt: skip

    def new_provider(self, args: argparse.Namespace) -> Provider:
        image = Path(args.podvm_image) if args.podvm_image else None
        tpm = Path(args.tpm_state) if args.tpm_state else None
        return QemuProvider(
            image, args.data_dir, args.cpu, args.memory, tuple(args.kernel_args), tpm_state=tpm
        )


FACTORY = QemuFactory()
