"""``coco podvm boot`` and :class:`PodVm` under QEMU (TCG here) with a real swtpm vTPM.

One real boot for the whole suite (through the CLI, with initdata and ``--command``); the other
tests fail a boot on purpose and check that nothing is left running.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest

from coco.cli.main import main
from coco.errors import InitdataError, PodVmError
from coco.host.podvm.boot import PodVm, parse_report
from coco.host.podvm.build import Image
from tests.host._util import processes_mentioning

# The first test to use the session image pays for a cold build (minutes on a busy machine).
pytestmark = pytest.mark.timeout(900)

INITDATA = b"""version = "0.1.0"
algorithm = "sha384"

[data]
"aa.toml" = '''
[token_configs.kbs]
url = "http://10.0.2.2:8080"
'''
"policy.rego" = '''
package agent_policy
default AllowRequestsFailingPolicy := true
'''
"""


@pytest.fixture
def run_under(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run directories of the VMs started by the test go under a short directory of its own."""
    base = Path(tempfile.mkdtemp(prefix="podvm-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    yield base
    leftovers = processes_mentioning(str(base))
    for pid in leftovers:
        os.kill(pid, 9)
    os.rmdir(base)  # every run directory was removed
    assert not leftovers, f"processes left running: {leftovers}"


def _ready_line(log: Path) -> dict[str, str]:
    lines = [
        ln
        for ln in log.read_text(errors="replace").splitlines()
        if ln.startswith("coco-podvm: ready")
    ]
    assert len(lines) == 1, log.read_text(errors="replace")[-2000:]
    return parse_report(lines[0])


def test_boot_binds_the_initdata_into_pcr8(
    podvm_image: Image, run_under: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "initdata.toml"
    doc.write_bytes(INITDATA)
    console = tmp_path / "console.log"
    seen = tmp_path / "seen.txt"
    main([
        "podvm", "boot", "--image", str(podvm_image.dir), "--initdata", str(doc),
        "--console-log", str(console), "--timeout", "600", "--accel", "tcg",
        "--command", f'test -S "$COCO_PODVM_AGENT_SOCKET" && echo "$COCO_PODVM_PCR8" > {seen}',
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert "agent socket: " in out
    ready = _ready_line(console)
    digest = hashlib.sha384(INITDATA).digest()
    expected = hashlib.sha256(bytes(32) + digest[:32]).hexdigest()  # one extend from zero
    assert ready["initdata"] == digest.hex()
    assert ready["tpm"] == "/dev/tpmrm0"
    assert ready["pcr8"] == expected
    assert seen.read_text().strip() == expected
    assert ready["agent-port"] == "/dev/virtio-ports/agent.0"
    log = console.read_text(errors="replace")
    assert "files=aa.toml,initdata.toml,policy.rego" in log
    assert int(ready["mem-total-kib"]) > 512 * 1024


def test_a_boot_that_times_out_leaves_nothing_running(podvm_image: Image, run_under: Path) -> None:
    vm = PodVm(podvm_image, initdata=INITDATA, accel="tcg")
    with pytest.raises(PodVmError, match=r"the guest was not ready within 1 s under tcg"), vm:
        assert len(vm.pids) == 2
        vm.wait_ready(timeout=1)
    for pid in vm.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not vm.run_dir.exists()


def test_a_kernel_qemu_cannot_load_fails_the_boot_and_leaves_nothing(
    podvm_image: Image, run_under: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "image"
    bad.mkdir()
    (bad / "vmlinuz").write_bytes(b"not a kernel" * 100)
    for name in ("initrd.img", "root.img"):
        (bad / name).symlink_to(podvm_image.dir / name)
    vm = PodVm(bad, accel="tcg")
    with (
        pytest.raises(
            PodVmError, match=r"pod VM: qemu exited with status 1 before the guest was ready"
        ),
        vm,
    ):
        vm.wait_ready(timeout=120)
    for pid in vm.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_bad_initdata_is_refused_before_anything_starts(
    podvm_image: Image, run_under: Path
) -> None:
    with pytest.raises(InitdataError, match=r"version: expected '0\.1\.0'"):
        PodVm(podvm_image, initdata=b'version = "9"\nalgorithm = "sha256"\n[data]\n')
    assert list(run_under.iterdir()) == []


def test_boot_names_the_missing_image_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["podvm", "boot", "--image", str(tmp_path)])
    assert done.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"coco: error: pod VM image {tmp_path}: expected vmlinuz")
    assert "missing vmlinuz, initrd.img, root.img" in err


def test_qemu_command_line(podvm_image: Image, tmp_path: Path) -> None:
    vm = PodVm(podvm_image, accel="kvm", forwards=[(18080, 8080)], memory=768, cpus=2)
    vm._run_dir = tmp_path  # qemu_args needs a run directory; nothing is started
    args = vm.qemu_args()
    joined = " ".join(args)
    assert args[args.index("-accel") + 1] == "kvm" and args[args.index("-cpu") + 1] == "host"
    assert "hostfwd=tcp:127.0.0.1:18080-:8080" in joined
    assert args[args.index("-m") + 1] == "768" and args[args.index("-smp") + 1] == "2"
    assert f"path={tmp_path}/agent.sock,server=on,wait=off" in joined
    assert "name=agent.0" in joined and "tpm-crb,tpmdev=tpm0" in joined
    assert "initdata.img" not in joined  # no initdata: no config disk
    with pytest.raises(PodVmError, match="accel: expected one of auto, kvm, tcg, found 'xen'"):
        PodVm(podvm_image, accel="xen")
