"""coco.oci.http on the wire: a raw socket server on 127.0.0.1 sends answers byte for byte
(chunked with extensions and trailers, close-delimited, bad framing, oversized or malformed
heads, interim 100, HEAD/204/304, Connection: close) and counts the connections it accepts."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import pytest

from coco.oci.http import Pool, TransportError


@dataclass
class Wire:
    host: str
    accepted: int = 0
    requests: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # (conn, head, body)


@contextmanager
def wire(answers: dict[str, bytes], close_after: frozenset[str] = frozenset()) -> Iterator[Wire]:
    """Answer each request for PATH with ``answers[PATH]`` as is (keeping the connection open
    unless PATH is in ``close_after``); request bodies (Content-Length or chunked) are read."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    w = Wire(f"127.0.0.1:{lsock.getsockname()[1]}")
    conns: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket, n: int) -> None:
        rfile = conn.makefile("rb")
        try:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = rfile.readline()
                    if not line:
                        return
                    head += line
                body = b""
                lower = head.lower()
                if b"content-length:" in lower:
                    n_body = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                    body = rfile.read(n_body)
                elif b"transfer-encoding: chunked" in lower:
                    while size := int(rfile.readline().split(b";")[0], 16):
                        body += rfile.read(size)
                        rfile.read(2)
                    rfile.readline()
                w.requests.append((n, head, body))
                path = head.split(b" ")[1].decode()
                conn.sendall(answers[path])
                if path in close_after:
                    return
        except OSError:
            return
        finally:
            rfile.close()
            conn.close()

    def accept() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            conn.settimeout(10)
            w.accepted += 1
            conns.append(conn)
            t = threading.Thread(target=serve, args=(conn, w.accepted), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield w
    finally:
        lsock.shutdown(socket.SHUT_RDWR)
        lsock.close()
        acceptor.join(5)
        for c in conns:
            with suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(5)


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


def test_chunked_body_with_extensions_and_trailers() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n"
        b'6 ; quoted="a;b"\r\n world\r\n'
        b"0\r\nX-Digest: sha256:00\r\nX-Other: y\r\n\r\n"
    )
    with wire({"/c": chunked, "/next": ok()}) as w:
        pool = Pool()
        r = pool.request("GET", f"http://{w.host}/c")
        pieces = list(r.iter_raw(3))
        assert b"".join(pieces) == b"hello world"
        assert max(map(len, pieces)) == 3
        assert pool.request("GET", f"http://{w.host}/next").read() == b"ok"
        assert pool.request("GET", f"http://{w.host}/c").read() == b"hello world"
        assert w.accepted == 1  # the trailers were read to their end: the connection was kept
        pool.close()


def test_close_delimited_body_is_read_to_the_end_and_not_reused() -> None:
    with wire({"/c": b"HTTP/1.1 200 OK\r\n\r\nuntil the end"}, frozenset({"/c"})) as w:
        pool = Pool()
        assert pool.request("GET", f"http://{w.host}/c").read() == b"until the end"
        assert pool._idle.get(("http", "127.0.0.1", int(w.host.split(":")[1])), []) == []
        assert pool.request("GET", f"http://{w.host}/c").read() == b"until the end"
        assert w.accepted == 2
        pool.close()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", "10 bytes, 90 more expected"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n9\r\nabc",
            "connection closed after 7 bytes, 6 more expected",
        ),
    ],
)
def test_body_that_ends_early(answer: bytes, message: str) -> None:
    with wire({"/short": answer}, frozenset({"/short"})) as w:
        r = Pool().request("GET", f"http://{w.host}/short")
        with pytest.raises(TransportError, match=message):
            b"".join(r.iter_raw(1 << 20))


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (
            b"Content-Length: 5\r\nContent-Length: 6\r\n",
            "expected one Content-Length, found '5, 6'",
        ),
        (b"Content-Length: 5\r\nContent-Length: 5\r\n", "expected one Content-Length"),
        (b"Content-Length: 5, 6\r\n", "expected one Content-Length, found '5, 6'"),
        (b"Content-Length: -5\r\n", "expected one Content-Length, found '-5'"),
        (b"Content-Length: 0x5\r\n", "expected one Content-Length"),
        (
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "expected Content-Length or Transfer-Encoding, found both",
        ),
        (b"Transfer-Encoding: gzip, chunked\r\n", "expected Transfer-Encoding: chunked"),
    ],
)
def test_bad_framing_is_refused(headers: bytes, message: str) -> None:
    answer = b"HTTP/1.1 200 OK\r\n" + headers + b"\r\nhello"
    with wire({"/x": answer}, frozenset({"/x"})) as w:
        with pytest.raises(TransportError, match=message) as e:
            Pool().request("GET", f"http://{w.host}/x")
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * (70 << 10) + b"\r\n\r\n",
            "expected headers of at most 64 KiB, found more",
        ),
        (
            b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n",
            "expected at most 100 header lines, found more",
        ),
        (
            b"HTTP/1.1 2OO OK\r\n\r\n",
            "expected a status line 'HTTP/1.x NNN reason', found 'HTTP/1.1 2OO",
        ),
        (b"ICY 200 OK\r\n\r\n", "expected a status line 'HTTP/1.x NNN reason', found 'ICY 200 OK"),
        (b"HTTP/2 200\r\n\r\n", "expected a status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "expected a header line 'Name: value'"),
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n", "expected a header line"),
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n", "connection closed in the headers"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "expected a chunk size in hex, found 'zz",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"e" * 5000 + b"\r\n",
            "expected a chunk-size line of at most 4096 bytes",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY0\r\n\r\n",
            "expected CRLF after a chunk, found 'XY'",
        ),
    ],
)
def test_bad_answer_is_one_line_error(answer: bytes, message: str) -> None:
    with wire({"/x": answer}, frozenset({"/x"})) as w:
        with pytest.raises(TransportError) as e:
            Pool().request("GET", f"http://{w.host}/x").read()
        assert message in str(e.value)
        assert "\n" not in str(e.value) and len(str(e.value)) < 200


