"""The registry client's HTTP/1.1 transport: a small client on ``socket`` with a keep-alive pool
per origin, streamed bodies both ways, redirects and proxies from the environment.

Why its own: a registry pull is often a short process (a second pull of an image whose layers are
all in the store does three small requests) in which start-up is most of the time. httpx costs
about 100 ms of imports, the standard library's ``http.client`` about 10 ms (it loads ``ssl`` and
the ``email`` package to parse headers). This module loads neither; ``ssl`` is imported when the
first https connection is made. What it does:

- a thread-safe pool of idle connections per (scheme, host, port), so parallel layer downloads
  each get a connection and sequential requests reuse one (``TCP_NODELAY`` on all);
- an idle connection that the server closed meanwhile is dropped before use; a request on a
  reused connection that fails before any answer is sent again once on a fresh connection (when
  its body can be replayed);
- request bodies: ``Content-Length`` for bytes, chunked for iterators;
- answers are read strictly and within bounds: a status line ``HTTP/1.x NNN reason``, at most
  100 header lines in 64 KiB, a body framed by ``Transfer-Encoding: chunked`` (chunk extensions
  and trailers skipped), by one ``Content-Length`` or by the end of the connection (which is then
  not reused); no body for HEAD, 204 and 304; interim 1xx answers skipped. A connection is kept
  unless the answer says ``Connection: close`` (or is HTTP/1.0 without ``keep-alive``);
- redirects for GET and HEAD (blob storage behind a registry), dropping ``Authorization`` when the
  redirect leaves the origin;
- ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` (CONNECT tunnels for HTTPS, absolute-form
  request targets for plain HTTP);
- a connect timeout (TLS handshake included) and a read timeout.

Errors are :class:`TransportError` (nothing usable came back) with the cause in one line.
"""

from __future__ import annotations

import os
import re
import select
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping

from coco.errors import OciError

TYPE_CHECKING = False  # typing stays unloaded in short processes
if TYPE_CHECKING:
    import ssl
    from typing import Any, BinaryIO

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 10
_DRAIN = 64 << 10  # read up to this much of an unwanted body to keep the connection
_MAX_HEAD = 64 << 10  # status line and header lines of one answer (and a chunked body's trailers)
_MAX_FIELDS = 100  # header lines of one answer
_MAX_INTERIM = 10  # 1xx answers before the final one
_MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
_READ_BUFFER = 64 << 10
_SEND_JOIN = 16 << 10  # smaller request bodies go out in one send with their framing

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([^\r\n]*))?\r?\n")
_FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_LENGTH = re.compile(r"[0-9]{1,18}")


class TransportError(OciError):
    """The request could not be completed: connection, TLS, timeout, truncated or bad answer."""


class _NoAnswer(TransportError):
    """The connection ended before the first byte of an answer (a reused one: the server closed
    it while idle)."""


_STALE = (_NoAnswer, ConnectionResetError, BrokenPipeError)


class Headers:
    """Response headers, looked up without regard to case (the first value of a repeated one)."""

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._d: dict[str, str] = {}
        for k, v in items:
            self._d.setdefault(k.lower(), v)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._d.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._d


class _Conn:
    """One connection: its socket, a buffered reader on it and, through a forward proxy, the
    proxy's headers (requests then name the absolute URL)."""

    __slots__ = ("proxy_headers", "rfile", "sock")

    def __init__(self, sock: socket.socket, proxy_headers: dict[str, str] | None) -> None:
        self.sock = sock
        self.rfile: BinaryIO = sock.makefile("rb", buffering=_READ_BUFFER)
        self.proxy_headers = proxy_headers

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


# how an answer's body ends
_UNTIL_CLOSE, _BY_LENGTH, _CHUNKED = 0, 1, 2


