"""``coco podvm boot`` and :class:`PodVm`: run a pod VM image under QEMU with a vTPM.

What a :class:`PodVm` starts, in a run directory of its own:

* ``swtpm socket --tpm2`` (state in ``tpm/``, control socket ``swtpm.sock``), which QEMU attaches
  as ``-tpmdev emulator`` behind a ``tpm-crb`` device: the guest sees ``/dev/tpmrm0``. The state
  is new (a vTPM nobody knows) or, with ``tpm_state``, a copy of the node's vTPM state, whose
  attestation key the owner enrolled (:mod:`.vtpm`);
* ``qemu-system-x86_64``: KVM only when ``/dev/kvm`` opens *and* the CPU advertises vmx or svm
  (on this kind of machine ``/dev/kvm`` opens but guests hang), else TCG; the root image
  read-only, the initdata as a second read-only disk, the serial console to ``console.log``, the
  agent's channel on virtio-serial (``agent.sock``, port ``agent.0``), user networking with
  optional host forwards on 127.0.0.1, and optional extra read-only disks (``disks``: e.g. tardev
  layers) at fixed PCI slots :data:`DISK_SLOT` + i, which the agent finds by their PCI path
  (:meth:`PodVm.disk_pci_address`).

:meth:`PodVm.wait_ready` watches the console for the guest init's readiness line. :meth:`stop`
(also on leaving the ``with`` block, whatever the reason) stops QEMU, then swtpm, by pid, and
removes the run directory it made. Both children also die with this process (``PR_SET_PDEATHSIG``
through ``setpriv``) and run in their own session, so a Ctrl-C reaches only us.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from coco.errors import PodVmError
from coco.host.podvm.build import Image
from coco.host.podvm.guest_init import PREFIX, READY
from coco.host.podvm.kernel import ROOT_LABEL
from coco.host.podvm.run import which
from coco.host.podvm.vtpm import copy_state
from coco.integrity.initdata import encode_image

ACCELS = ("auto", "kvm", "tcg")
QEMU = "qemu-system-x86_64"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the NUL
DISK_SLOT = 0x10  # the first extra disk's slot on the root bus (q35 puts its own below 0x08)
MAX_DISKS = 8
KERNEL_ARGS = (
    "console=ttyS0",
    "quiet",
    "panic=-1",
    "net.ifnames=0",
    f"root=LABEL={ROOT_LABEL}",
    "random.trust_cpu=on",
)


def detect_accel() -> str:
    """``kvm`` when ``/dev/kvm`` opens read-write and the CPU has vmx or svm, else ``tcg``."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return "tcg"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "tcg"
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return "kvm" if "vmx" in flags or "svm" in flags else "tcg"
    return "tcg"


def parse_report(line: str) -> dict[str, str]:
    """``coco-podvm: ready a=1 b=2`` -> ``{"a": "1", "b": "2"}``."""
    fields = {}
    for word in line.removeprefix(PREFIX).split()[1:]:
        key, sep, value = word.partition("=")
        if sep:
            fields[key] = value
    return fields


