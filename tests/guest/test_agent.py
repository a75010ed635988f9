"""``coco agent serve`` through a pod's life, driven by coco.rpc's client playing the kata shim.

The agent runs as a subprocess (root, runc, a Unix socket in a tmp dir, its container root in a
tmp dir); the app container's image is pulled in the "guest" by a real ``coco cdh serve`` from
the session's docker-registry; the pause and app containers come from the OCI specs containerd
1.6 really wrote (../shared/vectors/cri), changed the way the kata shim changes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coco.guest.agent.ocispec import process_from_json, spec_from_json
from coco.rpc import Code, RpcError, Stub, SyncClient
from coco.rpc.protos import agent_pb2 as pb
from coco.rpc.protos import health_pb2
from coco.rpc.services import AGENT, HEALTH
from tests.conftest import Registry
from tests.imagekit import tar_layer
from tests.integrity.genpolicy.helpers import push

CRI = Path("/work/shared/vectors/cri")
BUSYBOX = Path("/usr/bin/busybox")
SID = "d81bc230d1d4546af738ac7978148a2e8ced81d8b18461adae547c90b8e2e24d"
CID = "e2d3c4f98dd4f1cd6536a07132c72b813a4932714693404dbc86fef43c103984"
KATA = "/run/kata-containers"
SHARED = f"{KATA}/shared/containers"
APPLETS = ("sh", "sleep", "echo", "cat", "hostname", "ls", "true", "id", "ip", "grep", "mount")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the agent runs containers: root is needed"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static is not installed"),
]


# --- the shim's side ------------------------------------------------------------------------------


def cri_spec(kind: str) -> dict[str, Any]:
    return json.loads((CRI / f"containerd-1.6-{kind}.config.json").read_text())


class Shim:
    """The kata shim's calls, in its order, over one ttRPC connection."""

    def __init__(self, address: str) -> None:
        self.client = SyncClient(address)
        self.agent = Stub(self.client, AGENT, timeout=120)
        self.health = Stub(self.client, HEALTH, timeout=30)

    def close(self) -> None:
        self.client.close()

    def copy_file(self, cid: str, name: str, data: bytes, mode: int = 0o100644) -> str:
        """What the shim does with shared_fs=none for a bind mount's file; returns the path."""
        path = f"{SHARED}/{cid}-{secrets.token_hex(8)}-{name}"
        self.agent.CopyFile(
            pb.CopyFileRequest(
                path=path, file_size=len(data), file_mode=mode, dir_mode=0o750, data=data
            )
        )
        return path

    def create_sandbox(self, doc: dict[str, Any]) -> None:
        self.agent.CreateSandbox(
            pb.CreateSandboxRequest(
                hostname=doc["hostname"],
                dns=["nameserver 10.0.0.10", "search default.svc.cluster.local", ""],
                storages=[SHM_STORAGE],
                sandbox_id=SID,
            )
        )

    def grpc_spec(self, doc: dict[str, Any], cid: str, kind: str) -> tuple[Any, bool]:
        """constrainGRPCSpec + handlePidNamespace + the mount rewriting of the kata shim."""
        doc = json.loads(json.dumps(doc))
        doc.pop("hooks", None)
        linux = doc["linux"]
        linux.pop("seccomp", None)
        res = linux.get("resources", {})
        for k in ("devices", "pids", "blockIO", "network"):
            res.pop(k, None)
        if "cpu" in res:
            res["cpu"].update(cpus="", mems="")
        sandbox_pidns = False
        spaces = []
        for ns in linux["namespaces"]:
            if ns["type"] in ("network", "cgroup", "time"):
                continue
            if ns["type"] == "pid":
                sandbox_pidns = bool(ns.get("path"))
                continue
            spaces.append({"type": ns["type"], "path": ""})
        linux["namespaces"] = spaces
        doc["root"]["path"] = f"{KATA}/{cid}/rootfs"
        for m in doc["mounts"]:
            if m["type"] != "bind":
                continue
            if m["destination"] == "/dev/shm":
                m["source"] = f"{KATA}/sandbox/shm"
            else:
                name = m["destination"].rsplit("/", 1)[-1]
                text = {"hostname": "accpod\n", "hosts": "127.0.0.1 localhost\n"}.get(
                    name, "nameserver 10.0.0.10\n"
                )
                m["source"] = self.copy_file(cid, name, text.encode())
        anno = doc["annotations"]
        anno["io.katacontainers.pkg.oci.bundle_path"] = (
            f"/run/containerd/io.containerd.runtime.v2.task/k8s.io/{cid}"
        )
        anno["io.katacontainers.pkg.oci.container_type"] = (
            "pod_sandbox" if kind == "sandbox" else "pod_container"
        )
        if kind == "sandbox":
            anno["nerdctl/network-namespace"] = linux["namespaces"] and (
                "/var/run/netns/cni-838ce491-82e7-29c2-3a4f-f98d2196eb80"
            )
        return spec_from_json(doc), sandbox_pidns

    def create_container(self, cid: str, kind: str, image: str, doc: dict[str, Any]) -> None:
        spec, pidns = self.grpc_spec(doc, cid, kind)
        meta = json.dumps({"metadata": dict(spec.Annotations)})
        storage = pb.Storage(
            driver="image_guest_pull",
            driver_options=[f"image_guest_pull={meta}"],
            source=image,
            fstype="overlay",
            mount_point=f"{KATA}/{cid}/rootfs",
        )
        self.agent.CreateContainer(
            pb.CreateContainerRequest(
                container_id=cid, exec_id=cid, storages=[storage], OCI=spec, sandbox_pidns=pidns
            )
        )

    def read_all(self, cid: str, eid: str, stderr: bool = False) -> bytes:
        """The ReadStdout/ReadStderr loop until empty data (EOF)."""
        read = self.agent.ReadStderr if stderr else self.agent.ReadStdout
        out = b""
        while True:
            data = read(pb.ReadStreamRequest(container_id=cid, exec_id=eid, len=32768)).data
            if not data:
                return out
            out += data

    def read_until(self, cid: str, needle: bytes) -> bytes:
        out = b""
        while needle not in out:
            data = self.agent.ReadStdout(
                pb.ReadStreamRequest(container_id=cid, exec_id=cid, len=32768)
            ).data
            assert data, f"EOF before {needle!r}; got {out!r}"
            out += data
        return out

    def wait(self, cid: str, eid: str) -> int:
        return self.agent.WaitProcess(pb.WaitProcessRequest(container_id=cid, exec_id=eid)).status

    def exec(self, cid: str, args: list[str], terminal: bool = False) -> str:
        eid = str(uuid.uuid4())
        proc = process_from_json(
            {"args": args, "env": ["PATH=/bin"], "cwd": "/", "terminal": terminal,
             "user": {"uid": 0, "gid": 0}}
        )  # fmt: skip
        self.agent.ExecProcess(pb.ExecProcessRequest(container_id=cid, exec_id=eid, process=proc))
        return eid


