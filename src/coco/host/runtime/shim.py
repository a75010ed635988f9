"""``containerd-shim-coco-v2``: the shim v2 command as containerd 1.6 and later run it.

``start`` (cwd = the bundle): the address is ``unix:///run/containerd/s/`` + hex sha256 of
``<-address>/<-namespace>/<group>``, the group being the pod's sandbox id for a CRI container
(``io.kubernetes.cri.sandbox-id``) and the task id otherwise, so one shim serves a whole pod; a
shim already there is reused; else the socket is made and handed as fd 3 to a daemonised copy of
this command without action, ``shim.pid`` and ``address`` are written into the bundle, and only
the address is printed. Serve mode answers ``containerd.task.v2.Task`` on fd 3, logs into the
bundle's ``log`` fifo, is a child subreaper, and exits after a Shutdown with no task left (or on
SIGTERM, stopping its sandbox). ``delete`` (containerd's cleanup when the shim is gone) stops what
the pod's sandbox left and prints a binary ``DeleteResponse`` (exit status 137).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

from coco.errors import CocoError
from coco.host.runtime import config as rconfig
from coco.host.runtime import sandbox
from coco.host.runtime.events import Publisher, now
from coco.host.runtime.task import RUNTIME_FILE, SANDBOX_ID, TaskService, decode_options
from coco.rpc import Server
from coco.rpc.protos import containerd_shim_pb2 as pb
from coco.rpc.service import Service

log = logging.getLogger("containerd-shim-coco-v2")

TASK = Service.from_proto(pb, "Task")
SOCKET_DIR = "/run/containerd/s"
CONFIG_ENV = "COCO_SHIM_CONFIG_PATH"
SOCKET_ENV = "COCO_SHIM_SOCKET"
PR_SET_CHILD_SUBREAPER = 36


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="containerd-shim-coco-v2", allow_abbrev=False)
    for name in ("namespace", "address", "publish-binary", "id", "bundle", "socket"):
        p.add_argument(f"-{name}", f"--{name}", dest=name.replace("-", "_"), default="")
    p.add_argument("-debug", "--debug", action="store_true")
    p.add_argument("-v", "--version", action="store_true")
    p.add_argument("action", nargs="?", choices=["start", "delete"])
    return p.parse_args(argv)


def socket_address(containerd: str, namespace: str, group: str) -> str:
    digest = hashlib.sha256(os.path.join(containerd, namespace, group).encode()).hexdigest()
    return f"unix://{SOCKET_DIR}/{digest}"


def read_annotations(bundle: Path) -> dict[str, str]:
    try:
        spec = json.loads((bundle / "config.json").read_bytes())
    except (OSError, ValueError):
        return {}
    annotations = spec.get("annotations") if isinstance(spec, dict) else None
    return annotations if isinstance(annotations, dict) else {}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name)
    tmp.write_text(text)
    tmp.rename(path)


def _reachable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


# -- start -------------------------------------------------------------------------------------------
def start(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle or os.getcwd())
    options = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    config_path = decode_options(options)
    annotations = read_annotations(bundle)
    group = args.id
    if annotations.get("io.kubernetes.cri.container-type") == "container":
        group = annotations.get(SANDBOX_ID) or args.id
    address = socket_address(args.address, args.namespace, group)
    path = address.removeprefix("unix://")
    if os.path.exists(path) and _reachable(path):
        write_atomic(bundle / "address", address)
        sys.stdout.write(address)
        return 0
    os.makedirs(SOCKET_DIR, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # stale: nobody answered on it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(128)
    fd = listener.fileno()
    argv = [sys.executable, "-m", "coco.host.runtime.shim"]
    for name in ("namespace", "address", "publish_binary", "id"):
        argv += [f"-{name.replace('_', '-')}", getattr(args, name)]
    if args.debug:
        argv.append("-debug")
    env = dict(os.environ, **{SOCKET_ENV: path})
    if config_path:
        env[CONFIG_ENV] = config_path

    def as_fd3() -> None:
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    try:
        child = subprocess.Popen(
            argv,
            cwd=bundle,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=(3,),
            preexec_fn=as_fd3 if fd != 3 else None,
            close_fds=True,
        )
    except BaseException:
        listener.close()
        os.unlink(path)
        raise
    listener.close()
    write_atomic(bundle / "shim.pid", str(child.pid))
    write_atomic(bundle / "address", address)
    sys.stdout.write(address)
    return 0


# -- delete ------------------------------------------------------------------------------------------
def delete(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle or os.getcwd())
    try:
        record = json.loads((bundle / RUNTIME_FILE).read_text())
    except (OSError, ValueError):
        record = None
    if record is not None:
        try:
            cfg = rconfig.load(record.get("config_path") or None)
            if sandbox.cleanup(cfg, record.get("sandbox_id", args.id)):
                print(f"sandbox {args.id}: cleaned up after its shim", file=sys.stderr)
        except CocoError as e:
            print(f"sandbox {args.id}: cleanup: {e}", file=sys.stderr)
    with contextlib.suppress(OSError):
        path = (bundle / "address").read_text().removeprefix("unix://")
        if path and not _reachable(path):
            os.unlink(path)
    reply = pb.DeleteResponse(pid=0, exit_status=137, exited_at=now())
    sys.stdout.buffer.write(reply.SerializeToString())
    sys.stdout.buffer.flush()
    return 0


# -- serve -------------------------------------------------------------------------------------------
class _FifoHandler(logging.Handler):
    """Log lines into the bundle's ``log`` fifo once containerd reads it; dropped before that."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.fd = -1
        threading.Thread(target=self._open, args=(path,), daemon=True).start()

    def _open(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            os.set_blocking(fd, False)
            self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, (self.format(record) + "\n").encode(errors="replace"))


