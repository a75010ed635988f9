"""The sandbox and its containers: what CreateSandbox, CreateContainer & co. change.

Namespaces (upstream's layout): CreateSandbox makes the sandbox's IPC and UTS namespaces (kept
alive by bind mounts under ``<root>/sandbox/ns/``, the hostname set in the UTS one) and every
container joins them; the first container (the pause container) gets a new PID namespace and
holds it for the containers created with ``sandbox_pidns``. Containers run with ``runc``; the
bundle is ``<root>/<cid>/`` (config.json written from the spec the host sent, after policy).

A CreateContainer that fails part-way leaves nothing: runc's state, the mounts of its storages,
the bundle directory and the process's pipes are all undone before the error is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coco.guest.agent import mount as m
from coco.guest.agent.config import AgentConfig
from coco.guest.agent.errors import AgentError
from coco.guest.agent.ocispec import process_to_json
from coco.guest.agent.process import Process, close_fds, make_pipes
from coco.guest.agent.runc import ConsoleSocket, Runc, RuncError
from coco.guest.agent.storage import Storages, Undo
from coco.rpc.status import Code

log = logging.getLogger(__name__)

ANNO_TYPE = "io.kubernetes.cri.container-type"


def verify_id(cid: str) -> None:
    """upstream's verify_id: two characters at least, the first alphanumeric, the rest
    alphanumeric or ``.`` ``-`` ``_`` (Unicode letters pass, as Rust's ``is_alphanumeric``)."""
    ok = len(cid) > 1 and cid[0].isalnum() and all(c.isalnum() or c in ".-_" for c in cid[1:])
    if not ok:
        raise AgentError(
            f"invalid container ID: {cid!r} (expected 2+ characters, the first alphanumeric, "
            "the rest alphanumeric or . - _)"
        )


@dataclass
class Container:
    cid: str
    bundle: Path
    storages: list[Undo]
    init: Process
    processes: dict[str, Process] = field(default_factory=dict)
    cgroups_path: str = ""
    sandbox: bool = False  # the pause container
    status: str = "created"


class Sandbox:
    def __init__(self, cfg: AgentConfig, storages: Storages) -> None:
        self.cfg = cfg
        self.runc = Runc(cfg.runc, cfg.runc_root)
        self.storages = storages
        self.id = ""
        self.hostname = ""
        self.created = False
        self.sandbox_storages: list[Undo] = []
        self.containers: dict[str, Container] = {}
        self.pidns_holder: Process | None = None
        self.ns_dir = Path(cfg.container_root, "sandbox", "ns")
        self._ns_files: list[str] = []
        self.lock = asyncio.Lock()
        self.oom_events: asyncio.Queue[str] = asyncio.Queue()
        self.destroyed = asyncio.Event()
        self._watchers: set[asyncio.Task] = set()

    # --- sandbox ----------------------------------------------------------------------------------

    async def create(self, req: Any) -> None:
        async with self.lock:
            if self.created:
                raise AgentError(f"the sandbox {self.id} already exists", Code.ALREADY_EXISTS)
            root = Path(self.cfg.container_root)
            root.mkdir(parents=True, exist_ok=True)
            Path(self.cfg.runc_root).mkdir(parents=True, exist_ok=True)
            self.hostname = req.hostname
            self.id = req.sandbox_id
            for km in req.kernel_modules:
                await _modprobe(km.name, list(km.parameters))
            await self._make_namespaces(req.hostname)
            try:
                self.sandbox_storages = await self.storages.add_all(list(req.storages), "", {})
                if req.dns:
                    self._write_resolv_conf(list(req.dns))
            except BaseException:
                await self._drop_namespaces()
                raise
            self.created = True
            log.info("sandbox %s created (hostname %r)", self.id, self.hostname)

    async def _make_namespaces(self, hostname: str) -> None:
        self.ns_dir.mkdir(parents=True, exist_ok=True)
        files = [str(self.ns_dir / "ipc"), str(self.ns_dir / "uts")]
        for f in files:
            Path(f).touch()
        cmd = ["unshare", f"--ipc={files[0]}", f"--uts={files[1]}", "hostname", hostname or "kata"]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            for f in files:
                with contextlib.suppress(OSError):
                    m.umount(f)
            raise AgentError(f"sandbox namespaces: unshare failed: {err.decode().strip()}")
        self._ns_files = files

    async def _drop_namespaces(self) -> None:
        for f in self._ns_files:
            with contextlib.suppress(OSError):
                m.umount(f)
            with contextlib.suppress(OSError):
                os.unlink(f)
        self._ns_files = []

    def _write_resolv_conf(self, lines: list[str]) -> None:
        path = Path(self.cfg.container_root, "sandbox", "resolv.conf")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + ("" if lines[-1] == "" else "\n"))

    async def destroy(self) -> None:
        async with self.lock:
            for cid in list(self.containers):
                await self._remove(cid)
            await self.storages.release(self.sandbox_storages)
            self.sandbox_storages = []
            await self._drop_namespaces()
            self.created = False
            self.destroyed.set()
            log.info("sandbox %s destroyed", self.id)

    # --- containers -------------------------------------------------------------------------------

    def container(
        self, cid: str, code: Code = Code.INTERNAL, text: str = "Invalid container id"
    ) -> Container:
        c = self.containers.get(cid)
        if c is None:
            raise AgentError(f"{text} {cid}", code)
        return c

    def find_process(self, cid: str, eid: str) -> Process:
        """The process ``eid`` of ``cid`` (``""``: the init process), with upstream's codes."""
        c = self.containers.get(cid)
        if c is None:
            raise AgentError(f"Invalid container id {cid}", Code.INVALID_ARGUMENT)
        if eid == "" or (eid == cid and c.init.exec_id == eid):
            p = c.processes.get(c.init.exec_id)
            if p is None:
                raise AgentError(f"cannot find init process of container {cid}", Code.NOT_FOUND)
            return p
        p = c.processes.get(eid)
        if p is None:
            raise AgentError(f"invalid exec id {eid} of container {cid}", Code.NOT_FOUND)
        return p

    async def create_container(self, req: Any, spec_doc: dict, annotations: dict[str, str]) -> None:
        cid = req.container_id
        verify_id(cid)
        if not req.HasField("OCI"):
            raise AgentError(f"container {cid}: no OCI spec in the request", Code.INVALID_ARGUMENT)
        if not spec_doc.get("process"):
            raise AgentError(f"container {cid}: the OCI spec has no process", Code.INVALID_ARGUMENT)
        async with self.lock:
            if cid in self.containers:
                raise AgentError(f"container {cid} already exists", Code.ALREADY_EXISTS)
            cgroup = spec_doc.get("linux", {}).get("cgroupsPath", "")
            owner = next(
                (c.cid for c in self.containers.values() if cgroup and c.cgroups_path == cgroup),
                None,
            )
            if owner is not None:  # runc would share it, and a failure would kill the owner
                raise AgentError(
                    f"container {cid}: linux.cgroupsPath {cgroup} is container {owner}'s",
                    Code.INVALID_ARGUMENT,
                )
            bundle = Path(self.cfg.container_root, cid)
            bundle_existed = bundle.exists()
            undos: list[Undo] = []
            stdio: tuple[int, int, int] | None = None
            ends: dict = {}
            console: ConsoleSocket | None = None
            tty = None
            created = False
            try:
                undos = await self.storages.add_all(list(req.storages), cid, annotations)
                doc = self._prepare_spec(cid, req, spec_doc, undos)
                bundle.mkdir(parents=True, exist_ok=True)
                (bundle / "config.json").write_text(json.dumps(doc))
                terminal = bool(doc["process"].get("terminal"))
                stdio, ends = make_pipes(terminal)
                console = ConsoleSocket() if terminal else None
                recv = asyncio.ensure_future(console.receive()) if console else None
                try:
                    pid = await self.runc.create(
                        cid, bundle, stdio, console.path if console else None
                    )
                    created = True
                    if recv is not None:
                        async with asyncio.timeout(10):
                            tty = await recv
                finally:
                    if recv is not None and not recv.done():
                        recv.cancel()
                close_fds(stdio)
                stdio = None
                proc = Process(req.exec_id or cid, init=True, tty=tty, **ends)
                ends = {}
                proc.watch(pid)
            except BaseException as e:
                if stdio is not None:
                    close_fds(stdio)
                close_fds([fd for fd in ends.values() if fd is not None] + ([tty] if tty else []))
                if created or isinstance(e, RuncError):
                    with contextlib.suppress(Exception):
                        await self.runc.delete(cid)
                await self.storages.release(undos)
                if not bundle_existed:
                    _remove_tree(bundle)
                raise
            finally:
                if console is not None:
                    console.close()
            c = Container(cid, bundle, undos, proc, {proc.exec_id: proc},
                          doc.get("linux", {}).get("cgroupsPath", ""),
                          sandbox=annotations.get(ANNO_TYPE) == "sandbox")  # fmt: skip
            self.containers[cid] = c
            if self.pidns_holder is None:
                self.pidns_holder = proc
            log.info("container %s created (pid %d)", cid, proc.pid)

    def _prepare_spec(self, cid: str, req: Any, doc: dict, undos: list[Undo]) -> dict:
        doc = json.loads(json.dumps(doc))
        root = doc.setdefault("root", {})
        root["path"] = self.cfg.guest_path(root.get("path") or "rootfs")
        for mnt in doc.get("mounts", []):
            if mnt.get("source", "").startswith("/"):
                mnt["source"] = self.cfg.guest_path(mnt["source"])
        for u in undos:
            if u.pause_process is not None:
                doc["process"] = u.pause_process
            elif u.pulled_process is not None:
                _merge_process(doc["process"], u.pulled_process)
        linux = doc.setdefault("linux", {})
        spaces = [
            n for n in linux.get("namespaces", []) if n.get("type") not in ("ipc", "uts", "pid")
        ]
        if self._ns_files:
            spaces += [{"type": "ipc", "path": self._ns_files[0]},
                       {"type": "uts", "path": self._ns_files[1]}]  # fmt: skip
        else:
            spaces += [{"type": "ipc"}, {"type": "uts"}]
        if req.sandbox_pidns:
            holder = self.pidns_holder
            if holder is None or holder.exited.is_set():
                raise AgentError(
                    f"container {cid}: Sandbox does not have sandbox_pidns (no live pause "
                    "process holds the sandbox's PID namespace)"
                )
            spaces.append({"type": "pid", "path": f"/proc/{holder.pid}/ns/pid"})
        else:
            spaces.append({"type": "pid"})
        linux["namespaces"] = spaces
        if doc.get("hostname") and not self._ns_files:
            doc.pop("hostname")
        return doc

    async def start_container(self, cid: str) -> None:
        c = self.container(cid)
        await self.runc.start(cid)
        c.status = "running"
        if not c.sandbox:
            task = asyncio.ensure_future(self._oom_watch(c))
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)

    async def _oom_watch(self, c: Container) -> None:
        await c.init.exited.wait()
        if c.init.code == 128 + signal.SIGKILL and _oom_killed(c.cgroups_path):
            await self.oom_events.put(c.cid)

    async def exec_process(self, req: Any) -> None:
        cid, eid = req.container_id, req.exec_id
        c = self.container(cid)
        if not eid or eid in c.processes:
            raise AgentError(
                f"container {cid}: exec id {eid!r} is empty or taken", Code.INVALID_ARGUMENT
            )
        if not req.HasField("process"):
            raise AgentError(
                "Unable to parse process from ExecProcessRequest", Code.INVALID_ARGUMENT
            )
        doc = process_to_json(req.process)
        doc.setdefault("cwd", "/")
        terminal = bool(doc.get("terminal"))
        stdio, ends = make_pipes(terminal)
        console = ConsoleSocket() if terminal else None
        tty = None
        try:
            recv = asyncio.ensure_future(console.receive()) if console else None
            try:
                pid = await self.runc.exec(cid, eid, doc, c.bundle / "exec", stdio,
                                           console.path if console else None)  # fmt: skip
                if recv is not None:
                    async with asyncio.timeout(10):
                        tty = await recv
            finally:
                if recv is not None and not recv.done():
                    recv.cancel()
        except BaseException:
            close_fds([fd for fd in ends.values() if fd is not None])
            raise
        finally:
            close_fds(stdio)
            if console is not None:
                console.close()
        proc = Process(eid, init=False, tty=tty, **ends)
        c.processes[eid] = proc
        proc.watch(pid)

    async def signal_process(self, cid: str, eid: str, sig: int) -> None:
        p = self.find_process(cid, eid)
        if p.init and sig == signal.SIGTERM and not p.handles(signal.SIGTERM):
            sig = signal.SIGKILL  # an init without a SIGTERM handler would ignore it
        p.signal(sig)
        if eid == "" and sig == signal.SIGKILL:
            try:  # every process left in the container's cgroup (runc freezes, kills, thaws)
                await self.runc.kill(cid, sig, all_processes=True)
            except RuncError as e:
                log.info("container %s: kill all: %s", cid, e)

    async def wait_process(self, cid: str, eid: str) -> int:
        p = self.find_process(cid, eid)
        await p.exited.wait()
        c = self.containers.get(cid)
        if c is not None and c.processes.get(p.exec_id) is p:
            del c.processes[p.exec_id]  # the first waiter removes it; later waits: NOT_FOUND
            if not p.init:
                p.close()
            elif p.stdout is not None or p.stderr is not None:
                p.close_stdin()
        return p.code if p.code is not None else 255

    async def remove_container(self, cid: str, timeout: int) -> None:
        async with self.lock:
            self.container(cid)
            if timeout:
                try:
                    async with asyncio.timeout(timeout):
                        await self._remove(cid)
                except TimeoutError:
                    raise AgentError(
                        f"container {cid}: not removed within {timeout} s: ETIME"
                    ) from None
            else:
                await self._remove(cid)

    async def _remove(self, cid: str) -> None:
        c = self.containers[cid]
        try:
            await self.runc.delete(cid)
        except RuncError as e:
            if await self.runc.state(cid) is not None:
                raise
            log.info("container %s: %s (already gone)", cid, e)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await c.init.exited.wait()
        for p in [*list(c.processes.values()), c.init]:
            p.close()
        await self.storages.release(c.storages)
        _remove_tree(c.bundle)
        del self.containers[cid]
        if self.pidns_holder is c.init:
            self.pidns_holder = None
        log.info("container %s removed", cid)


