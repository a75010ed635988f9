"""The ttRPC handlers of ``grpc.AgentService`` and ``grpc.Health``, with upstream's answers.

Every AgentService call is first judged by the policy gate (PERMISSION_DENIED naming the rule and
field; a denied ReadStdout/ReadStderr is answered with its data cleared, as upstream), then
carried out. Failures answer upstream's codes: INTERNAL with the error text by default,
INVALID_ARGUMENT / NOT_FOUND for an unknown container / process in the process calls,
UNAVAILABLE ``no tty``. Methods this agent does not carry out answer UNIMPLEMENTED
``/grpc.AgentService/<Method> is not supported``.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from coco import __version__
from coco.errors import CocoError
from coco.guest.agent import network
from coco.guest.agent.config import CONTAINER_ROOT, AgentConfig
from coco.guest.agent.errors import AgentError
from coco.guest.agent.ocispec import policy_input, spec_to_json
from coco.guest.agent.policy import PolicyGate
from coco.guest.agent.sandbox import Sandbox
from coco.guest.agent.storage import DRIVERS
from coco.rpc.protos import agent_pb2 as pb
from coco.rpc.protos import health_pb2
from coco.rpc.status import Code, RpcError

log = logging.getLogger(__name__)

API_VERSION = "0.0.1"
SHARED_PREFIX = CONTAINER_ROOT + "/shared/containers/"
MAX_COPY_CHUNK = 4 * 1024 * 1024

SUPPORTED = (
    "CreateSandbox", "DestroySandbox", "CreateContainer", "StartContainer", "RemoveContainer",
    "ExecProcess", "SignalProcess", "WaitProcess", "ReadStdout", "ReadStderr", "WriteStdin",
    "CloseStdin", "TtyWinResize", "UpdateInterface", "UpdateRoutes", "ListInterfaces",
    "ListRoutes", "GetGuestDetails", "OnlineCPUMem", "SetPolicy", "StatsContainer",
    "PauseContainer", "ResumeContainer", "CopyFile", "GetOOMEvent",
)  # fmt: skip


def _rpc(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Gate the request, run the handler, answer errors with their status."""

    @functools.wraps(method)
    async def handler(self: AgentService, req: Any, ctx: Any) -> Any:
        name = req.DESCRIPTOR.name
        self.gate_request(name, req)
        try:
            return await method(self, req, ctx)
        except RpcError:
            raise
        except AgentError as e:
            log.warning("%s: %s", name, e)
            raise RpcError(e.code, str(e)) from None
        except (CocoError, OSError) as e:
            log.warning("%s: %s", name, e)
            raise RpcError(Code.INTERNAL, str(e)) from None

    return handler


def policy_body(name: str, req: Any) -> dict[str, Any]:
    body = policy_input(req)
    if name == "CopyFileRequest":
        body.pop("data", None)
        mode = req.file_mode
        kind = (
            "Directory" if stat.S_ISDIR(mode) else "Symlink" if stat.S_ISLNK(mode)
            else "Regular" if stat.S_ISREG(mode) or mode & 0o170000 == 0 else "Unknown"
        )  # fmt: skip
        body["file_type"] = kind
        target = req.data.decode(errors="replace") if kind == "Symlink" else ""
        body["symlink_target"] = target
        body["symlink_src"] = target if kind == "Symlink" else None
    return body


