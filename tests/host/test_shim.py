"""containerd-shim-coco-v2 driven by a real containerd (Debian's 1.6) through ``ctr``, with the
``local`` sandbox (the guest services and ``coco agent serve`` on the host, insecure), plus the
pieces a run does not reach: config refusals, the OCI names, the initdata, the address."""

from __future__ import annotations

import base64
import gzip
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coco.host.runtime import ShimError
from coco.host.runtime import config as rconfig
from coco.host.runtime import initdata as rinitdata
from coco.host.runtime import spec as rspec
from coco.host.runtime.shim import socket_address
from coco.integrity.initdata import Initdata
from coco.rpc.ocispec import json_key
from coco.rpc.protos import containerd_shim_pb2 as pb

SHIM = str(Path(sys.executable).parent / "containerd-shim-coco-v2")
IMAGE_NAME = "io.kubernetes.cri.image-name"
POLICY = "io.katacontainers.config.agent.policy"
INITDATA = "io.katacontainers.config.hypervisor.cc_init_data"
ALLOWED = [
    "CreateSandboxRequest",
    "DestroySandboxRequest",
    "GuestDetailsRequest",
    "CopyFileRequest",
    "StartContainerRequest",
    "RemoveContainerRequest",
    "ExecProcessRequest",
    "SignalProcessRequest",
    "WaitProcessRequest",
    "ReadStreamRequest",
    "WriteStreamRequest",
    "CloseStdinRequest",
    "TtyWinResizeRequest",
    "UpdateContainerRequest",
    "StatsContainerRequest",
]


# -- pieces ------------------------------------------------------------------------------------------
def test_config_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    ok = rconfig.parse({"hypervisor": {"local": {}}, "runtime": {"state_dir": "/x"}})
    assert ok.kind == "local" and ok.insecure and ok.state_dir == Path("/x")
    cases = [
        ({"hypervisor": {}}, "exactly one [hypervisor.<kind>]"),
        ({"hypervisor": {"qemu": {}, "local": {}}}, "exactly one"),
        ({"hypervisor": {"firecracker": {}}}, "unknown sandbox kind"),
        ({"hypervisor": {"qemu": {"imgae": "x"}}}, "imgae: unknown key"),
        ({"hypervisor": {"qemu": {"default_memory": "1G"}}}, "expected int, found str"),
        ({"hypervisor": {"local": {}}, "agent": {"kata": {"dial_timeout": 0}}}, "expected > 0"),
        ({"hypervisor": {"local": {}}, "runtime": {"state_dir": "rel"}}, "absolute path"),
    ]
    for doc, text in cases:
        with pytest.raises(ShimError, match=text.replace("[", r"\[").replace(".", r"\.")):
            rconfig.parse(doc, "c.toml")
    bad = tmp_path / "c.toml"
    bad.write_bytes(b"[hypervisor.local\n")
    with pytest.raises(ShimError, match=f"runtime config {bad}: expected UTF-8 TOML"):
        rconfig.load(str(bad))


def test_oci_names_and_upstream_constraints() -> None:
    assert [json_key(n) for n in ("UIDMappings", "OOMScoreAdj", "HostID", "CPU", "Version",
            "errnoret", "L3CacheSchema", "Pagesize", "destination")] == [
        "uidMappings", "oomScoreAdj", "hostID", "cpu", "ociVersion", "errnoRet",
        "l3CacheSchema", "pageSize", "destination"]  # fmt: skip
    import json

    doc = json.loads(
        Path("/work/shared/vectors/cri/containerd-1.6-container.config.json").read_text()
        if Path("/work/shared/vectors/cri").exists()
        else "{}"
    )
    if not doc:
        pytest.skip("CRI vectors not present")
    doc["annotations"][POLICY] = "cGFja2FnZSB4"
    doc["hooks"] = {"prestart": [{"path": "/bin/true"}]}
    spec, pidns = rspec.constrain(rspec.to_proto(doc), "c1", "pod_container", "/b")
    assert pidns is True  # the pid namespace had a path: join the sandbox's
    assert spec.Process.Args[0] == "/bin/sh" and spec.Process.Capabilities.Bounding
    assert spec.Root.Path == "/run/kata-containers/c1/rootfs"
    assert [n.Type for n in spec.Linux.Namespaces] == ["ipc", "uts", "mount"]
    assert all(n.Path == "" for n in spec.Linux.Namespaces)
    assert not spec.HasField("Hooks") and POLICY not in spec.Annotations
    assert spec.Annotations["io.katacontainers.pkg.oci.container_type"] == "pod_container"
    assert spec.Linux.CgroupsPath.startswith("/k8s.io/")
    with pytest.raises(ShimError, match=r"config.json.process.args: value"):
        rspec.to_proto({"process": {"args": "not-a-list-of-strings" and [1]}})


