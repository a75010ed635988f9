"""Run the KBS on the configured sockets with our HTTP/1.1 server (uvloop when installed)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl

from coco.errors import KbsError
from coco.trustee.config import KbsConfig, parse_socket
from coco.trustee.kbs.app import KbsApp
from coco.trustee.kbs.http import serve_forever  # at import: no kbs extra, nothing is bound
from coco.trustee.storage.localfs import DB_NAME

log = logging.getLogger("coco.kbs")


def _bind(address: str) -> socket.socket:
    host, port = parse_socket(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise KbsError(f"http_server.sockets: cannot listen on {address}: {e}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def serve(config: KbsConfig) -> None:
    """Serve until SIGINT or SIGTERM."""
    hs = config.http_server
    ctx: ssl.SSLContext | None = None
    if hs.insecure_http:
        log.warning(
            "KBS serves plain HTTP (insecure_http): traffic and admin tokens are not protected"
        )
    else:
        try:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(hs.certificate or "", hs.private_key or "")
        except (OSError, ssl.SSLError) as e:
            raise KbsError(
                f"http_server: cannot load certificate {hs.certificate} / key {hs.private_key}: {e}"
            ) from None
    workers = max(1, config.http_server.worker_count or 1)
    if workers > 1 and config.storage_url.startswith("memory:"):
        raise KbsError(
            "http_server.worker_count > 1 needs shared storage (SQLite, LocalFs or PostgreSQL)"
        )
    if workers > 1 and not config.session_storage_url:  # workers share sessions through a file
        if config.storage_url.startswith("sqlite:"):
            config.session_storage_url = config.storage_url
        elif config.storage_url.startswith("localfs://"):
            folder = config.storage_url[len("localfs://") :]
            config.session_storage_url = "sqlite://" + os.path.join(folder, DB_NAME)
    sockets: list[socket.socket] = []
    new_files = [f for f in _sqlite_files(config) if not os.path.exists(f)]
    try:
        for a in hs.sockets:
            sockets.append(_bind(a))
        app = KbsApp(config)  # also validates everything before any worker starts
    except BaseException:
        # A start that fails leaves nothing: no socket, no database, no signing key.
        for s in sockets:
            s.close()
        for f in new_files:
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f + suffix)
        raise
    scheme = "http" if hs.insecure_http else "https"
    for a in hs.sockets:
        log.warning(
            "KBS listening on %s://%s (storage %s, %d worker%s)",
            scheme, a, app.store.url, workers, "s" if workers > 1 else "",
        )  # fmt: skip
    try:
        if workers == 1:
            _run(app, sockets, ctx)
        else:
            app.store.close()
            app.session_store.close()
            _prefork(config, sockets, ctx, workers)
    finally:
        for s in sockets:
            s.close()


def _sqlite_files(config: KbsConfig) -> list[str]:
    urls = [config.storage_url, config.session_storage_url or ""]
    files = [u[len("sqlite://") :] for u in urls if u.startswith("sqlite://")]
    return files + [os.path.join(u[len("localfs://") :], DB_NAME) for u in urls
                    if u.startswith("localfs://")]  # fmt: skip


def _run(app: KbsApp, sockets: list[socket.socket], ctx: ssl.SSLContext | None) -> None:
    # Everything loaded so far lives as long as the server: keep it out of the collector's scans.
    gc.collect()
    gc.freeze()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve_forever(app, sockets, ctx))
    finally:
        app.store.close()


def _prefork(
    config: KbsConfig, sockets: list[socket.socket], ctx: ssl.SSLContext | None, workers: int
) -> None:
    """Fork ``workers`` processes sharing the listening sockets; forward SIGINT/SIGTERM to them."""
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # worker: its own storage connections, its own event loop
            code = 0
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _run(KbsApp(config), sockets, ctx)
            except BaseException:
                log.exception("KBS worker failed")
                code = 1
            os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    for pid in children:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break