SHM_STORAGE = pb.Storage(
    driver="ephemeral",
    source="shm",
    fstype="tmpfs",
    options=["noexec", "nosuid", "nodev", "mode=1777", "size=67108864"],
    mount_point=f"{KATA}/sandbox/shm",
)


# --- the guest's side -----------------------------------------------------------------------------


@dataclass
class Guest:
    root: Path
    socket: str
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start: {log.read_text(errors='replace')}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cleanup_root(root: Path) -> list[str]:
    """Remove every container, dm device and mount the agent may have left under ``root``;
    returns what was left (so a test can assert there was nothing)."""
    left = []
    runc_root = root / ".runc"
    if runc_root.exists():
        out = subprocess.run(
            ["runc", "--root", str(runc_root), "list", "-q"], capture_output=True, text=True
        ).stdout.split()
        for cid in out:
            left.append(f"runc container {cid}")
            subprocess.run(["runc", "--root", str(runc_root), "delete", "-f", cid],
                           capture_output=True)  # fmt: skip
    real = os.path.realpath(root)
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp == real or mp.startswith(real + "/"):
                mounts.append(mp)
    for mp in sorted(set(mounts), key=len, reverse=True):
        left.append(f"mount {mp}")
        subprocess.run(["umount", "-l", mp], capture_output=True)
    return left