class Response:
    """An answer whose body is read on demand: ``content``/``read()`` for all of it,
    :meth:`iter_raw` to stream it. The connection goes back to the pool once the body is read
    to its end; :meth:`close` before that closes the connection instead."""

    def __init__(
        self,
        pool: Pool,
        key: _Key,
        conn: _Conn,
        url: str,
        head: _Head,
        framing: tuple[int, int, bool],
    ) -> None:
        self._pool = pool
        self._key = key
        self._conn: _Conn | None = conn
        self.url = url
        self.status_code, self.reason_phrase, fields = head
        self.headers = Headers(fields)
        self._mode, self._left, self._keep = framing  # _left: of the body, or the current chunk
        self._got = 0
        self._content: bytes | None = None
        if self._mode == _BY_LENGTH and self._left == 0:
            self._release()

    def iter_raw(self, chunk: int = 1 << 16) -> Iterator[bytes]:
        """The body in pieces of at most ``chunk`` bytes."""
        if self._content is not None:
            for i in range(0, len(self._content), chunk):
                yield self._content[i : i + chunk]
            return
        while data := self._read_some(chunk):
            yield data

    def read(self) -> bytes:
        if self._content is None:
            parts = []
            while data := self._read_some(min(max(self._left, 1 << 16), 1 << 20)):
                parts.append(data)
            self._content = parts[0] if len(parts) == 1 else b"".join(parts)
        return self._content

    @property
    def content(self) -> bytes:
        return self.read()

    def json(self) -> Any:
        import json

        return json.loads(self.read())

    def close(self) -> None:
        """Done with this answer. What is left of a small body is read so that the connection
        can be used again; a larger rest costs the connection."""
        if self._conn is None:
            return
        if self._mode == _UNTIL_CLOSE or (self._mode == _BY_LENGTH and self._left > _DRAIN):
            self._discard()
            return
        budget = _DRAIN
        try:
            while budget > 0 and (data := self._read_some(min(budget, 1 << 16))):
                budget -= len(data)
        except TransportError:
            return
        self._discard()  # still open: the rest was too long

    def _read_some(self, n: int) -> bytes:
        """Up to ``n`` (> 0) bytes of the body, b"" at its end (the connection then released)."""
        conn = self._conn
        if conn is None:
            return b""
        try:
            if self._mode == _BY_LENGTH:
                want = min(n, self._left)
                data = conn.rfile.read(want)
                if len(data) < want:
                    self._closed_early(len(data), self._left)
                self._left -= len(data)
            elif self._mode == _CHUNKED:
                data = self._chunk(conn.rfile, n)
            else:
                data = conn.rfile.read(n)
        except OSError as e:
            self._discard()
            raise TransportError(_text(e)) from None
        except TransportError:
            self._discard()
            raise
        self._got += len(data)
        if not data or (self._mode == _BY_LENGTH and self._left == 0):
            self._release()
        return data

    def _chunk(self, rfile: BinaryIO, n: int) -> bytes:
        if self._left == 0:  # at a chunk-size line
            line = rfile.readline(_MAX_CHUNK_LINE + 1)
            if not line.endswith(b"\n"):
                if len(line) > _MAX_CHUNK_LINE:
                    raise TransportError(
                        f"expected a chunk-size line of at most {_MAX_CHUNK_LINE} bytes, "
                        "found a longer one"
                    )
                raise TransportError(
                    f"connection closed after {self._got} bytes, expected a chunk size"
                )
            size = line.split(b";", 1)[0].strip(b" \t\r\n")
            if not _CHUNK_SIZE.fullmatch(size):
                raise TransportError(f"expected a chunk size in hex, found {_show(line)}")
            self._left = int(size, 16)
            if self._left == 0:
                _read_fields(rfile, "trailer")
                return b""
        data = rfile.read(min(n, self._left))
        if len(data) < min(n, self._left):
            self._closed_early(len(data), self._left)
        self._left -= len(data)
        if self._left == 0:
            end = rfile.read(2)
            if end != b"\r\n":
                if len(end) < 2:
                    raise TransportError(
                        f"connection closed after {self._got + len(data)} bytes, "
                        "expected the end of a chunk"
                    )
                raise TransportError(f"expected CRLF after a chunk, found {_show(end)}")
        return data

    def _closed_early(self, got: int, left: int) -> None:
        raise TransportError(
            f"connection closed after {self._got + got} bytes, {left - got} more expected"
        )

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._keep:
                self._pool.put(self._key, conn)
            else:
                conn.close()

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


_Key = tuple[str, str, int]
_Head = tuple[int, str, list[tuple[str, str]]]


