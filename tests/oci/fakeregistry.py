"""A tiny scripted HTTP server for registry behaviour docker-registry cannot be made to show
(500 answers, truncated bodies, non-JSON manifests) and a bearer-token endpoint; a TCP relay that
notes how each connection through it began (a TLS ClientHello or a plain HTTP request)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Handler = Callable[[BaseHTTPRequestHandler], None]


@contextmanager
def serve(routes: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[str]:
    """Serve ``routes(handler)`` for every request on 127.0.0.1:<free port>; yield host:port."""

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _handle(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            routes(self)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    th = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    th.start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def reply(
    h: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    content_length: int | None = None,
) -> None:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body) if content_length is None else content_length))
    if content_length is not None and content_length != len(body):
        h.send_header("Connection", "close")
        h.close_connection = True
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)
        h.wfile.flush()


@dataclass
class Relay:
    host: str
    starts: list[bytes] = field(default_factory=list)  # the first bytes of each connection

    def tls_attempts(self) -> int:
        return sum(s.startswith(b"\x16\x03") for s in self.starts)  # a TLS handshake record

    def plain_requests(self) -> int:
        return sum(s[:4] in (b"GET ", b"HEAD", b"POST", b"PUT ") for s in self.starts)


@contextmanager
def relay(target: str) -> Iterator[Relay]:
    """Forward TCP connections from 127.0.0.1:<free port> to ``target`` (host:port)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    r = Relay(f"127.0.0.1:{lsock.getsockname()[1]}")
    socks: list[socket.socket] = []
    threads: list[threading.Thread] = []
    host, port = target.rsplit(":", 1)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def handle(client: socket.socket) -> None:
        try:
            first = client.recv(1 << 16)
        except OSError:
            first = b""
        r.starts.append(first[:8])
        if not first:
            return
        try:
            up = socket.create_connection((host, int(port)), timeout=10)
        except OSError:
            return
        socks.append(up)
        up.sendall(first)
        back = threading.Thread(target=pump, args=(up, client), daemon=True)
        threads.append(back)
        back.start()
        pump(client, up)

    def accept() -> None:
        while True:
            try:
                client, _ = lsock.accept()
            except OSError:
                return
            client.settimeout(10)
            socks.append(client)
            t = threading.Thread(target=handle, args=(client,), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield r
    finally:
        lsock.shutdown(socket.SHUT_RDWR)
        lsock.close()
        acceptor.join(5)
        for s in list(socks):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in list(threads):
            t.join(5)
        for s in socks:
            s.close()