@pytest.fixture(scope="module")
def busybox_image(open_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    files: dict[str, bytes | str | None] = {"bin/busybox": BUSYBOX.read_bytes(), "tmp/": None}
    files.update({f"bin/{a}": "->busybox" for a in APPLETS})
    layer = tar_layer(files, mode=0o755)
    return push(open_registry, tmp_path_factory.mktemp("agent-img"), "agent/busybox", [layer],
                {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]})  # fmt: skip


@pytest.fixture(scope="module")
def cdh(tmp_path_factory: pytest.TempPathFactory, open_registry: Registry) -> Iterator[str]:
    d = tmp_path_factory.mktemp("agent-cdh")
    sock = d / "cdh.sock"
    (d / "resources.json").write_text("{}")
    (d / "cdh.toml").write_text(
        f'socket = "unix://{sock}"\n[kbc]\nname = "offline_fs_kbc"\n'
        f'[image]\nwork_dir = "{d / "work"}"\n'
        f'[[image.registry_config.registry]]\nlocation = "{open_registry.host}"\ninsecure = true\n'
    )
    env = {**os.environ, "OFFLINE_FS_KBC_EXTRA_FILE_PATH": str(d / "resources.json")}
    log = d / "cdh.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coco.cli.main", "cdh", "serve", "--config", str(d / "cdh.toml")],
            env=env, stdout=logf, stderr=logf,
        )  # fmt: skip
    try:
        _wait_for(sock, proc, log, "coco cdh serve")
        yield f"unix://{sock}"
    finally:
        _stop(proc)


def pause_bundle(d: Path) -> Path:
    b = d / "pause_bundle"
    (b / "rootfs/bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, b / "rootfs/bin/busybox")
    (b / "rootfs/bin/sleep").symlink_to("busybox")
    (b / "config.json").write_text(json.dumps({
        "ociVersion": "1.0.2",
        "process": {"args": ["/bin/sleep", "2147483647"], "cwd": "/", "env": ["PATH=/bin"],
                    "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
    }))  # fmt: skip
    return b


@contextlib.contextmanager
def run_agent(
    d: Path, *, cdh_socket: str = "unix:///nonexistent/cdh.sock", args: tuple[str, ...] = ()
) -> Iterator[Guest]:
    root = d / "kata"
    sock = d / "agent.sock"
    cfg = d / "agent.toml"
    cfg.write_text(
        f'server_addr = "unix://{sock}"\ncontainer_root = "{root}"\n'
        f'cdh_socket = "{cdh_socket}"\npause_bundle = "{pause_bundle(d)}"\n'
        f'initdata_dir = "{d / "initdata"}"\n'
    )
    log = d / "agent.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coco.cli.main", "-v", "agent", "serve", "--config", str(cfg),
             *args],
            stdout=logf, stderr=logf,
        )  # fmt: skip
    try:
        _wait_for(sock, proc, log, "coco agent serve")
        yield Guest(root, f"unix://{sock}", proc, log)
    finally:
        _stop(proc)
        cleanup_root(root)


@pytest.fixture
def guest(tmp_path: Path, cdh: str) -> Iterator[Guest]:
    with run_agent(tmp_path, cdh_socket=cdh) as g:
        yield g


@pytest.fixture
def shim(guest: Guest) -> Iterator[Shim]:
    s = Shim(guest.socket)
    try:
        yield s
    finally:
        s.close()


def start_pod(shim: Shim, image: str) -> None:
    assert shim.health.Check(health_pb2.CheckRequest()).status == 1  # SERVING
    shim.create_sandbox(cri_spec("sandbox"))
    details = shim.agent.GetGuestDetails(
        pb.GuestDetailsRequest(mem_block_size=True, mem_hotplug_probe=True)
    )
    assert "image_guest_pull" in details.agent_details.storage_handlers
    shim.create_container(SID, "sandbox", "pause", cri_spec("sandbox"))
    shim.agent.StartContainer(pb.StartContainerRequest(container_id=SID))
    shim.create_container(CID, "container", image, cri_spec("container"))
    shim.agent.StartContainer(pb.StartContainerRequest(container_id=CID))