class AgentService:
    def __init__(self, cfg: AgentConfig, sandbox: Sandbox, gate: PolicyGate) -> None:
        self.cfg = cfg
        self.sandbox = sandbox
        self.gate = gate

    def gate_request(self, name: str, req: Any) -> bool:
        if name == "SetPolicyRequest" and self.gate.allows_set_policy():
            return True
        if name == "ReadStreamRequest":
            return True  # judged after the read: a denial clears the data
        return self.gate.check(name, policy_body(name, req))

    # --- sandbox ----------------------------------------------------------------------------------

    @_rpc
    async def CreateSandbox(self, req: Any, ctx: Any) -> Any:
        await self.sandbox.create(req)
        return _empty()

    @_rpc
    async def DestroySandbox(self, req: Any, ctx: Any) -> Any:
        await self.sandbox.destroy()
        return _empty()

    # --- containers -------------------------------------------------------------------------------

    @_rpc
    async def CreateContainer(self, req: Any, ctx: Any) -> Any:
        doc = spec_to_json(req.OCI)
        await self.sandbox.create_container(req, doc, dict(req.OCI.Annotations))
        return _empty()

    @_rpc
    async def StartContainer(self, req: Any, ctx: Any) -> Any:
        await self.sandbox.start_container(req.container_id)
        return _empty()

    @_rpc
    async def RemoveContainer(self, req: Any, ctx: Any) -> Any:
        await self.sandbox.remove_container(req.container_id, req.timeout)
        return _empty()

    @_rpc
    async def ExecProcess(self, req: Any, ctx: Any) -> Any:
        await self.sandbox.exec_process(req)
        return _empty()

    @_rpc
    async def SignalProcess(self, req: Any, ctx: Any) -> Any:
        await self.sandbox.signal_process(req.container_id, req.exec_id, req.signal)
        return _empty()

    @_rpc
    async def WaitProcess(self, req: Any, ctx: Any) -> Any:
        code = await self.sandbox.wait_process(req.container_id, req.exec_id)
        return pb.WaitProcessResponse(status=code)

    @_rpc
    async def PauseContainer(self, req: Any, ctx: Any) -> Any:
        self.sandbox.container(req.container_id, Code.INVALID_ARGUMENT, "invalid container id")
        await self.sandbox.runc.pause(req.container_id)
        return _empty()

    @_rpc
    async def ResumeContainer(self, req: Any, ctx: Any) -> Any:
        self.sandbox.container(req.container_id, Code.INVALID_ARGUMENT, "invalid container id")
        await self.sandbox.runc.resume(req.container_id)
        return _empty()

    @_rpc
    async def StatsContainer(self, req: Any, ctx: Any) -> Any:
        self.sandbox.container(req.container_id, Code.INVALID_ARGUMENT, "invalid container id")
        data = await self.sandbox.runc.stats(req.container_id)
        return pb.StatsContainerResponse(cgroup_stats=_cgroup_stats(data))

    @_rpc
    async def GetOOMEvent(self, req: Any, ctx: Any) -> Any:
        cid = await self.sandbox.oom_events.get()
        return pb.OOMEvent(container_id=cid)

    # --- IO ---------------------------------------------------------------------------------------

    async def _read(self, req: Any, stdout: bool) -> Any:
        try:
            p = self.sandbox.find_process(req.container_id, req.exec_id)
            stream = p.stream(stdout)
            if stream is None:
                raise AgentError("Unable to determine stream reader, is None")
            data = await stream.read(req.len or 32 * 1024)
        except AgentError as e:
            raise RpcError(e.code, str(e)) from None
        allowed = self.gate.check_quietly(
            "ReadStreamRequest", policy_body("ReadStreamRequest", req)
        )
        return pb.ReadStreamResponse(data=data if allowed else b"")

    @_rpc
    async def ReadStdout(self, req: Any, ctx: Any) -> Any:
        return await self._read(req, True)

    @_rpc
    async def ReadStderr(self, req: Any, ctx: Any) -> Any:
        return await self._read(req, False)

    @_rpc
    async def WriteStdin(self, req: Any, ctx: Any) -> Any:
        try:
            p = self.sandbox.find_process(req.container_id, req.exec_id)
        except AgentError as e:
            raise AgentError(str(e), Code.INTERNAL) from None
        if not req.data:
            p.close_stdin()
            return pb.WriteStreamResponse(len=0)
        try:
            n = await p.write(req.data)
        except OSError as e:
            raise AgentError(f"Cannot get writer: {e.strerror}") from None
        return pb.WriteStreamResponse(len=n)

    @_rpc
    async def CloseStdin(self, req: Any, ctx: Any) -> Any:
        self.sandbox.find_process(req.container_id, req.exec_id).close_stdin()
        return _empty()

    @_rpc
    async def TtyWinResize(self, req: Any, ctx: Any) -> Any:
        p = self.sandbox.find_process(req.container_id, req.exec_id)
        if p.tty is None:
            raise AgentError("no tty", Code.UNAVAILABLE)
        p.resize(req.row, req.column)
        return _empty()

    # --- network ----------------------------------------------------------------------------------

    @_rpc
    async def UpdateInterface(self, req: Any, ctx: Any) -> Any:
        return await network.update_interface(req.interface)

    @_rpc
    async def UpdateRoutes(self, req: Any, ctx: Any) -> Any:
        return await network.update_routes(list(req.routes.Routes))

    @_rpc
    async def ListInterfaces(self, req: Any, ctx: Any) -> Any:
        return await network.list_interfaces()

    @_rpc
    async def ListRoutes(self, req: Any, ctx: Any) -> Any:
        return await network.list_routes()

    # --- guest ------------------------------------------------------------------------------------

    @_rpc
    async def GetGuestDetails(self, req: Any, ctx: Any) -> Any:
        resp = pb.GuestDetailsResponse()
        if req.mem_block_size:
            try:
                text = Path("/sys/devices/system/memory/block_size_bytes").read_text().strip()
                resp.mem_block_size_bytes = int(text, 16)
            except (OSError, ValueError):
                resp.mem_block_size_bytes = 0
        if req.mem_hotplug_probe:
            resp.support_mem_hotplug_probe = os.path.exists("/sys/devices/system/memory/probe")
        d = resp.agent_details
        d.version = __version__
        d.init_daemon = os.getpid() == 1
        d.storage_handlers.extend(DRIVERS)
        d.supports_seccomp = True  # runc applies the spec's seccomp profile
        d.extra_features.append("agent-policy")
        return resp

    @_rpc
    async def OnlineCPUMem(self, req: Any, ctx: Any) -> Any:
        onlined = 0
        for cpu in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/online")):
            if req.nb_cpus and onlined >= req.nb_cpus:
                break
            if cpu.read_text().strip() == "0":
                cpu.write_text("1")
                onlined += 1
        if not req.cpu_only:
            for mem in Path("/sys/devices/system/memory").glob("memory[0-9]*/state"):
                if mem.read_text().strip() == "offline":
                    mem.write_text("online")
        return _empty()

    @_rpc
    async def SetPolicy(self, req: Any, ctx: Any) -> Any:
        self.gate.set_policy(req.policy)
        return _empty()

    @_rpc
    async def CopyFile(self, req: Any, ctx: Any) -> Any:
        copy_file(self.cfg, req)
        return _empty()