class PodVm:
    """A pod VM under QEMU; use as a context manager, or call :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        image: Image | Path,
        *,
        initdata: bytes | None = None,
        memory: int = 1024,
        cpus: int = 1,
        accel: str = "auto",
        forwards: Sequence[tuple[int, int]] = (),
        console_log: Path | None = None,
        run_dir: Path | None = None,
        kernel_args: Sequence[str] = (),
        disks: Sequence[Path] = (),
        tpm_state: Path | None = None,
    ) -> None:
        self.image = image if isinstance(image, Image) else Image.open(Path(image))
        if accel not in ACCELS:
            raise PodVmError(f"pod VM: accel: expected one of {', '.join(ACCELS)}, found {accel!r}")
        if memory < 256:
            raise PodVmError(f"pod VM: memory: expected at least 256 MiB, found {memory}")
        if cpus < 1:
            raise PodVmError(f"pod VM: cpus: expected at least 1, found {cpus}")
        for host, guest in forwards:
            if not (0 < host < 65536 and 0 < guest < 65536):
                raise PodVmError(f"pod VM: forward {host}:{guest}: expected ports 1-65535")
        if len(disks) > MAX_DISKS:
            raise PodVmError(f"pod VM: disks: expected at most {MAX_DISKS}, found {len(disks)}")
        for disk in disks:
            if not Path(disk).is_file() and not Path(disk).is_block_device():
                raise PodVmError(f"pod VM: disk {disk}: expected a file or a block device")
        self.disks = [Path(d).absolute() for d in disks]
        self.tpm_state = None if tpm_state is None else Path(tpm_state)
        self.initdata_image = None if initdata is None else encode_image(initdata)
        self.memory = memory
        self.cpus = cpus
        self.accel = detect_accel() if accel == "auto" else accel
        self.forwards = list(forwards)
        self.kernel_args = list(kernel_args)
        self._own_run_dir = run_dir is None
        self._run_dir = run_dir
        self._console_log = console_log
        self.qemu: subprocess.Popen[bytes] | None = None
        self.swtpm: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, str] | None = None
        self.reports: list[str] = []
        self.started_at: float | None = None

    # -- paths ----------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        if self._run_dir is None:
            raise PodVmError("pod VM: not started")
        return self._run_dir

    @property
    def agent_socket(self) -> Path:
        """The host end of the agent's virtio-serial channel (QEMU listens, the shim connects)."""
        return self.run_dir / "agent.sock"

    @staticmethod
    def disk_pci_address(index: int) -> str:
        """The PCI address of extra disk ``index`` in the guest (a blk storage's source)."""
        return f"0000:00:{DISK_SLOT + index:02x}.0"

    @property
    def console_log(self) -> Path:
        return self._console_log or self.run_dir / "console.log"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (self.qemu, self.swtpm) if p is not None]

    # -- life -----------------------------------------------------------------------------------
    def __enter__(self) -> PodVm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.qemu is not None:
            raise PodVmError("pod VM: already started")
        qemu = which(QEMU, "pod VM")
        swtpm = which("swtpm", "pod VM")
        if self._run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix="coco-podvm-"))
        else:
            self._run_dir.mkdir(parents=True, exist_ok=True)
        try:
            if len(str(self.agent_socket)) > MAX_SOCKET_PATH:
                raise PodVmError(
                    f"pod VM: run directory {self.run_dir}: expected a path short enough for a "
                    f"Unix socket ({MAX_SOCKET_PATH} bytes), found {len(str(self.agent_socket))}"
                )
            self.console_log.parent.mkdir(parents=True, exist_ok=True)
            self.console_log.write_bytes(b"")
            self._start_swtpm(swtpm)
            self.qemu = self._spawn([qemu, *self.qemu_args()], self.run_dir / "qemu.log")
            self.started_at = time.monotonic()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        setpriv = shutil.which("setpriv")
        if setpriv is not None:  # die with us even if we are killed with SIGKILL
            cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
        with open(log, "wb") as out:
            return subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )

    def _start_swtpm(self, swtpm: str) -> None:
        state = self.run_dir / "tpm"
        state.mkdir(exist_ok=True)
        if self.tpm_state is not None:
            copy_state(self.tpm_state, state)
        sock = self.run_dir / "swtpm.sock"
        log = self.run_dir / "swtpm.log"
        self.swtpm = self._spawn(
            [swtpm, "socket", "--tpm2", "--tpmstate", f"dir={state}",
             "--ctrl", f"type=unixio,path={sock}", "--log", f"file={log},level=1",
             "--terminate"],
            self.run_dir / "swtpm.out",
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self.swtpm.poll() is not None:
                raise PodVmError(
                    f"pod VM: swtpm exited with status {self.swtpm.returncode} before it listened: "
                    f"{_tail(self.run_dir / 'swtpm.out') or _tail(log)}"
                )
            if time.monotonic() > deadline:
                raise PodVmError(f"pod VM: swtpm did not create {sock} within 10 s")
            time.sleep(0.02)

    def qemu_args(self) -> list[str]:
        run = self.run_dir
        img = self.image
        net = "user,id=net0" + "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in self.forwards)
        args = [
            "-name", "coco-podvm",
            "-machine", "q35",
            "-accel", self.accel,
            "-cpu", "host" if self.accel == "kvm" else "max",
            "-m", str(self.memory),
            "-smp", str(self.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(img.kernel),
            "-initrd", str(img.initrd),
            "-append", " ".join([*KERNEL_ARGS, *self.kernel_args]),
            "-drive", f"file={img.root},format=raw,if=virtio,readonly=on",
            "-chardev", f"file,id=console0,path={self.console_log}",
            "-serial", "chardev:console0",
            "-chardev", f"socket,id=chrtpm,path={run / 'swtpm.sock'}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-crb,tpmdev=tpm0",
            "-chardev", f"socket,id=agent0,path={self.agent_socket},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", "virtserialport,bus=vser0.0,chardev=agent0,name=agent.0",
            "-netdev", net,
            "-device", "virtio-net-pci,netdev=net0",
            "-device", "virtio-rng-pci",
        ]  # fmt: skip
        for i, disk in enumerate(self.disks):
            if "," in str(disk):
                raise PodVmError(f"pod VM: disk {disk}: a comma in the path is not allowed")
            args += ["-drive", f"file={disk},format=raw,if=none,id=disk{i},readonly=on",
                     "-device", f"virtio-blk-pci,drive=disk{i},addr=0x{DISK_SLOT + i:x}"]  # fmt: skip
        if self.initdata_image is not None:
            path = run / "initdata.img"
            path.write_bytes(self.initdata_image)
            args += ["-drive", f"file={path},format=raw,if=virtio,readonly=on"]
        return args

    def wait_ready(self, timeout: float = 300) -> dict[str, str]:
        """Wait for the guest's readiness line and return its fields (``pcr8``, ``services``...).

        Raises :class:`PodVmError` if the guest reports an error, QEMU or swtpm exits, or
        ``timeout`` seconds pass; the VM is left to the caller's :meth:`stop`."""
        if self.qemu is None:
            raise PodVmError("pod VM: not started")
        deadline = time.monotonic() + timeout
        offset = 0
        pending = b""
        while True:
            with open(self.console_log, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                if not line.startswith(PREFIX):
                    continue
                self.reports.append(line)
                if line.startswith(f"{PREFIX} error:"):
                    raise PodVmError(
                        f"pod VM: the guest failed: {line.removeprefix(PREFIX).strip()} "
                        f"(console log {self.console_log})"
                    )
                if line.startswith(READY):
                    self.ready = parse_report(line)
                    return self.ready
            for name, proc in (("qemu", self.qemu), ("swtpm", self.swtpm)):
                if proc is not None and proc.poll() is not None:
                    last = _tail(self.run_dir / "qemu.log") if name == "qemu" else ""
                    raise PodVmError(
                        f"pod VM: {name} exited with status {proc.returncode} before the guest "
                        f"was ready: {last or _tail(self.console_log) or 'no output'} "
                        f"(console log {self.console_log})"
                    )
            if time.monotonic() > deadline:
                raise PodVmError(
                    f"pod VM: the guest was not ready within {timeout:g} s under {self.accel} "
                    f"(last console line: {_tail(self.console_log) or 'none'!r}; console log "
                    f"{self.console_log})"
                )
            time.sleep(0.1)

    def wait(self) -> int:
        """Wait for QEMU to exit (the guest powered off) and return its status."""
        if self.qemu is None:
            raise PodVmError("pod VM: not started")
        return self.qemu.wait()

    def stop(self) -> None:
        """Stop QEMU, then swtpm, by pid (SIGTERM, SIGKILL after 5 s); remove our run dir."""
        for proc in (self.qemu, self.swtpm):
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_run_dir and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)


def _tail(path: Path) -> str:
    """The last non-empty line of a log file, one line, at most 300 characters."""
    try:
        data = path.read_bytes()[-4096:]
    except OSError:
        return ""
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return " ".join(lines[-1].split())[:300] if lines else ""
