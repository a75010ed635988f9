"""A long-running image pull service on a Unix socket, and its client.

In a confidential guest the image puller is a service (upstream: image-rs inside the Confidential
Data Hub, called by the agent for every container). A service keeps the interpreter, the imported
code and its connection pools warm, so a pull whose layers are all in the store costs only the
registry round trips and the bundle (tens of milliseconds) instead of a new Python process.

``coco image serve`` runs a :class:`PullService`; ``coco image pull --service SOCKET`` (or
``COCO_IMAGE_SERVICE=SOCKET``) sends the pull there with :func:`pull_via_service` instead of
pulling in-process. The result is the same bundle, made by the same :func:`coco.image.pull.pull_image`.

Wire format: one JSON object per line each way on a stream socket. The request is a
:class:`coco.image.request.PullRequest` (the arguments of ``coco image pull``, every path absolute:
the service has its own working directory); the answer is ``{"ok": true, ...result...}`` or ``{"ok": false, "error": "..."}``.
A client that disconnects before the answer cancels its pull, and a bundle finished after that is
removed, so an interrupted ``coco image pull`` leaves nothing behind either way.

Only a peer with the service's own user id (or root) is served; the socket is created mode 0600.
This module imports only the standard library at load time: the client side must stay light.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct

from coco.errors import PullError
from coco.image.request import PullRequest
from coco.jsonio import loads

TYPE_CHECKING = False  # the client stays clear of typing (and of everything it can)
if TYPE_CHECKING:
    from typing import Any

MAX_REQUEST = 1 << 20


def default_socket() -> str:
    """``/run/coco/image.sock`` as root, else under ``$XDG_RUNTIME_DIR`` (or /tmp)."""
    if os.geteuid() == 0:
        return "/run/coco/image.sock"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/coco-{os.geteuid()}"
    return os.path.join(base, "coco", "image.sock")


# -- client ------------------------------------------------------------------------------------
def pull_via_service(path: str, request: PullRequest | dict[str, Any]) -> dict[str, Any]:
    """Send one pull to the service at ``path`` and wait for its answer (a PullError if refused);
    ``request`` is sent as :meth:`PullRequest.for_service` makes it (a dict: as it is)."""
    if isinstance(request, PullRequest):
        request = request.for_service()
    where = f"image service {path}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            s.connect(path)
        except OSError as e:
            raise PullError(
                f"{where}: expected a running `coco image serve`, cannot connect: {e.strerror or e}"
            ) from None
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                raise PullError(f"{where}: the service closed the connection without an answer")
            buf += chunk
            if len(buf) > MAX_REQUEST:
                raise PullError(f"{where}: answer larger than {MAX_REQUEST} bytes")
    finally:
        s.close()
    answer = loads(bytes(buf), what=f"{where}: answer", error=PullError)
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise PullError(f"{where}: expected an object with 'ok', found {str(answer)[:80]}")
    if not answer["ok"]:
        raise PullError(str(answer.get("error") or "the service refused the pull"))
    return answer


# -- server ------------------------------------------------------------------------------------
def _run(req: PullRequest, cancel: Any) -> dict[str, Any]:
    from coco.image.pull import pull_image

    res = pull_image(req.ref, req.bundle, req.store, req.options(), cancel=cancel)
    pulled = sum(1 for x in res.layers if x.action == "pulled")
    return {
        "ok": True,
        "reference": res.reference,
        "manifest_digest": res.manifest_digest,
        "bundle": str(res.bundle.path),
        "mode": res.bundle.mode,
        "pulled": pulled,
        "reused": len(res.layers) - pulled,
    }


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _handle(conn: socket.socket, active: Any) -> None:
    import logging
    import threading

    from coco.errors import CocoError

    log = logging.getLogger(__name__)
    me = os.geteuid()
    uid = _peer_uid(conn)
    if uid not in (me, 0):
        log.warning("refused a client with uid %d", uid)
        _answer(conn, {"ok": False, "error": f"image service: uid {uid} may not use it"})
        return
    buf = bytearray()
    while not buf.endswith(b"\n"):
        try:
            chunk = conn.recv(1 << 16)
        except OSError:
            return
        if not chunk:
            return
        buf += chunk
        if len(buf) > MAX_REQUEST:
            _answer(conn, {"ok": False, "error": f"image service: request over {MAX_REQUEST} B"})
            return
    cancel, gone = threading.Event(), threading.Event()
    if not active.add(cancel):  # the service is stopping
        _answer(conn, {"ok": False, "error": "image service: shutting down"})
        return

    def watch() -> None:  # the client hanging up (Ctrl-C) cancels its pull
        try:
            while conn.recv(1 << 10):
                pass
        except OSError:
            pass
        gone.set()
        cancel.set()

    threading.Thread(target=watch, daemon=True).start()
    req: PullRequest | None = None
    try:
        req = PullRequest.from_service(
            loads(bytes(buf), what="image service: request", error=PullError)
        )
        answer = _run(req, cancel)
        log.info("pulled %s -> %s", req.ref, req.bundle)
    except CocoError as e:
        answer = {"ok": False, "error": " ".join(str(e).split())}
    except Exception as e:  # a bug: answer it, keep serving
        log.exception("pull failed")
        answer = {"ok": False, "error": f"image service: internal error: {type(e).__name__}: {e}"}
    if answer.get("ok") and cancel.is_set() and req is not None:
        _discard(req)  # the client hung up, or the service is stopping: nobody gets this bundle
        answer = {"ok": False, "error": f"image service: stopping; {req.ref} was not pulled"}
    if not gone.is_set():
        _answer(conn, answer)
    active.remove(cancel)


def _discard(req: PullRequest) -> None:
    from coco.image.bundle import remove_bundle
    from coco.image.store import LayerStore

    with contextlib.suppress(Exception):  # best effort: prune and a new pull cope with the rest
        remove_bundle(LayerStore(req.store), req.bundle)


def _answer(conn: socket.socket, obj: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(obj).encode() + b"\n")


class _Active:
    """The cancel events of the pulls under way; once stopped, new pulls are refused."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._events: set[Any] = set()
        self._stopped = False

    def add(self, ev: Any) -> bool:
        with self._lock:
            if self._stopped:
                return False
            self._events.add(ev)
            return True

    def remove(self, ev: Any) -> None:
        with self._lock:
            self._events.discard(ev)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for ev in self._events:
                ev.set()


