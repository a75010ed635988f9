"""A node's vTPM identity (coco.host.podvm.vtpm): the AK the owner reads from the node's swtpm state
with `coco aa ak-public --tpm-state DIR` is the AK a guest makes on the copy a pod VM boots on
(both through a real swtpm and tpm2-tools), and another state gives another AK; a bad template is
refused in one line before anything starts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coco.errors import PodVmError
from coco.host.podvm.vtpm import STATE_FILE, ak_public_pem, copy_state

pytestmark = pytest.mark.skipif(
    shutil.which("swtpm") is None or shutil.which("tpm2_createprimary") is None,
    reason="swtpm and tpm2-tools are required",
)
COCO = [sys.executable, "-m", "coco.cli.main"]


def test_the_enrolled_ak_is_the_one_a_copy_of_the_node_state_makes(tmp_path: Path) -> None:
    node = tmp_path / "node-vtpm"
    out = subprocess.run(
        [*COCO, "aa", "ak-public", "--tpm-state", str(node)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    enrolled = out.stdout.encode()
    assert enrolled.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert (node / STATE_FILE).is_file() and node.stat().st_mode & 0o777 == 0o700
    vm = tmp_path / "vm" / "tpm"  # what PodVm does for each VM's swtpm
    copy_state(node, vm)
    assert ak_public_pem(vm) == enrolled
    assert ak_public_pem(tmp_path / "other-node") != enrolled


def test_a_template_without_swtpm_state_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PodVmError, match=rf"tpm_state {tmp_path}/empty: expected a swtpm state "):
        copy_state(tmp_path / "empty", tmp_path / "vm")
    assert not (tmp_path / "vm").exists()


def test_tcti_and_tpm_state_together_are_a_usage_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [*COCO, "aa", "ak-public", "--tpm-state", str(tmp_path / "s"), "--tcti", "device:/x"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--tcti and --tpm-state name two TPMs" in out.stderr
    assert not (tmp_path / "s").exists()
