"""Run the KBS on the configured sockets with our HTTP/1.1 server (uvloop when installed)."""

from __future__ import annotations

import asyncio
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
    sock.setblocking(False)
    return sock


def serve(config: KbsConfig) -> None:
    """Serve until SIGINT or SIGTERM."""
    from coco.trustee.kbs.http import serve_forever

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
    app = KbsApp(config)
    sockets = [_bind(a) for a in hs.sockets]
    scheme = "http" if hs.insecure_http else "https"
    for a in hs.sockets:
        log.warning("KBS listening on %s://%s (storage %s)", scheme, a, app.store.url)
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
        for s in sockets:
            s.close()
        app.store.close()