def test_initdata_from_the_pod_annotations() -> None:
    policy = "package agent_policy\ndefault X := \"'''\"\n"
    b64 = base64.b64encode(policy.encode()).decode()
    raw = rinitdata.from_annotations({POLICY: b64})
    assert raw is not None
    assert Initdata.parse(raw).data["policy.rego"] == policy  # quotes survive the TOML
    assert rinitdata.from_annotations({}) is None
    other = rinitdata.document("package agent_policy\n")
    packed = base64.b64encode(gzip.compress(other)).decode()
    assert rinitdata.from_annotations({INITDATA: packed}) == other
    with pytest.raises(ShimError, match="expected one policy, found two different ones"):
        rinitdata.from_annotations({INITDATA: packed, POLICY: b64})
    with pytest.raises(ShimError, match=f"annotation {POLICY}: expected the policy as standard"):
        rinitdata.from_annotations({POLICY: "%%%"})


def test_one_address_per_pod() -> None:
    a = socket_address("/run/containerd/containerd.sock", "k8s.io", "sb1")
    assert (
        a.startswith("unix:///run/containerd/s/")
        and len(a) == len("unix:///run/containerd/s/") + 64
    )
    assert a == socket_address("/run/containerd/containerd.sock", "k8s.io", "sb1")
    assert a != socket_address("/run/containerd/containerd.sock", "default", "sb1")


class _LateAgent:
    """A Unix socket standing in for the VM's virtio-serial port while the guest's agent starts:
    one byte stream, where the first ``lost`` requests arrive before the agent opened the port and
    are never answered; Health.Check requests after those are answered SERVING."""

    def __init__(self, lost: int) -> None:
        self.lost = lost
        self.connections = 0
        self.requests: list[str] = []

    async def serve(self, reader, writer) -> None:
        from coco.rpc import frames
        from coco.rpc.protos import health_pb2, ttrpc_pb2

        self.connections += 1
        while (frame := await frames.read_frame(reader)) is not None:
            req = ttrpc_pb2.Request.FromString(frame.body)
            self.requests.append(f"{req.service}/{req.method}")
            if len(self.requests) <= self.lost:
                continue
            answer = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
            body = ttrpc_pb2.Response(payload=answer.SerializeToString()).SerializeToString()
            writer.write(frames.encode(frame.stream_id, frames.MessageType.RESPONSE, body))
            await writer.drain()


def _with_late_agent(tmp_path: Path, agent: _LateAgent, timeout: float):
    import asyncio

    from coco.host.runtime.task import connect_agent

    async def go():
        sock = tmp_path / "agent.sock"
        server = await asyncio.start_unix_server(agent.serve, path=str(sock))
        try:
            client = await connect_agent(f"unix://{sock}", timeout)
            await client.close()
        finally:
            server.close()

    asyncio.run(go())


def test_health_check_is_sent_again_on_the_same_connection(tmp_path: Path) -> None:
    agent = _LateAgent(lost=2)
    _with_late_agent(tmp_path, agent, timeout=60)
    assert agent.requests == ["grpc.Health/Check"] * 3
    assert agent.connections == 1  # never a new connection to probe


def test_health_check_gives_up_at_the_dial_timeout(tmp_path: Path) -> None:
    from coco.rpc import Code, RpcError

    agent = _LateAgent(lost=1_000_000)
    with pytest.raises(RpcError) as e:
        _with_late_agent(tmp_path, agent, timeout=2)
    assert e.value.code == Code.DEADLINE_EXCEEDED
    assert e.value.message == (
        f"agent at unix://{tmp_path}/agent.sock: no answer to Health.Check within 2 s "
        "([agent.kata] dial_timeout)"
    )
    assert len(agent.requests) >= 2 and agent.connections == 1


# -- with containerd ---------------------------------------------------------------------------------
def _policy(deny_create: bool) -> str:
    lines = ["package agent_policy", "", "default AllowRequestsFailingPolicy := false"]
    lines += [f"default {name} := true" for name in ALLOWED]
    lines.append(f"default CreateContainerRequest := {'false' if deny_create else 'true'}")
    return "\n".join(lines) + "\n"