def test_head_204_304_have_no_body_and_keep_the_connection() -> None:
    answers = {
        # a HEAD answer names the length of the GET body but carries none
        "/blob": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        "/none": b"HTTP/1.1 204 No Content\r\n\r\n",
        "/same": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n",
        "/after": ok(b"after"),
    }
    with wire(answers) as w:
        pool = Pool()
        r = pool.request("HEAD", f"http://{w.host}/blob")
        assert r.status_code == 200 and r.headers.get("content-length") == "1000"
        assert r.read() == b""
        r = pool.request("DELETE", f"http://{w.host}/none")
        assert r.status_code == 204 and r.read() == b""
        r = pool.request("GET", f"http://{w.host}/same")
        assert r.status_code == 304 and r.read() == b""
        assert pool.request("GET", f"http://{w.host}/after").read() == b"after"
        assert w.accepted == 1
        pool.close()


def test_interim_100_continue_is_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(
        b"final", b"X-Final: yes\r\n"
    )
    with wire({"/put": answer}) as w:
        pool = Pool()
        r = pool.request("PUT", f"http://{w.host}/put", content=b"data")
        assert (r.status_code, r.headers.get("x-final"), r.read()) == (200, "yes", b"final")
        assert "link" not in r.headers
        pool.close()


def test_connection_close_and_http10_are_not_reused() -> None:
    answers = {
        "/close": ok(b"bye", b"Connection: close\r\n"),
        "/old": b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold",
        "/old-keep": b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\nConnection: keep-alive\r\n\r\nkeep",
    }
    with wire(answers) as w:  # the server itself keeps every connection open
        pool = Pool()
        assert pool.request("GET", f"http://{w.host}/close").read() == b"bye"
        assert pool.request("GET", f"http://{w.host}/old").read() == b"old"
        assert w.accepted == 2
        assert pool.request("GET", f"http://{w.host}/old-keep").read() == b"keep"
        assert pool.request("GET", f"http://{w.host}/old-keep").read() == b"keep"
        assert w.accepted == 3
        pool.close()


def test_keepalive_reuse_and_request_framing() -> None:
    with wire({"/a": ok(), "/up": ok(b"stored")}) as w:
        pool = Pool(headers={"User-Agent": "t"})
        for _ in range(3):
            assert pool.request("GET", f"http://{w.host}/a").read() == b"ok"
        big = bytes(range(256)) * 400  # above the size sent along with the head
        assert pool.request("PUT", f"http://{w.host}/up", content=big).read() == b"stored"
        r = pool.request("PATCH", f"http://{w.host}/up", content=iter([b"ab", b"", big, b"c"]))
        assert r.read() == b"stored"
        assert pool.request("POST", f"http://{w.host}/up").read() == b"stored"
        assert w.accepted == 1
        heads = [h for _, h, _ in w.requests]
        bodies = [b for _, _, b in w.requests]
        assert heads[0].startswith(f"GET /a HTTP/1.1\r\nHost: {w.host}\r\nUser-Agent: t".encode())
        assert b"Content-Length: 102400\r\n" in heads[3] and bodies[3] == big
        assert b"Transfer-Encoding: chunked\r\n" in heads[4] and bodies[4] == b"ab" + big + b"c"
        assert b"Content-Length: 0\r\n" in heads[5]
        pool.close()


def test_header_injection_is_refused() -> None:
    with wire({"/a": ok()}) as w:
        with pytest.raises(TransportError, match="expected a token and a one-line value"):
            Pool().request("GET", f"http://{w.host}/a", headers={"Authorization": "x\r\nEvil: 1"})
        with pytest.raises(TransportError, match="without spaces"):
            Pool().request("GET", f"http://{w.host}/a b")
        assert w.requests == []


def test_importing_the_registry_client_loads_no_tls_nor_http_client() -> None:
    code = (
        "import coco.oci.registry, sys; "
        "print(sorted(m for m in ('ssl','http.client','email.parser') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_an_answer_sent_before_the_body_was_taken_is_the_answer() -> None:
    """A server may refuse a request without reading its body (413, say) and close: sending
    the rest then fails (EPIPE or a reset), and the answer already sent is what the client gets
    instead of a bare 'Broken pipe'; that connection is not used again."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    host = f"127.0.0.1:{lsock.getsockname()[1]}"

    def refuse() -> None:
        conn, _ = lsock.accept()
        with conn:
            rfile = conn.makefile("rb")
            while rfile.readline() not in (b"\r\n", b""):
                pass
            conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
            conn.shutdown(socket.SHUT_WR)
            with suppress(OSError):  # read a little of the body, then stop reading it at all
                conn.recv(1 << 16)
            rfile.close()

    t = threading.Thread(target=refuse, daemon=True)
    t.start()
    body = (b"x" * (1 << 20) for _ in range(256))  # far more than the socket buffers hold
    try:
        r = Pool().request("PUT", f"http://{host}/upload", content=body)
        assert (r.status_code, r.read()) == (413, b"big")
    finally:
        lsock.close()
        t.join(10)
