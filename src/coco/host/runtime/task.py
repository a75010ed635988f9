"""``containerd.task.v2.Task`` for one pod: each task call turned into kata agent calls.

In upstream's order (kata shim, ``virtcontainers``): the sandbox task's Create starts the sandbox
with the pod's initdata, then ``Health.Check``, ``CreateSandbox``, ``GetGuestDetails`` and
``CreateContainer`` of the pause container (``image_guest_pull`` storage with source ``pause``);
an app container's Create is ``CreateContainer`` with an ``image_guest_pull`` storage of the CRI
image name (the host-side rootfs is never used); Start is ``StartContainer`` (``ExecProcess`` for
an exec), then the stdio copiers, then ``WaitProcess`` once both outputs reached EOF, which gives
the exit code and the ``/tasks/exit`` event. Delete of an app container is ``SignalProcess``
(all, SIGKILL), ``WaitProcess`` and ``RemoveContainer``; of the sandbox, the same for every
container left, ``DestroySandbox`` and the sandbox's stop. A task without CRI annotations
(``ctr run``) is a single container: its own sandbox, no pause container.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2, timestamp_pb2

from coco.errors import CocoError
from coco.host.runtime import ShimError, sandbox
from coco.host.runtime import config as rconfig
from coco.host.runtime import initdata as rinitdata
from coco.host.runtime import spec as rspec
from coco.host.runtime.events import Publisher, now
from coco.host.runtime.stdio import Stdio
from coco.jsonio import loads as json_loads
from coco.rpc import Client, Code, RpcError, Stub
from coco.rpc.protos import agent_pb2, health_pb2, oci_pb2, runtimeoptions_pb2
from coco.rpc.protos import containerd_events_pb2 as ev
from coco.rpc.protos import containerd_shim_pb2 as pb
from coco.rpc.protos import containerd_task_types_pb2 as types
from coco.rpc.protos.containerd_mount_pb2 import Mount
from coco.rpc.service import Service

log = logging.getLogger(__name__)

AGENT = Service.from_proto(agent_pb2, "AgentService")
HEALTH = Service.from_proto(health_pb2, "Health")
RUNTIME_FILE = "coco-runtime.json"  # in the bundle: what `delete` needs after a crash

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
NETNS = "coco.netns"  # to the sandbox: the pod's network namespace path
IMAGE_NAME = "io.kubernetes.cri.image-name"
VERSION = "coco-v2"
DEFAULT_CALL_TIMEOUT = 60.0
CHECK_FIRST_WAIT = 0.5  # seconds the first Health.Check waits for its answer; each next one
CHECK_MAX_WAIT = 8.0  # waits twice as long as the last, up to this


async def connect_agent(address: str, timeout: float) -> Client:
    """A connection to the agent at ``address`` that has answered ``Health.Check``, within
    ``timeout`` s (``[agent.kata] dial_timeout``). Dialing is retried while nothing accepts. Once
    connected, the check is sent again on the same connection until the agent answers, never on
    a new one: a virtio-serial port is one byte stream, what the host wrote before the guest's
    agent opened it is lost, and a second connection would not reach the agent. A busy agent may
    answer late, so each check waits twice as long as the last (from :data:`CHECK_FIRST_WAIT`
    up to :data:`CHECK_MAX_WAIT` s); an answer to an earlier one is ignored."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client = await Client.connect(address, timeout=5)
            break
        except RpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    health = Stub(client, HEALTH)
    wait = CHECK_FIRST_WAIT
    try:
        while True:
            left = deadline - time.monotonic()
            try:
                await health.Check(health_pb2.CheckRequest(), timeout=max(min(wait, left), 0.1))
                return client
            except RpcError as e:
                if e.code != Code.DEADLINE_EXCEEDED:
                    raise  # the connection ended, or the agent answered with an error
                if time.monotonic() >= deadline:
                    raise RpcError(
                        Code.DEADLINE_EXCEEDED,
                        f"agent at {address}: no answer to Health.Check within {timeout:g} s "
                        "([agent.kata] dial_timeout)",
                    ) from None
            wait = min(wait * 2, CHECK_MAX_WAIT)
    except BaseException:
        await client.close()
        raise


def _status(code: int, text: str) -> RpcError:
    return RpcError(code, text)


