"""Run the KBS application with uvicorn (uvloop + httptools when available) on the configured sockets."""

from __future__ import annotations

import gc
import logging
import socket
import ssl

from coco.errors import KbsError
from coco.trustee.config import KbsConfig
from coco.trustee.kbs.app import KbsApp

log = logging.getLogger("coco.kbs")


def _bind(address: str) -> socket.socket:
    host, sep, port_s = address.rpartition(":")
    if not sep or not port_s.isdigit():
        raise KbsError(f"http_server.sockets: expected HOST:PORT, found {address!r}")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port_s)))
    except OSError as e:
        sock.close()
        raise KbsError(f"http_server.sockets: cannot listen on {address}: {e}") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def serve(config: KbsConfig) -> None:
    """Serve until interrupted."""
    import uvicorn

    hs = config.http_server
    if hs.insecure_http:
        log.warning(
            "KBS serves plain HTTP (insecure_http): traffic and admin tokens are not protected"
        )
    else:
        try:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(hs.certificate or "", hs.private_key or "")
        except (OSError, ssl.SSLError) as e:
            raise KbsError(
                f"http_server: cannot load certificate {hs.certificate} / key {hs.private_key}: {e}"
            ) from None
    app = KbsApp(config)
    sockets = [_bind(a) for a in hs.sockets]
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    try:
        import httptools  # noqa: F401

        http = "httptools"
    except ImportError:
        http = "h11"
    ucfg = uvicorn.Config(
        app,
        loop=loop,
        http=http,
        lifespan="on",
        interface="asgi3",
        ws="none",
        proxy_headers=False,
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
        ssl_certfile=None if hs.insecure_http else hs.certificate,
        ssl_keyfile=None if hs.insecure_http else hs.private_key,
        h11_max_incomplete_event_size=hs.request_header_size * 1024 + 65536,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(ucfg)
    # Everything loaded so far lives as long as the server: keep it out of the collector's scans,
    # and collect young objects less often (a request allocates a few thousand short-lived ones).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 50, 100)
    scheme = "http" if hs.insecure_http else "https"
    for a in hs.sockets:
        log.warning("KBS listening on %s://%s (storage %s)", scheme, a, app.store.url)
    try:
        server.run(sockets=sockets)
    finally:
        for s in sockets:
            s.close()
        app.store.close()