def _merge_process(target: dict, image: dict) -> None:
    """upstream's merge_oci_process: the image's args when the host sent none, its cwd when
    the host's is ``/``, its env variables the host did not set."""
    if not target.get("args") and image.get("args"):
        target["args"] = list(image["args"])
    if target.get("cwd", "/") == "/" and image.get("cwd", "/") != "/":
        target["cwd"] = image["cwd"]
    env = target.setdefault("env", [])
    names = {e.split("=", 1)[0] for e in env}
    for e in image.get("env", []) or []:
        if e.split("=", 1)[0] not in names:
            env.append(e)


def _remove_tree(path: Path) -> None:
    """Remove ``path`` after unmounting whatever is still mounted below it."""
    for mp in m.mounts_under(str(path)):
        with contextlib.suppress(OSError):
            m.umount(mp)
    shutil.rmtree(path, ignore_errors=True)


def _oom_killed(cgroups_path: str) -> bool:
    rel = cgroups_path.lstrip("/")
    for f in (
        f"/sys/fs/cgroup/{rel}/memory.events",
        f"/sys/fs/cgroup/memory/{rel}/memory.oom_control",
    ):
        try:
            for line in Path(f).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            continue
    return False


async def _modprobe(name: str, params: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        "modprobe", name, *params, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise AgentError(f"kernel module {name}: modprobe failed: {err.decode().strip()}")