def copy_file(cfg: AgentConfig, req: Any) -> None:
    """CopyFile: only below the shared directory; parents made with ``dir_mode``; a regular
    file lands as ``<name>.tmp`` and is renamed when ``file_size`` bytes are there."""
    if not req.path.startswith(SHARED_PREFIX) or len(req.path) == len(SHARED_PREFIX):
        raise AgentError(
            f"CopyFile {req.path!r}: expected a path under {SHARED_PREFIX}", Code.INVALID_ARGUMENT
        )
    rel = req.path[len(SHARED_PREFIX) :]
    if any(part in ("", ".", "..") for part in rel.rstrip("/").split("/")):
        raise AgentError(
            f"CopyFile {req.path!r}: '.', '..' or empty components", Code.INVALID_ARGUMENT
        )
    base = Path(cfg.shared_dir)
    path = base / rel.rstrip("/")
    base.mkdir(parents=True, exist_ok=True)
    d = base
    for part in path.relative_to(base).parts[:-1]:
        d = d / part
        if d.is_symlink():
            raise AgentError(f"CopyFile {req.path!r}: {d} is a symlink", Code.INVALID_ARGUMENT)
        if not d.exists():
            d.mkdir(mode=req.dir_mode & 0o7777 or 0o750)
            os.chown(d, req.uid, req.gid)
    mode = req.file_mode
    if stat.S_ISDIR(mode):
        if not path.is_dir():
            path.mkdir(mode=mode & 0o7777)
        os.chown(path, req.uid, req.gid, follow_symlinks=False)
        return
    if stat.S_ISLNK(mode):
        if path.is_symlink() or path.exists():
            path.unlink()
        os.symlink(req.data.decode(), path)
        os.chown(path, req.uid, req.gid, follow_symlinks=False)
        return
    if req.offset < 0 or req.file_size < 0 or req.offset + len(req.data) > req.file_size:
        raise AgentError(
            f"CopyFile {req.path!r}: offset {req.offset} + {len(req.data)} bytes beyond "
            f"file_size {req.file_size}",
            Code.INVALID_ARGUMENT,
        )
    tmp = path.with_suffix(".tmp")
    if req.offset == 0:
        for p in (tmp, path):
            if p.is_symlink() or p.exists():
                p.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, mode & 0o7777)
    try:
        os.pwrite(fd, req.data, req.offset)
        size = os.fstat(fd).st_size
        os.fchown(fd, req.uid, req.gid)
        os.fchmod(fd, mode & 0o7777)
    finally:
        os.close(fd)
    if size >= req.file_size:
        os.replace(tmp, path)


