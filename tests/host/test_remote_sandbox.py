"""``coco pod run --runtime-class coco-remote``: a CRI pod through a real containerd, coco's shim
and its ``remote`` sandbox, a real cloud-api-adaptor (``coco cloud-api-adaptor serve qemu``) and
the real pod VM of ``coco podvm build`` booted under TCG in peer-pod mode: the guest's init binds
the launch initdata into PCR 8 (once, by the AA), ``coco process-user-data`` checks the config
drive's copy against it, the agent listens on its Unix socket and ``coco forwarder serve`` on
15150 behind QEMU's forwarded port, reached by the CAA's agent proxy over mutual TLS. The app's
image is pulled inside the guest from the session's registry on the host (the pod names it
127.0.0.1:PORT; the initdata's cdh.toml remaps that to 10.0.2.2:PORT, the host as QEMU's user
networking shows it). The output and exit code come back through CRI; after the run no VM, QEMU,
swtpm, socket, sandbox record or shim is left. One boot for the module (always a timeout)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from coco.host.podvm.build import Image
from coco.integrity.initdata import fit
from tests.host._util import processes_mentioning
from tests.host.containerd_fixture import Containerd, CriImages
from tests.host.peerpods_fixtures import caa_process
from tests.host.test_pod_local import ALLOWED, _shims_of
from tests.host.test_pod_run import leftovers, sandboxes, write_pod

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # a cold image build, a TCG boot


def _initdata(registry: str) -> bytes:
    """The pod's initdata TOML: the CDH remaps the host's registry to where the guest reaches it,
    the policy lets the pod's requests through."""
    port = registry.rsplit(":", 1)[1]
    policy = ["package agent_policy", "", "default AllowRequestsFailingPolicy := false"]
    policy += [f"default {name} := true" for name in [*ALLOWED, "CreateContainerRequest"]]
    cdh = (
        '[kbc]\nname = "offline_fs_kbc"\n\n'
        f'[[image.registry_config.registry]]\nprefix = "{registry}"\n'
        f'location = "10.0.2.2:{port}"\ninsecure = true\n'
    )
    return (
        'version = "0.1.0"\nalgorithm = "sha384"\n\n[data]\n'
        f'"cdh.toml" = {json.dumps(cdh)}\n"policy.rego" = {json.dumps(chr(10).join(policy) + chr(10))}\n'
    ).encode()


def _vm_processes(vms: Path) -> list[int]:
    """QEMU and swtpm processes of the VMs under ``vms`` (the CAA names the directory too)."""
    out = []
    for pid in processes_mentioning(str(vms)):
        try:
            exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"qemu-system" in a or b"swtpm" in a for a in exe[:4]):  # setpriv ... -- qemu
            out.append(pid)
    return out


def _ready_line(vms: Path) -> str | None:
    for log in vms.glob("*/vm/console.log"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("coco-podvm: ready") or line.startswith("coco-podvm: error"):
                return line
    return None


def test_pod_on_coco_remote_through_the_caa_and_a_peer_pod_vm(
    containerd: Containerd, test_images: CriImages, podvm_image: Image, tmp_path: Path
) -> None:
    work = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: the agent proxy's socket
    hv, vms, pods, state = work / "hv.sock", work / "vms", work / "pods", work / "state"
    remote_cfg = containerd.base / "coco" / "configuration-remote.toml"
    installed = remote_cfg.read_text()
    remote_cfg.write_text(
        f'[hypervisor.remote]\nremote_hypervisor_socket = "{hv}"\n'
        "remote_hypervisor_timeout = 900\n\n"
        "[agent.kata]\ndial_timeout = 60\ncreate_container_timeout = 600\n\n"
        f'[runtime]\nstate_dir = "{state}"\n'
    )
    raw = _initdata(test_images.busybox.split("/")[0])
    pod = write_pod(
        tmp_path,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata:
          name: peer-hello
          annotations:
            io.katacontainers.config.hypervisor.cc_init_data: {base64.b64encode(gzip.compress(raw)).decode()}
        spec:
          runtimeClassName: coco-remote
          terminationGracePeriodSeconds: 1
          containers:
          - name: app
            image: {test_images.busybox}
            command: ["/bin/sh", "-c", "echo hello from a peer pod; echo to-stderr >&2; exit 4"]
        """,
    )
    caa_args = ["qemu", "--podvm-image", str(podvm_image.dir), "--data-dir", str(vms),
                "--socket", str(hv), "--pods-dir", str(pods), "--reconcile-interval", "0",
                "--proxy-timeout", "900s"]  # fmt: skip
    ready, run = None, None
    try:
        with caa_process(caa_args, work / "caa.log", hv):
            start = time.monotonic()
            run = subprocess.Popen(
                [sys.executable, "-m", "coco.cli.main", "pod", "run", str(pod),
                 "--runtime-endpoint", containerd.endpoint, "--tls-verify=false",
                 "--log-root", str(tmp_path / "logs"), "--state-dir", str(tmp_path / "state")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            while ready is None and run.poll() is None:
                ready = _ready_line(vms)
                time.sleep(0.5)
            first = run.stdout.readline() if run.stdout else ""
            first_at = time.monotonic() - start
            out, err = run.communicate(timeout=1200)
            caa_log = (work / "caa.log").read_text()
            print(f"\ncoco pod run on coco-remote: first line after {first_at:.1f} s; VM: {ready}")
            assert first + out == "hello from a peer pod\n", err + caa_log
            assert run.returncode == 4, err
            assert "to-stderr" in err
            assert "with runtime class coco-remote" in err
            # the pod VM bound its launch initdata into PCR 8 once, and it was the pod's
            assert ready is not None and ready.startswith("coco-podvm: ready"), ready
            fields = dict(re.findall(r" ([a-z0-9-]+)=(\S+)", ready))
            digest = hashlib.sha384(raw).digest()
            assert fields["mode"] == "peerpod" and fields["bound-by"] == "aa"
            assert fields["initdata"] == digest.hex()
            assert fields["pcr8"] == hashlib.sha256(bytes(32) + fit(digest, 32)).hexdigest()
            assert "forwarder" in fields["services"].split(",")
            # after deletion: no VM, QEMU, swtpm, proxy socket, sandbox record, shim, pod
            deadline = time.monotonic() + 60
            while (_shims_of(containerd) or list(vms.glob("*"))) and time.monotonic() < deadline:
                time.sleep(0.3)
            assert _shims_of(containerd) == []
            assert list(vms.glob("*")) == []
            assert sorted(p.name for p in pods.iterdir()) == [".tls", "caa-id"]
            assert not state.exists() or list(state.iterdir()) == []
            assert sandboxes(containerd) == []
            assert leftovers(tmp_path) == []
            assert _vm_processes(vms) == []
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        for pid in processes_mentioning(str(work)):
            os.kill(pid, 9)
        remote_cfg.write_text(installed)
        shutil.rmtree(work, ignore_errors=True)