class Pool:
    """Keep-alive connections by origin, shared by threads. ``tls`` is the TLS context for https
    (default: the system's CAs), or a function that makes it when the first https connection
    needs it (None from it: the default)."""

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | Callable[[], ssl.SSLContext | None] | None = None,
        connect_timeout: float = 15.0,
        read_timeout: float = 120.0,
        headers: Mapping[str, str] | None = None,
        max_idle: int = 8,
    ) -> None:
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._headers = _checked_headers(headers or {})
        self._max_idle = max_idle
        self._idle: dict[_Key, list[_Conn]] = {}
        self._lock = threading.Lock()
        self._proxies = _proxies_from_env()

    # -- connections -----------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        tls = self._tls
        if callable(tls):
            tls = tls()
        if tls is None:
            import ssl

            tls = ssl.create_default_context()  # the system's CAs (and SSL_CERT_FILE/DIR)
        self._tls = tls
        return tls

    def _new(self, key: _Key) -> _Conn:
        scheme, host, port = key
        proxy = _proxy_for(self._proxies, scheme, host)
        proxy_headers = None
        via = ""
        if proxy is None:
            addr = (host, port)
        else:
            p = urllib.parse.urlsplit(proxy)
            if p.scheme != "http" or not p.hostname:
                raise TransportError(f"proxy {proxy}: expected an http://host:port URL")
            try:
                addr = (p.hostname, p.port or 80)
            except ValueError:
                raise TransportError(f"proxy {proxy}: expected an http://host:port URL") from None
            via = f" through proxy {addr[0]}:{addr[1]}"
            proxy_headers = _proxy_auth(p)
        sock: socket.socket | None = None
        try:
            # an ASCII name as bytes: getaddrinfo would load the idna codec (~1 ms) for a str
            name = addr[0].encode() if addr[0].isascii() else addr[0]
            sock = socket.create_connection((name, addr[1]), timeout=self._connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                if proxy_headers is not None:
                    _tunnel(sock, host, port, proxy_headers)
                    proxy_headers = None
                sock = self._tls_context().wrap_socket(sock, server_hostname=host)
            sock.settimeout(self._read_timeout)
        except (OSError, TransportError) as e:
            if sock is not None:
                sock.close()
            raise TransportError(f"cannot connect to {host}:{port}{via}: {_text(e)}") from None
        return _Conn(sock, proxy_headers)

    def _get(self, key: _Key) -> tuple[_Conn, bool]:
        while True:
            with self._lock:
                idle = self._idle.get(key)
                conn = idle.pop() if idle else None
            if conn is None:
                return self._new(key), False
            if _alive(conn):
                return conn, True
            conn.close()

    def put(self, key: _Key, conn: _Conn) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._max_idle:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()

    # -- requests --------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | Iterable[bytes] | None = None,
        follow: bool = False,
    ) -> Response:
        """Send one request (following redirects for GET/HEAD when ``follow``); the answer's
        body is not read yet."""
        hdrs = {**self._headers, **_checked_headers(headers or {})}
        for _ in range(_MAX_REDIRECTS + 1):
            resp = self._once(method, url, hdrs, content)
            if not (follow and resp.status_code in _REDIRECTS and method in ("GET", "HEAD")):
                return resp
            loc = resp.headers.get("location")
            if not loc:
                return resp
            resp.close()
            nxt = urllib.parse.urljoin(url, loc)
            if _origin(nxt) != _origin(url):
                hdrs = {k: v for k, v in hdrs.items() if k.lower() != "authorization"}
            url = nxt
        raise TransportError(f"{method} {url}: more than {_MAX_REDIRECTS} redirects")

    def _once(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        content: bytes | Iterable[bytes] | None,
    ) -> Response:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise TransportError(f"{url}: expected an http(s) URL")
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
        except ValueError:
            raise TransportError(f"{url}: bad port") from None
        target = u.path or "/"
        if u.query:
            target += "?" + u.query
        if not _NAME.fullmatch(method) or not target.isascii() or _BAD_TARGET.search(target):
            raise TransportError(
                f"{method} {url}: expected a token and an ASCII URL without spaces"
            )
        netloc = u.netloc.rpartition("@")[2]
        key: _Key = (u.scheme, u.hostname, port)
        replayable = content is None or isinstance(content, bytes | bytearray)
        while True:
            conn, reused = self._get(key)
            if conn.proxy_headers is None:
                head = _request_head(method, target, netloc, headers, content)
            else:  # plain HTTP through a forward proxy: the absolute URL
                absolute = f"{u.scheme}://{netloc}{target}"
                head = _request_head(
                    method, absolute, netloc, {**headers, **conn.proxy_headers}, content
                )
            try:
                _send(conn.sock, head, content)
            except (BrokenPipeError, ConnectionResetError) as e:
                # the server may have answered and closed before taking the whole body (an early
                # error, or a reply that ignores the body): that answer is the one that counts
                early = _early_answer(conn, method)
                if early is None:
                    conn.close()
                    if reused and replayable:
                        continue  # the server closed the idle connection: once more, anew
                    raise TransportError(_text(e)) from None
                (mode, left, _keep) = early[1]
                return Response(self, key, conn, url, early[0], (mode, left, False))
            except OSError as e:
                conn.close()
                raise TransportError(_text(e)) from None
            except BaseException:  # the body's iterator failed (a digest check, say)
                conn.close()
                raise
            try:
                answer = _read_answer(conn.rfile, method)
            except _STALE as e:
                conn.close()
                if reused and replayable:
                    continue  # the server closed the idle connection: once more, on a new one
                raise TransportError(_text(e)) from None
            except OSError as e:
                conn.close()
                raise TransportError(_text(e)) from None
            except BaseException:  # a bad answer, or the body's iterator failed (a digest check)
                conn.close()
                raise
            return Response(self, key, conn, url, *answer)