def _empty() -> Any:
    from google.protobuf import empty_pb2

    return empty_pb2.Empty()


def _cgroup_stats(d: dict[str, Any]) -> Any:
    s = pb.CgroupStats()
    cpu = d.get("cpu", {})
    u = cpu.get("usage", {})
    s.cpu_stats.cpu_usage.total_usage = int(u.get("total", 0))
    s.cpu_stats.cpu_usage.percpu_usage.extend(int(x) for x in u.get("percpu", []) or [])
    s.cpu_stats.cpu_usage.usage_in_kernelmode = int(u.get("kernel", 0))
    s.cpu_stats.cpu_usage.usage_in_usermode = int(u.get("user", 0))
    t = cpu.get("throttling", {})
    s.cpu_stats.throttling_data.periods = int(t.get("periods", 0))
    s.cpu_stats.throttling_data.throttled_periods = int(t.get("throttledPeriods", 0))
    s.cpu_stats.throttling_data.throttled_time = int(t.get("throttledTime", 0))
    mem = d.get("memory", {})
    s.memory_stats.cache = int(mem.get("cache", 0))
    for name in ("usage", "swap_usage", "kernel_usage"):
        src = mem.get({"usage": "usage", "swap_usage": "swap", "kernel_usage": "kernel"}[name], {})
        dst = getattr(s.memory_stats, name)
        dst.usage = int(src.get("usage", 0))
        dst.max_usage = int(src.get("max", 0))
        dst.failcnt = int(src.get("failcnt", 0))
        dst.limit = min(int(src.get("limit", 0)), 2**64 - 1)
    s.memory_stats.stats.update({k: int(v) for k, v in (mem.get("raw") or {}).items()})
    pids = d.get("pids", {})
    s.pids_stats.current = int(pids.get("current", 0))
    s.pids_stats.limit = int(pids.get("limit", 0))
    blk = d.get("blkio", {})
    for field_name, key in (
        ("io_service_bytes_recursive", "ioServiceBytesRecursive"),
        ("io_serviced_recursive", "ioServicedRecursive"),
        ("io_queued_recursive", "ioQueueRecursive"),
        ("io_service_time_recursive", "ioServiceTimeRecursive"),
        ("io_wait_time_recursive", "ioWaitTimeRecursive"),
        ("io_merged_recursive", "ioMergedRecursive"),
        ("io_time_recursive", "ioTimeRecursive"),
        ("sectors_recursive", "sectorsRecursive"),
    ):
        for e in blk.get(key, []) or []:
            getattr(s.blkio_stats, field_name).add(
                major=int(e.get("major", 0)), minor=int(e.get("minor", 0)),
                op=str(e.get("op", "")), value=int(e.get("value", 0)),
            )  # fmt: skip
    for size, h in (d.get("hugetlb") or {}).items():
        s.hugetlb_stats[size].usage = int(h.get("usage", 0))
        s.hugetlb_stats[size].max_usage = int(h.get("max", 0))
        s.hugetlb_stats[size].failcnt = int(h.get("failcnt", 0))
    return s


class HealthService:
    async def Check(self, req: Any, ctx: Any) -> Any:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Version(self, req: Any, ctx: Any) -> Any:
        return health_pb2.VersionCheckResponse(grpc_version=API_VERSION, agent_version=__version__)


def unsupported(method: str) -> Callable[[Any, Any], Awaitable[Any]]:
    async def answer(req: Any, ctx: Any) -> Any:
        raise RpcError(Code.UNIMPLEMENTED, f"/grpc.AgentService/{method} is not supported")

    return answer
