"""A small HTTP/1.1 server for the KBS: asyncio (uvloop when installed) + the httptools parser.

Why not a general ASGI server: a KBS request is small and answered whole, so each response goes
out in one write, and the limits the KBS must enforce (header bytes, body bytes) are applied while
parsing, before anything is buffered beyond them. Keep-alive and pipelining are supported (answers
in order), ``Expect: 100-continue`` is honoured, idle connections are closed after a timeout.
A request asking for a protocol upgrade (``Upgrade: h2c``, as ``curl --http2`` sends) is answered
in HTTP/1.1 and the connection stays HTTP/1.1: a server may ignore ``Upgrade`` (RFC 9110, 7.8).
Anything the parser refuses gets a 400 with an ErrorInformation body and the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from typing import Any
from urllib.parse import unquote

from coco.errors import MissingExtraError

try:
    import httptools
except ModuleNotFoundError:
    raise MissingExtraError("httptools", "kbs", "coco kbs serve") from None

from coco.trustee.kbs.app import KbsApp, Reply
from coco.trustee.kbs.errors import KbsHttpError

log = logging.getLogger("coco.kbs")

_REASONS = {
    200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
    405: b"Method Not Allowed", 413: b"Payload Too Large",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    503: b"Service Unavailable",
}  # fmt: skip
IDLE_TIMEOUT = 30.0


def _encode(reply: Reply, keep_alive: bool) -> bytes:
    out = [b"HTTP/1.1 %d %s\r\n" % (reply.status, _REASONS.get(reply.status, b"Status"))]
    for k, v in reply.headers or ():
        out += (k, b": ", v, b"\r\n")
    if not keep_alive:
        out.append(b"connection: close\r\n")
    out += (b"\r\n", reply.body)
    return b"".join(out)


class _Request:
    __slots__ = ("body", "headers", "keep_alive", "length", "method", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.method = ""
        self.keep_alive = True
        self.length = 0  # declared content-length


class KbsHttpProtocol(asyncio.Protocol):
    def __init__(self, app: KbsApp, loop: asyncio.AbstractEventLoop):
        self.app = app
        self.loop = loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client = "?"
        self.req: _Request | None = None
        self.header_bytes = 0
        self.body_bytes = 0
        self.queue: deque[_Request] = deque()
        self.busy = False
        self.closing = False
        self.task: asyncio.Task | None = None
        self.idle: asyncio.TimerHandle | None = None
        self.eof = False
        # A request that asked for an upgrade: the parser stopped before its body, which we
        # read ourselves (the request, and how many body bytes are still to come).
        self.upgrade_body: tuple[_Request, int] | None = None

    # -------------------------------------------------------------------- transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else "?"
        self.app.metrics.active_connections += 1
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.metrics.active_connections -= 1
        self.closing = True
        if self.idle:
            self.idle.cancel()
        if self.task and not self.task.done():
            self.task.cancel()

    def eof_received(self) -> bool | None:
        """The client half-closed: answer what it already sent, then close."""
        self.eof = True
        if self.busy or self.queue:
            is_tls = self.transport is not None and self.transport.get_extra_info("sslcontext")
            return None if is_tls else True
        return None

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self._arm_idle()
        while data and not self.closing:
            if self.upgrade_body is not None:
                data = self._take_upgrade_body(data)
                if not data:
                    return
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as e:
                # The request is parsed up to its body; the parser would hand the rest of the
                # connection to the new protocol. Ignore the upgrade: go on in HTTP/1.1.
                data = data[e.args[0] :]
                self.parser = httptools.HttpRequestParser(self)
            except httptools.HttpParserError as e:
                self._fail(KbsHttpError("HTTPFailed", f"malformed HTTP request: {e}"), 400)
                return

    def _take_upgrade_body(self, data: bytes) -> bytes:
        """Feed the body of an upgrade request; what follows it."""
        assert self.upgrade_body is not None
        req, left = self.upgrade_body
        part = data[:left]
        req.body.append(part)
        left -= len(part)
        if left:
            self.upgrade_body = (req, left)
            return b""
        self.upgrade_body = None
        self._enqueue(req)
        return data[len(part) :]

    def _arm_idle(self) -> None:
        if self.idle:
            self.idle.cancel()
        self.idle = self.loop.call_later(IDLE_TIMEOUT, self._close)

    def _close(self) -> None:
        self.closing = True
        if self.transport and not self.transport.is_closing():
            self.transport.close()

    def _fail(self, err: KbsHttpError, status: int | None = None) -> None:
        """Answer a refusal found while parsing and close the connection."""
        if self.closing:
            return
        method = self.req.method if self.req else "?"
        path = self.req.url.decode("latin-1", "replace")[:200] if self.req else "?"
        reply = self.app.refuse(err, method, path, self.client)
        if status is not None:
            reply.status = status
        reply.headers = [*(reply.headers or []), (b"content-length", b"%d" % len(reply.body))]
        self.app.metrics.inc("kbs_http_requests_total", method=method, status=str(reply.status))
        self.closing = True
        if self.transport and not self.busy:
            self.transport.write(_encode(reply, False))
            self.transport.close()
        elif self.transport:
            self.transport.close()

    # -------------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        self.req = _Request()
        self.header_bytes = 0
        self.body_bytes = 0

    def on_url(self, url: bytes) -> None:
        assert self.req is not None
        self.req.url += url
        self.header_bytes += len(url)
        if self.header_bytes > self.app.header_limit:
            self._too_large_headers()

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.req is not None
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.app.header_limit:
            self._too_large_headers()
            return
        self.req.headers.append((name.lower(), value))

    def _too_large_headers(self) -> None:
        self._fail(
            KbsHttpError(
                "RequestHeaderFieldsTooLarge",
                f"request headers exceed the limit of {self.app.header_limit} bytes",
            )
        )
        raise httptools.HttpParserError("headers too large")

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        req.method = self.parser.get_method().decode("ascii", "replace")
        req.keep_alive = self.parser.should_keep_alive()
        limit = self.app.body_limit
        for k, v in req.headers:
            if k == b"content-length" and v.isdigit():
                req.length = int(v)
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                self._fail(
                    KbsHttpError(
                        "PayloadTooLarge",
                        f"request body of {int(v)} bytes exceeds the limit of {limit} bytes",
                    )
                )
                raise httptools.HttpParserError("body too large")
            if k == b"expect" and v.lower() == b"100-continue" and self.transport:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        assert self.req is not None
        self.body_bytes += len(body)
        if self.body_bytes > self.app.body_limit:
            self._fail(
                KbsHttpError(
                    "PayloadTooLarge",
                    f"request body exceeds the limit of {self.app.body_limit} bytes",
                )
            )
            raise httptools.HttpParserError("body too large")
        self.req.body.append(body)

    def on_message_complete(self) -> None:
        if self.closing or self.req is None:
            return
        req, self.req = self.req, None
        if self.parser.should_upgrade() and req.length:
            self.upgrade_body = (req, req.length)  # its body follows: data_received reads it
            return
        self._enqueue(req)

    def _enqueue(self, req: _Request) -> None:
        self.queue.append(req)
        if not self.busy:
            self.busy = True
            self.task = self.loop.create_task(self._serve())

    # -------------------------------------------------------------------- requests

    async def _serve(self) -> None:
        try:
            while self.queue and not self.closing:
                req = self.queue.popleft()
                try:
                    url = httptools.parse_url(req.url)
                    path = unquote(url.path.decode("latin-1"), encoding="latin-1")
                    query = url.query or b""
                except httptools.HttpParserInvalidURLError:
                    self.busy = False
                    self._fail(KbsHttpError("InvalidRequestPath", "Invalid request path"))
                    return
                reply = await self.app.handle(
                    req.method, path, query, req.headers, b"".join(req.body), self.client
                )
                if self.transport is None or self.transport.is_closing():
                    return
                self.transport.write(_encode(reply, req.keep_alive))
                if not req.keep_alive:
                    self._close()
                    return
        finally:
            self.busy = False
            if self.eof and not self.queue:
                self._close()


async def serve_forever(
    app: KbsApp, sockets: list[Any], ssl_context: ssl.SSLContext | None = None
) -> None:
    """Serve on already-bound listening sockets until SIGINT/SIGTERM."""
    import signal

    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(lambda: KbsHttpProtocol(app, loop), sock=s, ssl=ssl_context)
        for s in sockets
    ]
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    sweeper = loop.create_task(app._sweep_loop())
    app.policy_engine.start()
    try:
        await stop.wait()
    finally:
        # First: evaluations under way end now (their workers are killed), so no thread keeps
        # the process from exiting.
        app.policy_engine.close()
        sweeper.cancel()
        for srv in servers:
            srv.close()
        for srv in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2)