@dataclass
class Process:
    cid: str
    exec_id: str  # containerd's ("" for the init process)
    agent_exec_id: str  # the agent's: the container id for init, a fresh uuid for an exec
    stdio: Stdio
    spec: oci_pb2.Process | None = None
    pid: int = 0
    status: int = types.CREATED
    exit_status: int = 0
    exited_at: timestamp_pb2.Timestamp = field(default_factory=timestamp_pb2.Timestamp)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    waiter: asyncio.Task | None = None


@dataclass
class Container:
    id: str
    bundle: str
    kind: str  # pod_sandbox | pod_container | single_container
    init: Process
    rootfs: list[Mount]
    execs: dict[str, Process] = field(default_factory=dict)


class TaskService:
    """The service object registered on the shim's ttRPC server (one per shim process)."""

    def __init__(self, namespace: str, publisher: Publisher, on_empty) -> None:
        self.namespace = namespace
        self.events = publisher
        self.on_empty = on_empty  # called when Shutdown finds no task left
        self.containers: dict[str, Container] = {}
        self.sandbox: sandbox.Sandbox | None = None
        self.sandbox_id = ""
        self.config: rconfig.RuntimeConfig | None = None
        self.client: Client | None = None
        self.agent: Any = None
        self.health: Any = None
        self._lock = asyncio.Lock()

    # -- helpers ---------------------------------------------------------------------------------
    def _container(self, cid: str) -> Container:
        c = self.containers.get(cid)
        if c is None:
            raise _status(Code.NOT_FOUND, f"container {cid}: not found")
        return c

    def _process(self, cid: str, exec_id: str) -> Process:
        c = self._container(cid)
        if not exec_id:
            return c.init
        p = c.execs.get(exec_id)
        if p is None:
            raise _status(Code.NOT_FOUND, f"exec {exec_id} of container {cid}: not found")
        return p

    async def _agent_call(self, method: str, request, *, timeout: float | None = None, what=""):
        if self.agent is None:
            raise _status(Code.FAILED_PRECONDITION, "the sandbox is not running")
        try:
            return await getattr(self.agent, method)(
                request, timeout=DEFAULT_CALL_TIMEOUT if timeout is None else timeout
            )
        except RpcError as e:
            raise RpcError(
                e.code, f"agent {method}{' ' + what if what else ''}: {e.message}"
            ) from None

    # -- sandbox ---------------------------------------------------------------------------------
    async def _start_sandbox(self, sid: str, spec: dict[str, Any], options) -> None:
        config_path = None
        if options is not None and options.type_url.endswith("runtimeoptions.v1.Options"):
            config_path = runtimeoptions_pb2.Options.FromString(options.value).config_path or None
        self.config = rconfig.load(config_path or os.environ.get("COCO_SHIM_CONFIG_PATH"))
        annotations = dict(spec.get("annotations") or {})
        initdata = rinitdata.from_annotations(annotations)
        for ns in (spec.get("linux") or {}).get("namespaces") or []:
            if ns.get("type") == "network" and ns.get("path"):  # the pod's, from CNI
                annotations[NETNS] = ns["path"]
        sb = sandbox.make(self.config, sid)
        self.sandbox, self.sandbox_id = sb, sid
        try:
            address = await asyncio.to_thread(sb.start, initdata, annotations)
            self.client = await connect_agent(address, self.config.dial_timeout)
            self.agent = Stub(self.client, AGENT)
            self.health = Stub(self.client, HEALTH)
            await self._agent_call("CreateSandbox", self._sandbox_request(sid, spec))
            try:
                await self._agent_call(
                    "GetGuestDetails",
                    agent_pb2.GuestDetailsRequest(mem_block_size=True, mem_hotplug_probe=True),
                )
            except RpcError as e:  # the details are not needed to run the pod: go on, but say so
                log.warning("sandbox %s: going on without the guest's details: %s", sid, e.message)
        except BaseException:
            await self._stop_sandbox()
            raise

    @staticmethod
    def _sandbox_request(sid: str, spec: dict[str, Any]) -> agent_pb2.CreateSandboxRequest:
        dns: list[str] = []
        for m in spec.get("mounts") or []:
            if m.get("destination") == "/etc/resolv.conf" and m.get("source"):
                with contextlib.suppress(OSError):
                    dns = Path(m["source"]).read_text().split("\n")
        return agent_pb2.CreateSandboxRequest(
            hostname=(spec.get("hostname") or "")[:64], dns=dns, sandbox_id=sid
        )

    async def _stop_sandbox(self) -> None:
        if self.agent is not None:
            with contextlib.suppress(RpcError):
                await self.agent.DestroySandbox(agent_pb2.DestroySandboxRequest(), timeout=30)
        if self.client is not None:
            await self.client.close()
        self.client = self.agent = self.health = None
        if self.sandbox is not None:
            sb, self.sandbox = self.sandbox, None
            await asyncio.to_thread(sb.stop)

    # -- Task service ----------------------------------------------------------------------------
    async def Create(self, req: pb.CreateTaskRequest, ctx) -> pb.CreateTaskResponse:
        async with self._lock:
            if req.id in self.containers:
                raise _status(Code.ALREADY_EXISTS, f"container {req.id}: already exists")
            spec = self._read_spec(req.bundle)
            annotations = spec.get("annotations") or {}
            ctype = annotations.get(CONTAINER_TYPE)
            kind = {"sandbox": "pod_sandbox", "container": "pod_container"}.get(
                ctype or "", "single_container"
            )
            if kind == "pod_container":
                sid = annotations.get(SANDBOX_ID, "")
                if self.agent is None or sid != self.sandbox_id:
                    raise _status(
                        Code.FAILED_PRECONDITION,
                        f"container {req.id}: its sandbox {sid or '(none)'} does not run in this "
                        f"shim (sandbox {self.sandbox_id or 'none'})",
                    )
            elif self.sandbox is not None:
                raise _status(
                    Code.FAILED_PRECONDITION,
                    f"container {req.id}: this shim already runs sandbox {self.sandbox_id}",
                )
            if kind != "pod_sandbox" and not annotations.get(IMAGE_NAME):
                raise _status(
                    Code.INVALID_ARGUMENT,
                    f"container {req.id}: expected the annotation {IMAGE_NAME} (the image the "
                    f"guest pulls; with ctr: --annotation {IMAGE_NAME}=REF), found none",
                )
            try:
                if kind != "pod_container":
                    await self._start_sandbox(
                        req.id, spec, req.options if req.HasField("options") else None
                    )
                proc = Process(
                    req.id, "", req.id, Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
                )
                try:
                    await self._create_container(req.id, req.bundle, kind, spec)
                except BaseException:
                    if kind != "pod_container":
                        await self._stop_sandbox()
                    raise
            except CocoError as e:
                if isinstance(e, RpcError):
                    raise
                raise _status(Code.FAILED_PRECONDITION, f"container {req.id}: {e}") from None
            proc.pid = self.sandbox.pid if self.sandbox else os.getpid()
            if kind != "pod_container":
                assert self.config is not None
                record = {"config_path": self.config.path, "sandbox_id": req.id}
                (Path(req.bundle) / RUNTIME_FILE).write_text(json.dumps(record))
            self.containers[req.id] = Container(req.id, req.bundle, kind, proc, list(req.rootfs))
            self.events.publish(
                ev.TaskCreate(
                    container_id=req.id,
                    bundle=req.bundle,
                    rootfs=req.rootfs,
                    io=ev.TaskIO(
                        stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal
                    ),
                    pid=proc.pid,
                )
            )
            return pb.CreateTaskResponse(pid=proc.pid)

    @staticmethod
    def _read_spec(bundle: str) -> dict[str, Any]:
        path = Path(bundle) / "config.json"
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise _status(Code.INVALID_ARGUMENT, f"{path}: cannot read it: {e.strerror}") from None
        spec = json_loads(raw, what=str(path), error=ShimError)
        if not isinstance(spec, dict):
            raise _status(Code.INVALID_ARGUMENT, f"{path}: expected a JSON object")
        return spec

    async def _create_container(self, cid: str, bundle: str, kind: str, spec: dict) -> None:
        annotations = {str(k): str(v) for k, v in (spec.get("annotations") or {}).items()}
        proto, sandbox_pidns = rspec.constrain(rspec.to_proto(spec), cid, kind, bundle)
        source = "pause" if kind == "pod_sandbox" else annotations[IMAGE_NAME]
        storage = rspec.guest_pull_storage(cid, source, annotations)
        del proto.Mounts[:]
        proto.Mounts.extend(await self._guest_mounts(cid, spec))
        request = agent_pb2.CreateContainerRequest(
            container_id=cid,
            exec_id=cid,
            storages=[storage],
            OCI=proto,
            sandbox_pidns=sandbox_pidns,
        )
        assert self.config is not None
        await self._agent_call(
            "CreateContainer", request, timeout=self.config.create_container_timeout, what=cid
        )

    async def _guest_mounts(self, cid: str, spec: dict) -> list[oci_pb2.Mount]:
        """Mounts as the guest sees them (kata with ``shared_fs=none``): a bind of a host file is
        copied into the guest with CopyFile and the mount points at the copy; a bind of a host
        directory is dropped, except ``/dev/shm`` which stays a tmpfs."""
        out = []
        for i, m in enumerate(spec.get("mounts") or []):
            mount = rspec.fill(oci_pb2.Mount(), m, f"config.json mounts[{i}]")
            is_bind = mount.type == "bind" or "bind" in mount.options or "rbind" in mount.options
            if not is_bind:
                out.append(mount)
                continue
            src = Path(mount.source)
            if mount.destination == "/dev/shm":
                out.append(oci_pb2.Mount(destination="/dev/shm", source="shm", type="tmpfs",
                                         options=["nosuid", "noexec", "nodev", "mode=1777"]))  # fmt: skip
            elif src.is_file():
                guest = (
                    f"{rspec.SHARED_DIR}/{cid}-{os.urandom(8).hex()}-{Path(mount.destination).name}"
                )
                data = src.read_bytes()
                st = src.stat()
                await self._agent_call(
                    "CopyFile",
                    agent_pb2.CopyFileRequest(
                        path=guest,
                        file_size=len(data),
                        file_mode=st.st_mode,
                        dir_mode=0o750,
                        uid=st.st_uid,
                        gid=st.st_gid,
                        offset=0,
                        data=data,
                    ),
                    what=guest,
                )
                mount.source = guest
                out.append(mount)
            else:
                log.info("container %s: host directory mount %s not shared", cid, mount.destination)
        return out

    async def Start(self, req: pb.StartRequest, ctx) -> pb.StartResponse:
        async with self._lock:
            c = self._container(req.id)
            p = self._process(req.id, req.exec_id)
            if p.status != types.CREATED:
                raise _status(Code.FAILED_PRECONDITION, f"{_name(p)}: already started")
            if req.exec_id:
                await self._agent_call(
                    "ExecProcess",
                    agent_pb2.ExecProcessRequest(
                        container_id=c.id, exec_id=p.agent_exec_id, process=p.spec
                    ),
                    what=_name(p),
                )
            else:
                await self._agent_call(
                    "StartContainer", agent_pb2.StartContainerRequest(container_id=c.id), what=c.id
                )
            p.status = types.RUNNING
            if req.exec_id:
                p.pid = c.init.pid
                self.events.publish(
                    ev.TaskExecStarted(container_id=c.id, exec_id=req.exec_id, pid=p.pid)
                )
            else:
                self.events.publish(ev.TaskStart(container_id=c.id, pid=p.pid))
            p.stdio.start(self.agent, c.id, p.agent_exec_id)
            p.waiter = asyncio.create_task(self._wait_exit(p))
            return pb.StartResponse(pid=p.pid)

    async def _wait_exit(self, p: Process) -> None:
        await p.stdio.outputs_done()
        try:
            reply = await self.agent.WaitProcess(
                agent_pb2.WaitProcessRequest(container_id=p.cid, exec_id=p.agent_exec_id),
                timeout=None,
            )
            status = reply.status & 0xFFFFFFFF
        except (RpcError, AttributeError) as e:
            log.warning("%s: WaitProcess: %s", _name(p), e)
            status = 255
        self._mark_exited(p, status)

    def _mark_exited(self, p: Process, status: int) -> None:
        if p.exited.is_set():
            return
        p.exit_status = status
        p.exited_at = now()
        p.status = types.STOPPED
        p.exited.set()
        p.stdio.close()
        self.events.publish(
            ev.TaskExit(
                container_id=p.cid,
                id=p.exec_id or p.cid,
                pid=p.pid,
                exit_status=p.exit_status,
                exited_at=p.exited_at,
            )
        )

    async def Wait(self, req: pb.WaitRequest, ctx) -> pb.WaitResponse:
        p = self._process(req.id, req.exec_id)
        await p.exited.wait()
        return pb.WaitResponse(exit_status=p.exit_status, exited_at=p.exited_at)

    async def Kill(self, req: pb.KillRequest, ctx) -> empty_pb2.Empty:
        c = self._container(req.id)
        p = self._process(req.id, req.exec_id)
        if p.status == types.STOPPED and req.signal in (signal.SIGKILL, signal.SIGTERM):
            return empty_pb2.Empty()
        if p.status == types.CREATED and not req.exec_id:
            # never started: nothing runs in the guest but the created process; kill it there
            pass
        await self._agent_call(
            "SignalProcess",
            agent_pb2.SignalProcessRequest(
                container_id=c.id, exec_id=p.agent_exec_id if req.exec_id else "", signal=req.signal
            ),
            what=_name(p),
        )
        if p.status == types.CREATED:  # no waiter runs: the exit is ours to report
            self._mark_exited(p, 128 + req.signal)
        return empty_pb2.Empty()

    async def Exec(self, req: pb.ExecProcessRequest, ctx) -> empty_pb2.Empty:
        async with self._lock:
            c = self._container(req.id)
            if req.exec_id in c.execs:
                raise _status(
                    Code.ALREADY_EXISTS, f"exec {req.exec_id} of {req.id}: already exists"
                )
            doc = json_loads(req.spec.value, what=f"exec {req.exec_id} spec", error=ShimError)
            process = rspec.fill(oci_pb2.Process(), doc, f"exec {req.exec_id} process")
            c.execs[req.exec_id] = Process(
                c.id, req.exec_id, str(uuid.uuid4()),
                Stdio(req.stdin, req.stdout, req.stderr, req.terminal), spec=process,
            )  # fmt: skip
            self.events.publish(ev.TaskExecAdded(container_id=c.id, exec_id=req.exec_id))
            return empty_pb2.Empty()

    async def Delete(self, req: pb.DeleteRequest, ctx) -> pb.DeleteResponse:
        async with self._lock:
            c = self._container(req.id)
            p = self._process(req.id, req.exec_id)
            if req.exec_id:
                if p.status == types.RUNNING:
                    raise _status(Code.FAILED_PRECONDITION, f"{_name(p)}: still running")
                del c.execs[req.exec_id]
                return pb.DeleteResponse(
                    pid=p.pid, exit_status=p.exit_status, exited_at=p.exited_at
                )
            if p.status == types.RUNNING:
                raise _status(Code.FAILED_PRECONDITION, f"container {c.id}: still running")
            if c.kind == "pod_sandbox":
                for other in [x for x in self.containers.values() if x is not c]:
                    await self._remove(other)
            await self._remove(c)
            if c.kind != "pod_container":
                await self._stop_sandbox()
            if not p.exited.is_set():
                self._mark_exited(p, 137)
            self.events.publish(
                ev.TaskDelete(
                    container_id=c.id, pid=p.pid, exit_status=p.exit_status,
                    exited_at=p.exited_at, id=c.id,
                )
            )  # fmt: skip
            return pb.DeleteResponse(pid=p.pid, exit_status=p.exit_status, exited_at=p.exited_at)

    async def _remove(self, c: Container) -> None:
        """Stop a container as kata does, then remove it in the guest."""
        self.containers.pop(c.id, None)
        if self.agent is None:
            return
        if not c.init.exited.is_set():
            with contextlib.suppress(RpcError):
                await self.agent.SignalProcess(
                    agent_pb2.SignalProcessRequest(container_id=c.id, exec_id="", signal=9),
                    timeout=DEFAULT_CALL_TIMEOUT,
                )
        with contextlib.suppress(RpcError):
            await self.agent.WaitProcess(
                agent_pb2.WaitProcessRequest(container_id=c.id, exec_id=c.id), timeout=30
            )
        try:
            await self.agent.RemoveContainer(
                agent_pb2.RemoveContainerRequest(container_id=c.id), timeout=DEFAULT_CALL_TIMEOUT
            )
        except RpcError as e:
            log.warning("RemoveContainer %s: %s", c.id, e)
        for p in [c.init, *c.execs.values()]:
            p.stdio.close()
            if p.waiter is not None:
                p.waiter.cancel()
            if not p.exited.is_set():
                self._mark_exited(p, 137)

    async def State(self, req: pb.StateRequest, ctx) -> pb.StateResponse:
        c = self._container(req.id)
        p = self._process(req.id, req.exec_id)
        return pb.StateResponse(
            id=c.id, bundle=c.bundle, pid=p.pid, status=p.status, stdin=p.stdio.stdin,
            stdout=p.stdio.stdout, stderr=p.stdio.stderr, terminal=p.stdio.terminal,
            exit_status=p.exit_status, exited_at=p.exited_at, exec_id=req.exec_id,
        )  # fmt: skip

    async def Pids(self, req: pb.PidsRequest, ctx) -> pb.PidsResponse:
        c = self._container(req.id)
        return pb.PidsResponse(processes=[types.ProcessInfo(pid=c.init.pid)])

    async def CloseIO(self, req: pb.CloseIORequest, ctx) -> empty_pb2.Empty:
        p = self._process(req.id, req.exec_id)
        if req.stdin:
            await p.stdio.close_stdin()
            with contextlib.suppress(RpcError):
                await self._agent_call(
                    "CloseStdin",
                    agent_pb2.CloseStdinRequest(container_id=p.cid, exec_id=p.agent_exec_id),
                )
        return empty_pb2.Empty()

    async def ResizePty(self, req: pb.ResizePtyRequest, ctx) -> empty_pb2.Empty:
        p = self._process(req.id, req.exec_id)
        await self._agent_call(
            "TtyWinResize",
            agent_pb2.TtyWinResizeRequest(
                container_id=p.cid, exec_id=p.agent_exec_id, row=req.height, column=req.width
            ),
        )
        return empty_pb2.Empty()

    async def Pause(self, req: pb.PauseRequest, ctx) -> empty_pb2.Empty:
        self._container(req.id)
        await self._agent_call(
            "PauseContainer", agent_pb2.PauseContainerRequest(container_id=req.id)
        )
        self.events.publish(ev.TaskPaused(container_id=req.id))
        return empty_pb2.Empty()

    async def Resume(self, req: pb.ResumeRequest, ctx) -> empty_pb2.Empty:
        self._container(req.id)
        await self._agent_call(
            "ResumeContainer", agent_pb2.ResumeContainerRequest(container_id=req.id)
        )
        self.events.publish(ev.TaskResumed(container_id=req.id))
        return empty_pb2.Empty()

    async def Update(self, req: pb.UpdateTaskRequest, ctx) -> empty_pb2.Empty:
        self._container(req.id)
        doc = json_loads(req.resources.value or b"{}", what="Update resources", error=ShimError)
        resources = rspec.fill(oci_pb2.LinuxResources(), doc, "Update resources")
        await self._agent_call(
            "UpdateContainer",
            agent_pb2.UpdateContainerRequest(container_id=req.id, resources=resources),
        )
        return empty_pb2.Empty()

    async def Connect(self, req: pb.ConnectRequest, ctx) -> pb.ConnectResponse:
        c = self.containers.get(req.id)
        task_pid = c.init.pid if c else 0
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=task_pid, version=VERSION)

    async def Shutdown(self, req: pb.ShutdownRequest, ctx) -> empty_pb2.Empty:
        if not self.containers or req.now:
            self.on_empty()
        return empty_pb2.Empty()

    async def shutdown_all(self) -> None:
        """The shim is stopping (SIGTERM): remove what is left and stop the sandbox."""
        async with self._lock:
            for c in list(self.containers.values()):
                await self._remove(c)
            await self._stop_sandbox()

    async def Checkpoint(self, req, ctx):
        raise _status(Code.UNIMPLEMENTED, "Checkpoint: not implemented (the guest owns the state)")

    async def Stats(self, req, ctx):
        raise _status(Code.UNIMPLEMENTED, "Stats: not implemented")


def _name(p: Process) -> str:
    return f"exec {p.exec_id} of {p.cid}" if p.exec_id else f"container {p.cid}"


def decode_options(data: bytes) -> str | None:
    """The ConfigPath from a runtime options Any (``start``'s stdin), or None."""
    if not data:
        return None
    from google.protobuf import any_pb2

    try:
        wrapped = any_pb2.Any.FromString(data)
        if wrapped.type_url.endswith("runtimeoptions.v1.Options"):
            return runtimeoptions_pb2.Options.FromString(wrapped.value).config_path or None
    except Exception as e:  # a foreign options type: not ours to read
        log.info("runtime options not read: %s", e)
    return None