def _initdata(registry: str, policy: str) -> str:
    cdh = (
        '[kbc]\nname = "offline_fs_kbc"\n\n'
        f'[[image.registry_config.registry]]\nlocation = "{registry}"\ninsecure = true\n'
    )
    import json

    raw = (
        'version = "0.1.0"\nalgorithm = "sha384"\n\n[data]\n'
        f'"cdh.toml" = {json.dumps(cdh)}\n"policy.rego" = {json.dumps(policy)}\n'
    ).encode()
    return base64.b64encode(gzip.compress(raw)).decode()


@pytest.fixture
def local_runtime(tmp_path: Path) -> Path:
    state = tmp_path / "st"
    cfg = tmp_path / "coco-local.toml"
    cfg.write_text(
        f'[hypervisor.local]\n\n[agent.kata]\ndial_timeout = 60\n\n[runtime]\nstate_dir = "{state}"\n'
    )
    return cfg


def _ctr_run(containerd, ns: str, cfg: Path, image: str, cid: str, *cmd: str, policy: str,
             timeout: float = 240) -> subprocess.CompletedProcess[str]:  # fmt: skip
    registry = image.split("/")[0]
    return subprocess.run(
        ["ctr", "--address", str(containerd.address), "-n", ns, "run", "--rm",
         "--fifo-dir", str(cfg.parent / "fifo"),
         "--runtime", SHIM, "--runtime-config-path", str(cfg),
         "--annotation", f"{IMAGE_NAME}={image}",
         "--annotation", f"{INITDATA}={_initdata(registry, policy)}",
         image, cid, *cmd],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def _leftovers(state: Path, cid: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            shim = "containerd-shim-coco-v2" in cmd or "coco.host.runtime.shim" in cmd
            if str(state) in cmd or (shim and f"-id {cid} " in cmd + " "):
                found.append(f"pid {pid}: {cmd}")
    mounts = Path("/proc/self/mounts").read_text()
    found += [m for m in mounts.splitlines() if str(state) in m or cid in m]
    if state.exists() and any(state.iterdir()):
        found.append(f"state left: {sorted(p.name for p in state.iterdir())}")
    return found


NO_DETAILS = "going on without the guest's details"  # the shim's warning


def _log_since(containerd, offset: int) -> str:
    """containerd's log (which carries the shim's) from ``offset`` on."""
    with containerd.log.open(errors="replace") as f:
        f.seek(offset)
        return f.read()


def _pull(containerd, ns: str, image: str) -> None:
    containerd.ctr("-n", ns, "images", "pull", "--plain-http", image)


@pytest.mark.slow
def test_ctr_run_local(containerd, test_images, local_runtime: Path) -> None:
    ns = "coco-shim"
    _pull(containerd, ns, test_images.busybox)
    log_start = containerd.log.stat().st_size
    events = subprocess.Popen(
        ["ctr", "--address", str(containerd.address), "events"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)  # subscribed
        run = _ctr_run(
            containerd, ns, local_runtime, test_images.busybox, "shim-t1",
            "/bin/sh", "-c", "echo hello-from-guest; echo to-stderr >&2; exit 7",
            policy=_policy(deny_create=False),
        )  # fmt: skip
        time.sleep(0.5)
    finally:
        events.terminate()
        seen = events.communicate(timeout=10)[0]
    assert "hello-from-guest" in run.stdout, run.stderr
    assert "to-stderr" in run.stdout + run.stderr
    assert run.returncode == 7, run.stderr
    # the shim's events reached containerd, in order, for this task
    ours = [m.group(1) for ln in seen.splitlines() if '"shim-t1"' in ln
            for m in [re.search(r" (/tasks/\S+) ", ln)] if m]  # fmt: skip
    assert ours == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], seen
    assert NO_DETAILS not in _log_since(containerd, log_start)  # ALLOWED names the agent's rules
    deadline = time.monotonic() + 20
    while _leftovers(local_runtime.parent / "st", "shim-t1") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _leftovers(local_runtime.parent / "st", "shim-t1") == []


@pytest.mark.slow
def test_policy_denied_container_names_the_rule(containerd, test_images, local_runtime) -> None:
    ns = "coco-shim"
    _pull(containerd, ns, test_images.busybox)
    run = _ctr_run(
        containerd, ns, local_runtime, test_images.busybox, "shim-denied", "/bin/true",
        policy=_policy(deny_create=True),
    )  # fmt: skip
    assert run.returncode != 0
    assert "CreateContainerRequest is blocked by policy" in run.stderr, run.stderr
    deadline = time.monotonic() + 20
    while _leftovers(local_runtime.parent / "st", "shim-denied") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _leftovers(local_runtime.parent / "st", "shim-denied") == []


@pytest.mark.slow
def test_denied_guest_details_is_logged(containerd, test_images, local_runtime) -> None:
    """The shim does not need the guest's details to run the pod: a policy that denies
    GetGuestDetails does not stop it, and the shim's log says so with the agent's reason."""
    ns = "coco-shim"
    _pull(containerd, ns, test_images.busybox)
    log_start = containerd.log.stat().st_size
    policy = _policy(deny_create=False).replace("default GuestDetailsRequest := true\n", "")
    assert "GuestDetailsRequest" not in policy
    run = _ctr_run(
        containerd, ns, local_runtime, test_images.busybox, "shim-nodetails",
        "/bin/sh", "-c", "echo ran", policy=policy,
    )  # fmt: skip
    assert (run.returncode, run.stdout.strip()) == (0, "ran"), run.stderr
    said = [ln for ln in _log_since(containerd, log_start).splitlines() if NO_DETAILS in ln]
    assert len(said) == 1, said
    assert "agent GetGuestDetails: GuestDetailsRequest is blocked by policy" in said[0], said
    deadline = time.monotonic() + 20
    while _leftovers(local_runtime.parent / "st", "shim-nodetails") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _leftovers(local_runtime.parent / "st", "shim-nodetails") == []


def test_delete_prints_a_delete_response(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    out = subprocess.run(
        [SHIM, "-namespace", "n", "-address", "/x.sock", "-id", "gone", "-bundle", str(bundle),
         "delete"],
        cwd=bundle, capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    reply = pb.DeleteResponse.FromString(out.stdout)
    assert reply.exit_status == 137 and reply.exited_at.seconds > 0


def _run_detached(containerd, ns: str, cfg: Path, image: str, cid: str) -> None:
    registry = image.split("/")[0]
    subprocess.run(
        ["ctr", "--address", str(containerd.address), "-n", ns, "run", "-d",
         "--fifo-dir", str(cfg.parent / "fifo"),
         "--runtime", SHIM, "--runtime-config-path", str(cfg),
         "--annotation", f"{IMAGE_NAME}={image}",
         "--annotation", f"{INITDATA}={_initdata(registry, _policy(deny_create=False))}",
         image, cid, "/bin/sleep", "300"],
        capture_output=True, text=True, timeout=240, check=True,
    )  # fmt: skip


def _remove(containerd, ns: str, cid: str) -> None:
    containerd.ctr("-n", ns, "task", "kill", "-s", "KILL", cid, check=False)
    deadline = time.monotonic() + 30
    while containerd.ctr("-n", ns, "task", "delete", cid, check=False).returncode != 0:
        if containerd.ctr("-n", ns, "task", "ls", "-q", check=False).stdout.count(cid) == 0:
            break
        assert time.monotonic() < deadline, "task not deleted"
        time.sleep(0.3)
    containerd.ctr("-n", ns, "containers", "delete", cid, check=False)


@pytest.mark.slow
def test_exec_in_a_running_container(containerd, test_images, local_runtime: Path) -> None:
    ns, cid = "coco-shim", "shim-exec"
    state = local_runtime.parent / "st"
    _pull(containerd, ns, test_images.busybox)
    _run_detached(containerd, ns, local_runtime, test_images.busybox, cid)
    try:
        run = containerd.ctr(
            "-n", ns, "task", "exec", "--fifo-dir", str(local_runtime.parent / "fifo"),
            "--exec-id", "e1", cid, "/bin/sh", "-c", "echo from-exec; exit 4", check=False,
        )  # fmt: skip
        assert "from-exec" in run.stdout, run.stderr
        assert run.returncode == 4, run.stderr
    finally:
        _remove(containerd, ns, cid)
    deadline = time.monotonic() + 20
    while _leftovers(state, cid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _leftovers(state, cid) == []


@pytest.mark.slow
def test_kill_9_of_the_shim_then_delete_cleans_up(containerd, test_images, local_runtime) -> None:
    ns, cid = "coco-shim", "shim-k9"
    state = local_runtime.parent / "st"
    _pull(containerd, ns, test_images.busybox)
    _run_detached(containerd, ns, local_runtime, test_images.busybox, cid)
    bundle = containerd.state / "io.containerd.runtime.v2.task" / ns / cid
    shim_pid = int((bundle / "shim.pid").read_text())
    assert (state / cid).is_dir()  # the sandbox runs
    os.kill(shim_pid, 9)
    _remove(containerd, ns, cid)
    deadline = time.monotonic() + 20
    while _leftovers(state, cid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _leftovers(state, cid) == []
    assert not bundle.exists()