def _code(call) -> tuple[int, str]:
    with pytest.raises(RpcError) as e:
        call()
    return e.value.code, e.value.message


# --- tests ----------------------------------------------------------------------------------------


def test_pod_life(guest: Guest, shim: Shim, busybox_image: str) -> None:
    start_pod(shim, busybox_image)
    out = shim.read_until(CID, b"accpod\n")
    assert out.startswith(b"hello-from-cri\naccpod\n")  # the sandbox's UTS namespace, its name

    # the image was pulled in the guest into the bundle; the agent wrote the host's spec there
    bundle = guest.root / CID
    assert (bundle / "rootfs/bin/busybox").exists()
    config = json.loads((bundle / "config.json").read_text())
    assert config["process"]["args"][:2] == ["/bin/sh", "-c"]
    pidns = [n for n in config["linux"]["namespaces"] if n["type"] == "pid"]
    assert pidns and pidns[0]["path"].startswith("/proc/")  # joins the pause container's

    eid = shim.exec(CID, ["/bin/sh", "-c", "echo exec-out; echo exec-err >&2; exit 3"])
    assert shim.read_all(CID, eid) == b"exec-out\n"
    assert shim.read_all(CID, eid, stderr=True) == b"exec-err\n"
    assert shim.wait(CID, eid) == 3
    code, msg = _code(lambda: shim.wait(CID, eid))
    assert code == Code.NOT_FOUND and eid in msg

    # stdin: written, then closed by an empty write
    eid = shim.exec(CID, ["/bin/cat"])
    n = shim.agent.WriteStdin(pb.WriteStreamRequest(container_id=CID, exec_id=eid, data=b"ping\n"))
    assert n.len == 5
    shim.agent.WriteStdin(pb.WriteStreamRequest(container_id=CID, exec_id=eid, data=b""))
    assert shim.read_all(CID, eid) == b"ping\n"
    assert shim.wait(CID, eid) == 0

    # a tty: one stream (the pty), resizable
    eid = shim.exec(CID, ["/bin/sh", "-c", "sleep 0.2; echo tty-ok"], terminal=True)
    shim.agent.TtyWinResize(
        pb.TtyWinResizeRequest(container_id=CID, exec_id=eid, row=40, column=100)
    )
    assert b"tty-ok" in shim.read_all(CID, eid)
    assert shim.wait(CID, eid) == 0
    code, msg = _code(lambda: shim.agent.TtyWinResize(
        pb.TtyWinResizeRequest(container_id=CID, exec_id=CID, row=1, column=1)))  # fmt: skip
    assert (code, msg) == (Code.UNAVAILABLE, "no tty")

    # sh has no SIGTERM handler: the agent sends SIGKILL instead; 128 + 9
    shim.agent.SignalProcess(pb.SignalProcessRequest(container_id=CID, exec_id="", signal=15))
    # the shim reads to EOF first: sh's child `sleep 300` still holds the pipe, so the agent
    # drains it for 500 ms after sh's exit and then answers EOF (no hang, no error)
    rest = shim.read_all(CID, CID)
    assert b"hello-from-cri" not in rest
    assert shim.wait(CID, CID) == 137
    code, _ = _code(lambda: shim.read_all(CID, CID))  # reaped: the process is gone
    assert code == Code.NOT_FOUND
    # the shim's stop path: kill all, a second wait (NOT_FOUND, ignored), remove
    code, _ = _code(lambda: shim.agent.SignalProcess(
        pb.SignalProcessRequest(container_id=CID, exec_id="", signal=9)))  # fmt: skip
    assert code == Code.NOT_FOUND
    code, _ = _code(lambda: shim.wait(CID, CID))
    assert code == Code.NOT_FOUND
    shim.agent.RemoveContainer(pb.RemoveContainerRequest(container_id=CID))
    assert not bundle.exists()
    code, msg = _code(lambda: shim.agent.StartContainer(pb.StartContainerRequest(container_id=CID)))
    assert code == Code.INTERNAL and msg.startswith("Invalid container id")
    code, _ = _code(lambda: shim.wait(CID, CID))
    assert code == Code.INVALID_ARGUMENT

    shim.agent.DestroySandbox(pb.DestroySandboxRequest())
    guest.proc.wait(15)
    assert guest.proc.returncode == 0, guest.text()
    assert cleanup_root(guest.root) == []  # nothing left: no container, no mount