# -- the wire --------------------------------------------------------------------------------------


def _checked_headers(headers: Mapping[str, str]) -> dict[str, str]:
    for k, v in headers.items():
        if not _NAME.fullmatch(k) or _BAD_VALUE.search(v):
            raise TransportError(f"request header {k!r}: expected a token and a one-line value")
    return dict(headers)


def _request_head(
    method: str,
    target: str,
    host: str,
    headers: Mapping[str, str],
    content: bytes | Iterable[bytes] | None,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += (f"{k}: {v}" for k, v in headers.items())
    names = {k.lower() for k in headers}
    if "accept-encoding" not in names:
        lines.append("Accept-Encoding: identity")
    if isinstance(content, bytes | bytearray):
        lines.append(f"Content-Length: {len(content)}")
    elif content is not None:
        lines.append("Transfer-Encoding: chunked")
    elif method in ("POST", "PUT", "PATCH"):
        lines.append("Content-Length: 0")
    lines += ("", "")
    try:
        return "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise TransportError(
            f"{method} {target}: request headers: expected Latin-1 text, found other characters"
        ) from None


def _send(sock: socket.socket, head: bytes, content: bytes | Iterable[bytes] | None) -> None:
    if content is None:
        sock.sendall(head)
    elif isinstance(content, bytes | bytearray):
        if len(content) <= _SEND_JOIN:
            sock.sendall(head + content)
        else:
            sock.sendall(head)
            sock.sendall(content)
    else:
        sock.sendall(head)
        for piece in content:
            n = len(piece)
            if not n:
                continue  # an empty chunk would end the body
            if n <= _SEND_JOIN:
                sock.sendall(b"%X\r\n%b\r\n" % (n, piece))
            else:
                sock.sendall(b"%X\r\n" % n)
                sock.sendall(piece)
                sock.sendall(b"\r\n")
        sock.sendall(b"0\r\n\r\n")


def _early_answer(conn: _Conn, method: str) -> tuple[_Head, tuple[int, int, bool]] | None:
    """An answer the server sent before it stopped reading our request, if a whole head of one
    is there (the connection is not used again after it)."""
    try:
        return _read_answer(conn.rfile, method)
    except (OSError, TransportError, _NoAnswer):
        return None


def _read_answer(rfile: BinaryIO, method: str) -> tuple[_Head, tuple[int, int, bool]]:
    """The final answer's head (interim 1xx ones skipped) and how its body is framed."""
    for _ in range(_MAX_INTERIM + 1):
        line = rfile.readline(_MAX_HEAD + 1)
        if not line:
            raise _NoAnswer("connection closed before an answer")
        m = _STATUS_LINE.fullmatch(line)
        if m is None:
            if not line.endswith(b"\n") and len(line) <= _MAX_HEAD:
                raise TransportError(f"connection closed in the status line {_show(line)}")
            raise TransportError(
                f"expected a status line 'HTTP/1.x NNN reason', found {_show(line)}"
            )
        status = int(m.group(2))
        fields = _read_fields(rfile, "header", _MAX_HEAD - len(line))
        if status == 101 or status >= 200:
            break
    else:
        raise TransportError(f"expected a final answer, found more than {_MAX_INTERIM} 1xx ones")
    if status == 101:
        raise TransportError("expected an HTTP answer, found 101 Switching Protocols")
    reason = (m.group(3) or b"").decode("latin-1").strip()
    minor = int(m.group(1))
    return (status, reason, fields), _framing(method, status, minor, fields)


