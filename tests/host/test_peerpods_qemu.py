"""The cloud-api-adaptor with the qemu provider (coco.host.podvm's PodVm, no daemon), driven by the
Go ttRPC client: a tiny VM boots under TCG with its vTPM and config drive, the agent is reached
through the proxy and the VM's forwarded port, StopVM ends the VM's processes; a CAA killed -9
takes its VMs with it and the next start clears their run directories."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host.peerpods_fixtures import caa_process, make_tiny_image
from tests.host.test_peerpods_libvirt import (
    COCO,
    HV,
    NAME,
    POD,
    SID,
    AgentThread,
    _field,
    _free_port,
    _read_field1,
    _wait_for,
    call,
    call_bg,
    create_vm,
    goclient,  # noqa: F401 - the fixture
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("swtpm") is None or shutil.which("qemu-system-x86_64") is None:
        pytest.fail("the qemu provider needs qemu-system-x86 and swtpm: scripts/install-system-deps",
                    pytrace=False)  # fmt: skip
    return make_tiny_image(tmp_path_factory.mktemp("tiny") / "image")


@pytest.fixture
def work() -> Iterator[Path]:
    short = Path(tempfile.mkdtemp(prefix="pq-", dir="/tmp"))
    yield short
    shutil.rmtree(short, ignore_errors=True)


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
                out.append(pid)
    return out


def test_qemu_provider_boot_reach_agent_stop(tiny: Path, work: Path, goclient: Path) -> None:  # noqa: F811
    port = _free_port()
    hv = work / "hv.sock"
    args = ["qemu", "--podvm-image", str(tiny), "--data-dir", str(work / "vms"), "--socket",
            str(hv), "--pods-dir", str(work / "pods"), "--reconcile-interval", "0",
            "--kernel-arg", f"relay=10.0.2.2:{port}", "--proxy-timeout", "180s"]  # fmt: skip
    podns = work / "podns"
    podns.write_text("")
    with contextlib.ExitStack() as stack:
        agent = stack.enter_context(AgentThread(work / "agent.sock"))
        caa = stack.enter_context(caa_process(args, work / "caa.log", hv))
        created = call(goclient, hv, HV, "CreateVM", create_vm(SID, POD))
        assert created["code"] == 0, created
        start = stack.enter_context(call_bg(goclient, hv, HV, "StartVM", _field(1, SID)))
        iso = _wait_for(lambda: (work / "vms" / NAME / "cidata.iso").exists()
                        and work / "vms" / NAME / "cidata.iso", "config drive")  # fmt: skip
        root = work / "vmroot"
        subprocess.run([*COCO, "process-user-data", "--config-drive", str(iso), "--root",
                        str(root), "--tee", "none"], check=True, capture_output=True)  # fmt: skip
        fwd = stack.enter_context(subprocess.Popen(
            [*COCO, "forwarder", "serve", "--config", str(root / "run/peerpod/apf.json"),
             "--listen", f"127.0.0.1:{port}", "--kata-agent-socket", f"unix://{agent.socket}",
             "--pod-namespace", str(podns)], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL))  # fmt: skip
        stack.callback(fwd.terminate)
        out, _ = start.communicate(timeout=240)
        assert json.loads(out)["code"] == 0, json.loads(out)["message"]
        record = json.loads((work / "vms" / NAME / "instance.json").read_text())
        assert record["sandbox"] == SID and len(_alive(record["pids"])) == 2  # qemu + swtpm
        reply = call(goclient, Path(_read_field1(created["payload"])), "grpc.AgentService",
                     "CreateContainer", _field(1, "c1"))  # fmt: skip
        assert reply["code"] == 0, reply
        assert agent.stub.requests[-1].container_id == "c1"
        assert call(goclient, hv, HV, "StopVM", _field(1, SID))["code"] == 0
        assert _alive(record["pids"]) == []
        assert not (work / "vms" / NAME).exists()

        # a CAA killed -9 during StartVM: its VM dies with it; the next start clears the rest
        assert call(goclient, hv, HV, "CreateVM", create_vm(SID, POD))["code"] == 0
        start2 = stack.enter_context(call_bg(goclient, hv, HV, "StartVM", _field(1, SID)))
        _wait_for(lambda: (work / "vms" / NAME / "instance.json").exists(), "the VM record")
        pids = json.loads((work / "vms" / NAME / "instance.json").read_text())["pids"]
        caa.kill()
        caa.wait()
        start2.communicate(timeout=60)
        _wait_for(lambda: _alive(pids) == [], "the VM's processes to die with the CAA", 30)
        stack.enter_context(caa_process(args, work / "caa2.log", hv))
        assert not (work / "vms" / NAME).exists()
        state = json.loads((work / "pods" / SID / "sandbox.json").read_text())
        assert state["state"] == "created"


def test_a_vm_that_powers_off_fails_the_remote_sandbox_at_once_with_its_reason(
    tiny: Path, work: Path
) -> None:
    """The shim's remote sandbox against the CAA: the guest prints its init's error line and
    powers off (as the pod VM does for userdata its TEE did not measure); StartVM fails with that
    line long before the proxy timeout, and nothing is left: no VM, sandbox record or state."""
    from coco.host.runtime import SandboxError
    from coco.host.runtime.config import parse
    from coco.host.runtime.sandbox import make

    hv = work / "hv.sock"
    args = ["qemu", "--podvm-image", str(tiny), "--data-dir", str(work / "vms"), "--socket",
            str(hv), "--pods-dir", str(work / "pods"), "--reconcile-interval", "0",
            "--kernel-arg", "tiny.fail=1", "--proxy-timeout", "600s"]  # fmt: skip
    config = parse({"hypervisor": {"remote": {"remote_hypervisor_socket": str(hv)}},
                    "runtime": {"state_dir": str(work / "state")}})  # fmt: skip
    with caa_process(args, work / "caa.log", hv):
        sandbox = make(config, SID)
        with pytest.raises(SandboxError) as failed:
            sandbox.start(None, {"io.kubernetes.cri.sandbox-name": "web"})
        message = str(failed.value)
        assert message.startswith("remote sandbox: StartVM at unix://"), message
        assert f"VM {NAME} stopped before its forwarder answered: qemu exited" in message
        assert message.endswith("coco-podvm: error: tiny: asked to fail"), message
        assert list((work / "vms").iterdir()) == []
        assert sorted(p.name for p in (work / "pods").iterdir()) == [".tls", "caa-id"]
        assert not (work / "state" / SID).exists()