def test_bad_input_leaves_nothing(guest: Guest, shim: Shim, busybox_image: str) -> None:
    start_pod(shim, busybox_image)

    # an invalid container id (upstream's verify_id)
    spec, _ = shim.grpc_spec(cri_spec("container"), "-bad", "container")
    code, msg = _code(lambda: shim.agent.CreateContainer(
        pb.CreateContainerRequest(container_id="-bad", exec_id="-bad", OCI=spec)))  # fmt: skip
    assert code == Code.INTERNAL and msg.startswith("invalid container ID: '-bad'")

    # an image whose pull the CDH refuses: nothing of the container stays
    ghost = "c0ffee" * 10 + "abcd"
    ghost_doc = cri_spec("container")
    ghost_doc["linux"]["cgroupsPath"] = f"/k8s.io/{ghost}"
    code, msg = _code(lambda: shim.create_container(
        ghost, "container", busybox_image.replace("busybox", "missing"), ghost_doc))  # fmt: skip
    assert code == Code.INTERNAL
    assert "the Confidential Data Hub refused the pull" in msg and "agent/missing" in msg
    assert not (guest.root / ghost).exists()

    # another container's cgroup: refused before anything is mounted
    code, msg = _code(lambda: shim.create_container(
        ghost, "container", busybox_image, cri_spec("container")))  # fmt: skip
    assert code == Code.INVALID_ARGUMENT and f"is container {CID}'s" in msg
    assert not (guest.root / ghost).exists()

    # a binary that does not exist: create fails in runc, rolled back (storages, runc, bundle)
    doc = cri_spec("container")
    doc["process"]["args"] = ["/bin/nope"]
    doc["linux"]["cgroupsPath"] = f"/k8s.io/{ghost}"
    code, msg = _code(lambda: shim.create_container(ghost, "container", busybox_image, doc))
    assert code == Code.INTERNAL and "/bin/nope" in msg
    assert not (guest.root / ghost).exists()
    runc = subprocess.run(["runc", "--root", str(guest.root / ".runc"), "list", "-q"],
                          capture_output=True, text=True).stdout.split()  # fmt: skip
    assert ghost not in runc
    with open("/proc/self/mountinfo") as f:
        assert ghost not in f.read()

    # exec of a missing binary: INTERNAL with runc's reason; the container keeps running
    code, msg = _code(lambda: shim.exec(CID, ["/bin/nope"]))
    assert code == Code.INTERNAL and "/bin/nope" in msg
    assert shim.read_until(CID, b"hello-from-cri")

    # unknown fields are skipped by protobuf; a payload that is not the message: INTERNAL
    raw = pb.StartContainerRequest(container_id=CID).SerializeToString() + b"\xfa\x07\x03abc"
    assert pb.StartContainerRequest.FromString(raw).container_id == CID
    code, msg = _code(lambda: shim.client.call(
        "grpc.AgentService", "StartContainer", _Raw(b"\x0a\xff"), pb.StartContainerRequest))  # fmt: skip
    assert code == Code.INTERNAL and "unmarshalling" in msg
    # an oversized payload: RESOURCE_EXHAUSTED, and the agent keeps serving
    assert _oversized_answer(guest.socket) == (
        Code.RESOURCE_EXHAUSTED,
        f"message length {5 << 20} exceed maximum message size of 4194304",
    )
    assert shim.health.Check(health_pb2.CheckRequest()).status == 1

    # CopyFile outside the shared directory
    code, msg = _code(lambda: shim.agent.CopyFile(pb.CopyFileRequest(path="/etc/passwd")))
    assert code == Code.INVALID_ARGUMENT and "/run/kata-containers/shared/containers/" in msg

    # a method this agent does not carry out
    code, msg = _code(lambda: shim.agent.GetMetrics(pb.GetMetricsRequest()))
    assert (code, msg) == (Code.UNIMPLEMENTED, "/grpc.AgentService/GetMetrics is not supported")

    # a client that disconnects in the middle of a ReadStdout long poll
    eid = shim.exec(CID, ["/bin/sleep", "30"])
    other = Shim(guest.socket)
    other.client._loop.run_until_complete(_drop_mid_read(other, CID, eid))
    other.close()
    assert shim.health.Check(health_pb2.CheckRequest()).status == 1
    shim.agent.SignalProcess(pb.SignalProcessRequest(container_id=CID, exec_id=eid, signal=9))
    assert shim.wait(CID, eid) == 137