def _read_fields(rfile: BinaryIO, what: str, budget: int = _MAX_HEAD) -> list[tuple[str, str]]:
    """Header (or trailer) lines up to the empty line, as (name, value)."""
    fields: list[tuple[str, str]] = []
    while True:
        line = rfile.readline(budget + 1)
        budget -= len(line)
        if not line.endswith(b"\n"):
            if budget < 0:
                raise TransportError(
                    f"expected {what}s of at most {_MAX_HEAD >> 10} KiB, found more"
                )
            raise TransportError(f"connection closed in the {what}s")
        if line in (b"\r\n", b"\n"):
            return fields
        if len(fields) == _MAX_FIELDS:
            raise TransportError(f"expected at most {_MAX_FIELDS} {what} lines, found more")
        name, colon, value = line.partition(b":")
        value = value.rstrip(b"\r\n").strip(b" \t")
        if not colon or not _FIELD_NAME.fullmatch(name) or b"\r" in value or b"\0" in value:
            raise TransportError(f"expected a {what} line 'Name: value', found {_show(line)}")
        fields.append((name.decode("ascii"), value.decode("latin-1")))


def _framing(
    method: str, status: int, minor: int, fields: list[tuple[str, str]]
) -> tuple[int, int, bool]:
    """(how the body ends, its length if known, whether the connection is kept after it)."""
    connection = {t.strip().lower() for v in _values(fields, "connection") for t in v.split(",")}
    keep = "close" not in connection and (minor == 1 or "keep-alive" in connection)
    if method == "HEAD" or status in (204, 304):
        return _BY_LENGTH, 0, keep
    codings = [
        t.strip().lower() for v in _values(fields, "transfer-encoding") for t in v.split(",")
    ]
    lengths = _values(fields, "content-length")
    if codings:
        if codings != ["chunked"] or minor == 0:
            raise TransportError(
                f"expected Transfer-Encoding: chunked in HTTP/1.1, found {', '.join(codings)} "
                f"in HTTP/1.{minor}"
            )
        if lengths:
            raise TransportError("expected Content-Length or Transfer-Encoding, found both")
        return _CHUNKED, 0, keep
    if lengths:
        if len(lengths) > 1 or not _LENGTH.fullmatch(lengths[0]):
            raise TransportError(f"expected one Content-Length, found {', '.join(lengths)!r}")
        return _BY_LENGTH, int(lengths[0]), keep
    return _UNTIL_CLOSE, 0, False


def _values(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in fields if k.lower() == name]


def _tunnel(sock: socket.socket, host: str, port: int, headers: dict[str, str]) -> None:
    """Ask a forward proxy for a tunnel to ``host:port`` (HTTP CONNECT)."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    lines += (f"{k}: {v}" for k, v in headers.items())
    sock.sendall("\r\n".join([*lines, "", ""]).encode("latin-1"))
    with sock.makefile("rb", buffering=0) as rfile:  # unbuffered: TLS follows on the socket
        (status, reason, _), _ = _read_answer(rfile, "CONNECT")  # type: ignore[arg-type]
    if status != 200:
        raise TransportError(f"proxy answered {status} {reason} to CONNECT {target}")


def _alive(conn: _Conn) -> bool:
    """An idle connection is reusable if the peer has not closed it: nothing to read yet."""
    try:
        readable, _, _ = select.select([conn.sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _show(data: bytes) -> str:
    text = data.decode("latin-1")
    return repr(text[:60] + "..." if len(text) > 60 else text)


def _origin(url: str) -> tuple[str, str]:
    u = urllib.parse.urlsplit(url)
    return u.scheme, u.netloc.lower()


def _text(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    msg = str(e) or type(e).__name__
    return " ".join(msg.split())


def _proxies_from_env() -> dict[str, str]:
    """``{"http": url, "https": url, "no": "host,..."}`` from the usual variables (lower case
    first, as curl does)."""
    out: dict[str, str] = {}
    for scheme in ("http", "https", "all", "no"):
        v = os.environ.get(f"{scheme}_proxy") or os.environ.get(f"{scheme.upper()}_PROXY")
        if v:
            out[scheme] = v
    return out


def _proxy_for(proxies: dict[str, str], scheme: str, host: str) -> str | None:
    url = proxies.get(scheme) or proxies.get("all")
    if not url:
        return None
    for pat in (p.strip().lower() for p in proxies.get("no", "").split(",")):
        if not pat:
            continue
        if pat == "*":
            return None
        pat = pat.split(":")[0].lstrip(".")
        h = host.lower()
        if h == pat or h.endswith("." + pat):
            return None
    return url if "://" in url else "http://" + url


def _proxy_auth(p: urllib.parse.SplitResult) -> dict[str, str]:
    if p.username is None:
        return {}
    import base64

    user = urllib.parse.unquote(p.username)
    pw = urllib.parse.unquote(p.password or "")
    tok = base64.b64encode(f"{user}:{pw}".encode()).decode()
    return {"Proxy-Authorization": f"Basic {tok}"}