# sockaddr_un.sun_path holds 108 bytes with the terminating NUL
_MAX_SOCKET_PATH = 107


def _free_socket_path(path: str) -> None:
    """Make ``path`` ready to bind: its directory is created, a stale socket (one that refuses
    connections: its service is gone) is removed; anything else there (a file, a directory, a
    live service) is left untouched and refused."""
    where = f"image service {path}"
    n = len(os.fsencode(path))
    if n > _MAX_SOCKET_PATH:
        raise PullError(
            f"{where}: expected a socket path of at most {_MAX_SOCKET_PATH} bytes, found {n} bytes"
        )
    parent = os.path.dirname(path) or "."
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise PullError(f"{where}: expected a directory at {parent}, found a file")
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise PullError(f"{where}: cannot prepare the socket: {e.strerror or e}") from None
    if not stat.S_ISSOCK(st.st_mode):
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "file that is not a socket"
        raise PullError(f"{where}: expected a free path or a stale socket, found a {kind}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # a stale socket of a service that is gone
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise PullError(f"{where}: cannot remove the stale socket: {e.strerror or e}") from None
        return
    except OSError as e:
        raise PullError(f"{where}: cannot probe the existing socket: {e.strerror or e}") from None
    finally:
        probe.close()
    raise PullError(f"{where}: expected a free path, found a running service")


class PullService:
    """The service bound to its socket; :meth:`serve_forever` in one thread, :meth:`shutdown`
    from another."""

    def __init__(self, path: str) -> None:
        import socketserver

        # load the pull machinery now, so that the first request is as warm as the next ones
        import coco.image.pull
        import coco.image.unpack
        import coco.oci.registry  # noqa: F401

        active = self._active = _Active()

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                _handle(self.request, active)

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = False
            block_on_close = True  # server_close() waits for the pulls (cancelled) to clean up

        self.path = path
        _free_socket_path(path)
        old = os.umask(0o177)
        try:
            self._srv = Server(path, Handler)
        except OSError as e:
            raise PullError(f"image service {path}: cannot listen: {e.strerror or e}") from None
        finally:
            os.umask(old)

    def serve_forever(self) -> None:
        try:
            self._srv.serve_forever(poll_interval=0.2)
        finally:
            self._srv.server_close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def shutdown(self) -> None:
        """Stop accepting, cancel the pulls under way (they remove what they started) and
        return; :meth:`serve_forever` returns once they are done."""
        self._active.stop()
        self._srv.shutdown()
