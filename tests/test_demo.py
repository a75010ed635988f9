"""`coco demo` (what `make demo` runs), non-interactively on coco-local: every step either does
what it should or says precisely what blocks it, and nothing is left behind (processes by pid,
mounts, sockets, the work directory), whatever the outcome."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

TOOLS = ("containerd", "runc", "ctr", "docker-registry", "umoci", "busybox", "nsenter")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_demo_lives_the_pod_or_names_its_blocker(tmp_path: Path) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (scripts/install-system-deps)")
    if os.geteuid() != 0:
        pytest.skip("the demo's containerd needs root")
    log = tmp_path / "demo.json"
    out = subprocess.run(
        [sys.executable, "-m", "coco.cli.main", "demo", "--runtime-class", "coco-local",
         "--peer-pods=false", "--json", str(log)],
        capture_output=True, text=True, timeout=1700, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    doc = json.loads(log.read_text())
    status = {s["number"]: s for s in doc["steps"]}
    text = out.stdout + out.stderr
    # the owner side and the workload are real and work today
    assert [status[n]["status"] for n in ("1", "2", "3")] == ["ok"] * 3, text[-4000:]
    assert "WARNING: coco-local runs the guest on this host: INSECURE" in out.stdout
    # whatever happened, nothing is left: the services by pid, mounts, sockets, the work dir
    assert status["7"]["status"] == "ok", status["7"]
    work = doc["work_dir"]
    assert doc["services"] and not [s for s in doc["services"] if _alive(s["pid"])]
    assert work not in Path("/proc/self/mounts").read_text()
    assert not Path(work).exists()
    assert not [p for p in Path("/tmp").glob("coco-demo-st-*")]
    if status["4"]["status"] == "blocked":
        # never pretended: the step says what blocks it, and the demo fails
        assert out.returncode == 1 and doc["passed"] is False
        assert "demo did not pass" in out.stdout
        assert all(status[n]["status"] == "skipped" for n in ("5", "6"))
        pytest.xfail(f"step 4 blocked: {status['4']['detail']}")
    assert status["4"]["status"] == "ok", status["4"]
    assert "the secret, fetched inside the pod from 127.0.0.1:8006:" in status["4"]["detail"]
    assert "policy" in status["5a"]["detail"].lower()
    assert "initdata" in status["5b"]["detail"] or "PolicyDeny" in status["5b"]["detail"]
    assert "digest" in status["5c"]["detail"].lower()
    assert out.returncode == 0 and doc["passed"] is True, text[-4000:]