def _oversized_answer(address: str) -> tuple[int, str]:
    """Send one 5 MiB request frame on a raw socket; the status of the answer."""
    import socket
    import struct

    from coco.rpc.protos import ttrpc_pb2

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(address[len("unix://") :])
        s.sendall(struct.pack(">IIBB", 5 << 20, 1, 1, 0) + b"\0" * (5 << 20))
        head = s.recv(10, socket.MSG_WAITALL)
        length, sid, kind, _ = struct.unpack(">IIBB", head)
        assert (sid, kind) == (1, 2)  # the answer to stream 1
        body = s.recv(length, socket.MSG_WAITALL)
    status = ttrpc_pb2.Response.FromString(body).status
    return status.code, status.message


class _Raw:
    """A request whose bytes are given as is."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


async def _drop_mid_read(s: Shim, cid: str, eid: str) -> None:
    import asyncio

    call = asyncio.ensure_future(s.client._client.call(
        "grpc.AgentService", "ReadStdout",
        pb.ReadStreamRequest(container_id=cid, exec_id=eid, len=100), pb.ReadStreamResponse,
    ))  # fmt: skip
    await asyncio.sleep(0.3)
    assert not call.done()
    await s.client._client.close()
    with contextlib.suppress(Exception):
        await call


def test_stats_pause_resume_and_network(guest: Guest, shim: Shim, busybox_image: str) -> None:
    start_pod(shim, busybox_image)
    shim.read_until(CID, b"accpod")
    stats = shim.agent.StatsContainer(pb.StatsContainerRequest(container_id=CID))
    assert stats.cgroup_stats.pids_stats.current >= 1  # sh (and its children)
    assert stats.cgroup_stats.cpu_stats.cpu_usage.total_usage > 0
    shim.agent.PauseContainer(pb.PauseContainerRequest(container_id=CID))
    shim.agent.ResumeContainer(pb.ResumeContainerRequest(container_id=CID))
    code, msg = _code(
        lambda: shim.agent.PauseContainer(pb.PauseContainerRequest(container_id="zz"))
    )
    assert code == Code.INVALID_ARGUMENT
    ifaces = shim.agent.ListInterfaces(pb.ListInterfacesRequest()).Interfaces
    lo = next(i for i in ifaces if i.name == "lo")
    assert any(a.address == "127.0.0.1" and a.mask == "8" for a in lo.IPAddresses)
    routes = shim.agent.ListRoutes(pb.ListRoutesRequest()).Routes
    assert all(r.device for r in routes)
    code, msg = _code(lambda: shim.agent.UpdateInterface(pb.UpdateInterfaceRequest(
        interface={"name": "eth9", "hwAddr": "02:00:00:de:ad:01"})))  # fmt: skip
    assert code == Code.INTERNAL and msg.startswith("Link not found")  # what the shim retries on
    shim.agent.OnlineCPUMem(pb.OnlineCPUMemRequest(nb_cpus=1, cpu_only=True))
    v = shim.health.Version(health_pb2.CheckRequest())
    assert v.grpc_version == "0.0.1"
