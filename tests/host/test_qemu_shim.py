"""containerd-shim-coco-v2 with the ``qemu`` sandbox, driven by a real containerd through ``ctr``:
one TCG boot of the pod VM (``coco podvm build``'s image, a swtpm vTPM), the container's image
pulled inside the guest by its CDH from the session's registry on the host (10.0.2.2 through
QEMU's user networking), its output and exit code back through containerd, and after deletion no
QEMU, swtpm, socket, mount or state left."""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from coco.host.podvm.build import Image
from tests.host.test_shim import INITDATA, SHIM, _leftovers, _policy, _pull

pytestmark = [
    pytest.mark.timeout(1200),  # a cold image build, then a TCG boot and a pull in the guest
    pytest.mark.slow,
]
IMAGE_NAME = "io.kubernetes.cri.image-name"


def _initdata(guest_registry: str) -> str:
    cdh = (
        '[kbc]\nname = "offline_fs_kbc"\n\n'
        f'[[image.registry_config.registry]]\nlocation = "{guest_registry}"\ninsecure = true\n'
    )
    raw = (
        'version = "0.1.0"\nalgorithm = "sha384"\n\n[data]\n'
        f'"cdh.toml" = {json.dumps(cdh)}\n"policy.rego" = {json.dumps(_policy(False))}\n'
    ).encode()
    return base64.b64encode(gzip.compress(raw)).decode()


def _qemu_processes(state: Path) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(state).encode() in cmd and (b"qemu-system" in cmd or b"swtpm" in cmd):
                pids.append(int(pid))
    return pids


def test_ctr_run_on_the_qemu_sandbox(containerd, test_images, podvm_image: Image) -> None:
    ns, cid = "coco-qemu", "qemu-t1"
    state = Path(tempfile.mkdtemp(prefix="qs-", dir="/tmp"))  # short: the VM's sockets live in it
    cfg = state.parent / f"{state.name}.toml"
    cfg.write_text(
        f'[hypervisor.qemu]\nimage = "{podvm_image.dir}"\naccel = "tcg"\nboot_timeout = 600\n\n'
        "[agent.kata]\ndial_timeout = 600\ncreate_container_timeout = 600\n\n"
        f'[runtime]\nstate_dir = "{state}"\n'
    )
    fifo = Path(tempfile.mkdtemp(prefix="qs-fifo-", dir="/tmp"))
    host_image = test_images.busybox  # 127.0.0.1:PORT/coco-test/busybox:1, for containerd
    guest_image = host_image.replace("127.0.0.1:", "10.0.2.2:", 1)  # what the guest pulls
    _pull(containerd, ns, host_image)
    seen_qemu: list[int] = []
    try:
        start = time.monotonic()
        proc = subprocess.Popen(
            ["ctr", "--address", str(containerd.address), "-n", ns, "run", "--rm",
             "--fifo-dir", str(fifo), "--runtime", SHIM, "--runtime-config-path", str(cfg),
             "--annotation", f"{IMAGE_NAME}={guest_image}",
             "--annotation", f"{INITDATA}={_initdata(guest_image.split('/')[0])}",
             host_image, cid, "/bin/sh", "-c", "echo hello-from-the-pod-vm; exit 7"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        while proc.poll() is None and not seen_qemu:
            seen_qemu = _qemu_processes(state)
            time.sleep(0.5)
        out, err = proc.communicate(timeout=900)
        elapsed = time.monotonic() - start
        assert seen_qemu, "no QEMU was started for the pod"
        assert "hello-from-the-pod-vm" in out, err
        assert proc.returncode == 7, err
        print(f"\nctr run on the qemu sandbox (boot, pull in the guest, run): {elapsed:.1f} s")
        deadline = time.monotonic() + 30
        while _leftovers(state, cid) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert _leftovers(state, cid) == []
        assert _qemu_processes(state) == []
    finally:
        for pid in _qemu_processes(state):
            os.kill(pid, 9)
        containerd.ctr("-n", ns, "task", "kill", "-s", "KILL", cid, check=False)
        containerd.ctr("-n", ns, "task", "delete", cid, check=False)
        containerd.ctr("-n", ns, "containers", "delete", cid, check=False)
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(fifo, ignore_errors=True)
        cfg.unlink(missing_ok=True)
