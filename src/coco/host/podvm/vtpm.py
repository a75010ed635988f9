"""A node's vTPM identity: a swtpm state directory made once, its attestation key read by the owner.

A vTPM made fresh at every boot has a fresh endorsement seed, hence an attestation key (AK) nobody
could have enrolled. A node instead keeps one swtpm state (``tpm2-00.permall``, which holds the
seeds) and each pod VM boots on a copy of it (``[hypervisor.qemu] tpm_state``, :class:`PodVm`'s
``tpm_state``). The guest's attester makes its AK as a primary key from a fixed template in the
endorsement hierarchy (:mod:`coco.tee.tpm.attester`), so the same seed gives the same key: the owner
reads it once from the state (:func:`ak_public_pem`, ``coco aa ak-public --tpm-state DIR``) and puts
it among the KBS's trusted AKs, as one enrols a node's TPM. PCRs are not in the permanent state:
every boot starts them at zero.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from coco.errors import PodVmError
from coco.host.podvm.run import which

STATE_FILE = "tpm2-00.permall"


def copy_state(template: Path, dest: Path) -> None:
    """Copy the node's vTPM state ``template`` into ``dest`` (created) for one VM's swtpm."""
    if not (template / STATE_FILE).is_file():
        raise PodVmError(
            f"pod VM: tpm_state {template}: expected a swtpm state directory with {STATE_FILE} "
            "(made by coco aa ak-public --tpm-state DIR)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(template / STATE_FILE, dest / STATE_FILE)


def ak_public_pem(state: Path, ak_alg: str = "rsa") -> bytes:
    """The AK (PEM) a guest booted on ``state`` makes; ``state`` is created (a new vTPM identity,
    mode 0700) when it does not exist yet."""
    from coco.tee.tpm.attester import TpmAttester

    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _swtpm(state) as tcti:
        return TpmAttester(tcti, ak_alg=ak_alg).ak_public_pem()


@contextlib.contextmanager
def _swtpm(state: Path) -> Iterator[str]:
    """swtpm on ``state`` behind two loopback TCP ports (this tpm2-tss has no Unix-socket TCTI);
    yields its TCTI; stopped by pid on leaving."""
    swtpm = which("swtpm", "vTPM")
    for _ in range(5):  # another process may take a port between the probe and swtpm's bind
        port = _free_pair()
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                [swtpm, "socket", "--tpm2", "--tpmstate", f"dir={state}",
                 "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                 "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                 "--flags", "not-need-init,startup-clear"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
            try:
                if _listening(proc, port):
                    yield f"swtpm:host=127.0.0.1,port={port}"
                    return
                err.seek(0)
                reason = err.read().decode(errors="replace").strip().splitlines()
            finally:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if proc.returncode not in (None, 0, -15) and not any("in use" in r for r in reason):
            raise PodVmError(f"vTPM {state}: swtpm failed: {(reason or ['no output'])[-1]}")
    raise PodVmError(f"vTPM {state}: swtpm did not listen on a loopback port")


def _listening(proc: subprocess.Popen[bytes], port: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.05)
    return False


def _free_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        with contextlib.suppress(OSError), socket.socket() as b:
            b.bind(("127.0.0.1", port + 1))
            return port
    raise PodVmError("vTPM: no free pair of loopback ports")
