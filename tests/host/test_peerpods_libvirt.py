"""The cloud-api-adaptor with the libvirt provider against a real libvirtd of the test's own,
driven by an independent ttRPC client (containerd's Go ttrpc, tests/rpc/goclient) with payloads
encoded here from upstream's field numbers, and checked with ``virsh``.

One domain boots for real per test (the tiny image: a few seconds under TCG)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coco.rpc.server import Server
from coco.rpc.services import AGENT, HEALTH
from tests.guest.test_forwarder import StubAgent
from tests.host.peerpods_fixtures import Libvirtd, caa_process, make_tiny_image, start_libvirtd
from tests.rpc import test_go_peer

SID = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
POD = {
    "io.kubernetes.cri.sandbox-name": "web",
    "io.kubernetes.cri.sandbox-namespace": "default",
    "io.katacontainers.config.hypervisor.default_vcpus": "1",
    "io.katacontainers.config.hypervisor.default_memory": "256",
}
NAME = f"podvm-web-{SID[:8]}"
HV = "hypervisor.Hypervisor"
COCO = [sys.executable, "-m", "coco.cli.main"]
goclient = test_go_peer.goclient  # the independent ttRPC client (a session fixture)


# --- protobuf by hand (field numbers from upstream's hypervisor.proto / agent.proto) -----------
def _varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def _field(number: int, data: bytes | str) -> bytes:
    data = data.encode() if isinstance(data, str) else data
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def create_vm(sid: str, annotations: dict[str, str], netns: str = "/run/netns/cni-1") -> bytes:
    entries = b"".join(_field(2, _field(1, k) + _field(2, v)) for k, v in annotations.items())
    return _field(1, sid) + entries + _field(3, netns)


def _read_field1(payload: bytes) -> str:
    assert payload[0] == 0x0A
    length, i = 0, 1
    shift = 0
    while True:
        b = payload[i]
        length |= (b & 0x7F) << shift
        i += 1
        shift += 7
        if b < 0x80:
            break
    return payload[i : i + length].decode()


def call(go: Path, address: str, service: str, method: str, payload: bytes,
         timeout_ms: int = 120_000) -> dict:  # fmt: skip
    proc = subprocess.run([str(go), "call", f"unix://{address}", service, method, payload.hex(),
                           str(timeout_ms)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.stdout, proc.stderr
    out = json.loads(proc.stdout)
    out["payload"] = bytes.fromhex(out.get("payload") or "")
    return out


def call_bg(go: Path, address: str, service: str, method: str, payload: bytes) -> subprocess.Popen:
    return subprocess.Popen([str(go), "call", f"unix://{address}", service, method, payload.hex(),
                             "600000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    with start_libvirtd() as lv:
        yield lv


@pytest.fixture(scope="module")
def tiny(libvirtd: Libvirtd) -> Path:
    return make_tiny_image(libvirtd.base / "tiny")


@pytest.fixture
def work(libvirtd: Libvirtd) -> Iterator[Path]:
    short = Path(tempfile.mkdtemp(prefix="pp-", dir="/tmp"))  # agent sockets need short paths
    yield short
    shutil.rmtree(short, ignore_errors=True)
    for name in libvirtd.domains():  # a failed test leaves no domain to the next one
        subprocess.run(["virsh", "-c", libvirtd.uri, "destroy", name], capture_output=True)
        subprocess.run(["virsh", "-c", libvirtd.uri, "undefine", name], capture_output=True)


def _caa_args(lv: Libvirtd, image: Path, work: Path, *extra: str) -> list[str]:
    return ["libvirt", "--uri", lv.uri, "--podvm-image", str(image), "--data-dir", str(lv.data_dir),
            "--socket", str(work / "hv.sock"), "--pods-dir", str(work / "pods"),
            "--reconcile-interval", "0", *extra]  # fmt: skip


class AgentThread:
    """The stub agent served from a thread of its own (the CAA and forwarder are processes)."""

    def __init__(self, socket: Path) -> None:
        self.stub = StubAgent()
        self.socket = socket
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = Server()
        server.register(AGENT, self.stub)
        server.register(HEALTH, {"Check": lambda r, c: HEALTH.methods["Check"].response(status=1)})
        self._loop.run_until_complete(server.listen(f"unix://{self.socket}"))
        self._server = server
        self._ready.set()
        self._loop.run_until_complete(server.serve_forever())

    def __enter__(self) -> AgentThread:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(grace=1), self._loop).result(10)
        self._thread.join(10)


def _wait_for(predicate, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- tests -------------------------------------------------------------------------------------
def test_create_start_reach_agent_stop(libvirtd: Libvirtd, tiny: Path, work: Path,
                                       goclient: Path) -> None:  # fmt: skip
    port = _free_port()
    hv = work / "hv.sock"
    args = _caa_args(libvirtd, tiny, work, "--kernel-arg", f"relay=10.0.2.2:{port}",
                     "--proxy-timeout", "180s")  # fmt: skip
    podns = work / "podns"
    podns.write_text("")
    with contextlib.ExitStack() as stack:
        agent = stack.enter_context(AgentThread(work / "agent.sock"))
        caa = stack.enter_context(caa_process(args, work / "caa.log", hv))
        assert _read_field1(call(goclient, hv, HV, "Version", b"")["payload"]) == "0.0.0"
        created = call(goclient, hv, HV, "CreateVM", create_vm(SID, POD))
        assert created["code"] == 0, created
        agent_socket = _read_field1(created["payload"])
        assert agent_socket == str(work / "pods" / SID / "agent.ttrpc")
        start = stack.enter_context(call_bg(goclient, hv, HV, "StartVM", _field(1, SID)))
        # inside the "VM": process-user-data reads the config drive, the forwarder serves
        iso = _wait_for(lambda: (libvirtd.data_dir / NAME / "cidata.iso").exists()
                        and libvirtd.data_dir / NAME / "cidata.iso", "config drive")  # fmt: skip
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
        assert NAME in libvirtd.virsh("list", "--name").split()
        xml = libvirtd.virsh("dumpxml", NAME)
        assert f"sandbox='{SID}'" in xml or f'sandbox="{SID}"' in xml
        # the shim's agent calls, through the CAA's proxy, the VM, the forwarder
        reply = call(goclient, Path(agent_socket), "grpc.AgentService", "CreateContainer",
                     _field(1, "c1"))  # fmt: skip
        assert reply["code"] == 0, reply
        got = agent.stub.requests[-1]
        assert got.container_id == "c1"
        assert [(n.Type, n.Path) for n in got.OCI.Linux.Namespaces] == [("network", str(podns))]
        info = call(goclient, hv, "podvminfo.PodVMInfo", "GetInfo",
                    _field(1, "web") + _field(2, "default"))  # fmt: skip
        assert _read_field1(info["payload"]) == libvirtd.virsh("domuuid", NAME).strip()

        # kill -9 the CAA: the VM stays, and the restarted CAA serves the pod again
        caa.kill()
        caa.wait()
        stack.enter_context(caa_process(args, work / "caa2.log", hv))
        assert NAME in libvirtd.domains()
        reply = call(goclient, Path(agent_socket), "grpc.AgentService", "CreateContainer",
                     _field(1, "c2"))  # fmt: skip
        assert reply["code"] == 0, reply
        assert agent.stub.requests[-1].container_id == "c2"

        stopped = call(goclient, hv, HV, "StopVM", _field(1, SID))
        assert stopped["code"] == 0
        assert NAME not in libvirtd.domains()
        assert not (libvirtd.data_dir / NAME).exists()
        assert not (work / "pods" / SID).exists()


def test_caa_killed_mid_create_leaves_no_domain_and_a_silent_vm_is_deleted(
    libvirtd: Libvirtd,
    tiny: Path,
    work: Path,
    goclient: Path,
) -> None:
    hv = work / "hv.sock"
    with caa_process(_caa_args(libvirtd, tiny, work), work / "caa.log", hv) as caa:
        assert call(goclient, hv, HV, "CreateVM", create_vm(SID, POD))["code"] == 0
        start = call_bg(goclient, hv, HV, "StartVM", _field(1, SID))
        _wait_for(lambda: NAME in libvirtd.domains(), "the domain")
        caa.kill()  # kill -9 while StartVM waits for the VM
        caa.wait()
        out, _ = start.communicate(timeout=60)
        assert json.loads(out)["code"] != 0  # the shim's call failed
    assert NAME in libvirtd.domains()  # the orphan
    state = json.loads((work / "pods" / SID / "sandbox.json").read_text())
    assert state["state"] == "starting"
    args = _caa_args(libvirtd, tiny, work, "--proxy-timeout", "3s")
    with caa_process(args, work / "caa2.log", hv):
        assert NAME not in libvirtd.domains()  # reconcile at start deleted it
        assert not (libvirtd.data_dir / NAME).exists()
        state = json.loads((work / "pods" / SID / "sandbox.json").read_text())
        assert state["state"] == "created"
        assert "no live sandbox owns it" in (work / "caa2.log").read_text()
        # the sandbox survived the restart: StartVM again; the VM never answers (no forwarder)
        started = call(goclient, hv, HV, "StartVM", _field(1, SID))
        assert started["code"] == 2
        assert (
            f"StartVM {SID}: creating VM {NAME}: agent proxy: the forwarder at"
            in (started["message"])
        )
        assert "did not answer within 3 s" in started["message"]
        assert NAME not in libvirtd.domains()
        assert call(goclient, hv, HV, "StopVM", _field(1, SID))["code"] == 0


def test_provider_failure_mid_create_leaves_nothing(libvirtd: Libvirtd, tiny: Path, work: Path,
                                                    goclient: Path) -> None:  # fmt: skip
    broken = libvirtd.base / "broken"
    if not broken.exists():
        broken.mkdir()
        for f in ("initrd.img", "root.img"):
            (broken / f).write_bytes((tiny / f).read_bytes())
        (broken / "vmlinuz").write_bytes(b"not a kernel" * 100)
        for p in (broken, *broken.iterdir()):
            p.chmod(0o755)
    hv = work / "hv.sock"
    with caa_process(_caa_args(libvirtd, broken, work), work / "caa.log", hv):
        assert call(goclient, hv, HV, "CreateVM", create_vm(SID, POD))["code"] == 0
        started = call(goclient, hv, HV, "StartVM", _field(1, SID))
        assert started["code"] == 2
        assert started["message"].startswith(
            f"StartVM {SID}: creating VM {NAME}: libvirt provider: creating domain {NAME}:"
        )
        assert "\n" not in started["message"]
        assert libvirtd.domains() == []
        assert not (libvirtd.data_dir / NAME).exists()


@pytest.mark.parametrize(
    ("annotations", "extra", "message"),
    [
        ({}, [], "expected the annotations io.kubernetes.cri.sandbox-name and "
                 "io.kubernetes.cri.sandbox-namespace, found []"),
        ({**POD, "io.katacontainers.config.hypervisor.default_vcpus": "two"}, [],
         "default_vcpus: expected a decimal number, found 'two'"),
        ({**POD, "io.katacontainers.config.hypervisor.default_memory": "128"}, [],
         "default_memory: expected at least 256 (MiB), found 128"),
        ({**POD, "io.katacontainers.config.hypervisor.machine_type": "huge"},
         ["--instance-types", "small=1x512,large=2x2048"],
         "instance type: expected one of small, large, found 'huge'"),
        ({**POD, "io.katacontainers.config.hypervisor.cc_init_data": "version = 1"}, [],
         "cc_init_data: missing 'algorithm'"),
    ],
)  # fmt: skip
def test_bad_create_vm_requests_are_refused(libvirtd: Libvirtd, tiny: Path, work: Path,
                                            goclient: Path, annotations: dict, extra: list,
                                            message: str) -> None:  # fmt: skip
    hv = work / "hv.sock"
    with caa_process(_caa_args(libvirtd, tiny, work, *extra), work / "caa.log", hv):
        reply = call(goclient, hv, HV, "CreateVM", create_vm(SID, annotations))
        assert reply["code"] == 3, reply
        assert message in reply["message"]
        assert not (work / "pods" / SID).exists()
        # a sandbox id that is not a plain name
        reply = call(goclient, hv, HV, "CreateVM", create_vm("../../etc", POD))
        assert reply["code"] == 3 and "sandbox id" in reply["message"]
        reply = call(goclient, hv, HV, "StartVM", _field(1, "nope"))
        assert reply["code"] == 5 and "no sandbox 'nope'" in reply["message"]


def test_reconcile_timer_deletes_only_this_caas_orphans(libvirtd: Libvirtd, tiny: Path,
                                                        work: Path, goclient: Path) -> None:  # fmt: skip
    from coco.host.peerpods.provider import InstanceTypeSpec, Tags
    from coco.host.peerpods.providers.libvirt import LibvirtConfig, LibvirtProvider

    provider = LibvirtProvider(LibvirtConfig(uri=libvirtd.uri, image=tiny, memory=256, cpu=1,
                                             data_dir=libvirtd.data_dir))  # fmt: skip

    def define(name: str, caa: str) -> None:  # a VM left behind (defined in one step)
        xml = provider.domain_xml(name, InstanceTypeSpec(), Tags(caa, "gone"), work, 0, False)
        provider.conn().defineXML(xml)

    try:
        args = _caa_args(libvirtd, tiny, work, "--caa-id", "caa-a")
        args[args.index("--reconcile-interval") + 1] = "1s"
        with caa_process(args, work / "caa.log", hv := work / "hv.sock"):
            define("podvm-theirs-1", "caa-b")
            define("podvm-ours-1", "caa-a")
            _wait_for(lambda: "podvm-ours-1" not in libvirtd.domains(), "the timer's reconcile", 60)
            assert "podvm-theirs-1" in libvirtd.domains()  # another CAA's VM is left alone
            assert call(goclient, hv, HV, "Version", b"")["code"] == 0
        assert "podvm-theirs-1" in libvirtd.domains()
        libvirtd.virsh("undefine", "podvm-theirs-1")
    finally:
        provider.teardown()