def _subreaper() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


async def _reap(service: TaskService) -> None:
    """Reap orphans re-parented to us, leaving the sandbox's own children to their owners."""
    while True:
        await asyncio.sleep(0.5)
        owned = set(service.sandbox.children()) if service.sandbox is not None else set()
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None or info.si_pid in owned:
                break
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, os.WNOHANG)


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), args.namespace)

    def on_empty() -> None:
        loop.call_later(0.05, done.set)  # let the Shutdown reply leave first

    service = TaskService(args.namespace, publisher, on_empty)
    server = Server()
    server.register(TASK, service)
    listener = None
    if args.socket:
        await server.listen(f"unix://{args.socket}")
        path = args.socket
    else:
        sock = socket.socket(fileno=3)
        sock.setblocking(False)
        listener = await asyncio.start_unix_server(
            lambda r, w: server.serve_stream(r, w, peer="containerd"), sock=sock
        )
        path = os.environ.get(SOCKET_ENV, "")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    reaper = asyncio.create_task(_reap(service))
    log.info("containerd-shim-coco-v2 %s serving (pid %d)", args.id, os.getpid())
    await done.wait()
    if listener is not None:
        listener.close()  # nobody may reach a shim that is going away
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)
    reaper.cancel()
    with contextlib.suppress(Exception):
        await service.shutdown_all()
    await publisher.close()
    await server.stop(grace=1)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        print("containerd-shim-coco-v2 (coco), runtime io.containerd.coco.v2")
        sys.exit(0)
    if args.action in ("start", "delete") and not args.id:
        print(f"containerd-shim-coco-v2 {args.action}: expected -id ID", file=sys.stderr)
        sys.exit(1)
    try:
        if args.action == "start":
            sys.exit(start(args))
        if args.action == "delete":
            sys.exit(delete(args))
    except (CocoError, OSError) as e:
        print(f"containerd-shim-coco-v2 {args.action}: {e}", file=sys.stderr)
        sys.exit(1)
    handler = _FifoHandler(Path(os.getcwd()) / "log")
    handler.setFormatter(logging.Formatter("time=%(asctime)s level=%(levelname)s msg=%(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, handlers=[handler])
    _subreaper()
    loop = asyncio.new_event_loop()
    code = 1
    try:
        code = loop.run_until_complete(serve(args))
    except BaseException:
        log.exception("containerd-shim-coco-v2 %s: serving failed", args.id)
    finally:
        logging.shutdown()
        # threads may still block opening or reading a fifo containerd never opened: no waiting
        os._exit(code)


if __name__ == "__main__":
    main()
