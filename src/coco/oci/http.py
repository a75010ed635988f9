"""The registry client's HTTP/1.1 transport: the standard library's ``http.client`` with a
keep-alive pool per origin, streamed bodies both ways, redirects and proxies from the environment.

Why not httpx (which the KBS clients use): a registry pull is often a short process (a second pull
of an image whose layers are all in the store does three small requests), and httpx with httpcore
and h11 costs about 100 ms of imports in every such process, more than the work. ``http.client``
is already half-loaded by the standard library and does the protocol; this module only adds what
a registry client needs on top:

- a thread-safe pool of idle connections per (scheme, host, port), so parallel layer downloads
  each get a connection and sequential requests reuse one;
- an idle connection that the server closed meanwhile is dropped before use; a request on a
  reused connection that fails before any answer is sent again once on a fresh connection (when
  its body can be replayed);
- chunked request bodies from iterators (``http.client`` frames them), ``Content-Length`` for bytes;
- redirects for GET and HEAD (blob storage behind a registry), dropping ``Authorization`` when the
  redirect leaves the origin;
- ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` (CONNECT tunnels for HTTPS);
- a connect timeout and a read timeout.

Errors are :class:`TransportError` (nothing usable came back) with the cause in one line.
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from coco.errors import OciError

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 10
_DRAIN = 64 << 10  # read up to this much of an unwanted body to keep the connection
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class TransportError(OciError):
    """The request could not be completed: connection, TLS, timeout, truncated or bad answer."""


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


class Response:
    """An answer whose body is read on demand: ``content``/``read()`` for all of it,
    :meth:`iter_raw` to stream it. The connection goes back to the pool once the body is read
    to its end; :meth:`close` before that closes the connection instead."""

    def __init__(
        self, pool: Pool, key: _Key, conn: http.client.HTTPConnection, raw: Any, url: str
    ) -> None:
        self._pool = pool
        self._key = key
        self._conn: http.client.HTTPConnection | None = conn
        self._raw: http.client.HTTPResponse = raw
        self.url = url
        self.status_code: int = raw.status
        self.reason_phrase: str = raw.reason or ""
        self.headers = Headers(raw.getheaders())
        self._content: bytes | None = None

    def iter_raw(self, chunk: int = 1 << 16) -> Iterator[bytes]:
        """The body in pieces of ``chunk`` bytes (the last may be shorter)."""
        if self._content is not None:
            for i in range(0, len(self._content), chunk):
                yield self._content[i : i + chunk]
            return
        got = 0
        try:
            while True:
                data = self._raw.read(chunk)
                if not data:
                    break
                got += len(data)
                yield data
        except (http.client.HTTPException, OSError) as e:
            self._discard()
            raise TransportError(_text(e)) from None
        if self._raw.length:  # http.client ends a short Content-Length body quietly
            self._discard()
            raise TransportError(
                f"connection closed after {got} bytes, {self._raw.length} more expected"
            )
        self._release()

    def read(self) -> bytes:
        if self._content is None:
            try:
                self._content = self._raw.read()
            except (http.client.HTTPException, OSError) as e:
                self._discard()
                raise TransportError(_text(e)) from None
            self._release()
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
        left = self._raw.length
        if not self._raw.isclosed() and (left is None or left > _DRAIN):
            self._discard()
            return
        try:
            self._raw.read()
        except (http.client.HTTPException, OSError):
            self._discard()
            return
        self._release()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._raw.will_close:
                conn.close()
            else:
                self._pool.put(self._key, conn)

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


_Key = tuple[str, str, int]


class Pool:
    """Keep-alive connections by origin, shared by threads."""

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float = 15.0,
        read_timeout: float = 120.0,
        headers: Mapping[str, str] | None = None,
        max_idle: int = 8,
    ) -> None:
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._headers = dict(headers or {})
        self._max_idle = max_idle
        self._idle: dict[_Key, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._proxies = _proxies_from_env()

    # -- connections -----------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()  # the system's CAs (and SSL_CERT_FILE/DIR)
        return self._tls

    def _new(self, key: _Key) -> http.client.HTTPConnection:
        scheme, host, port = key
        proxy = _proxy_for(self._proxies, scheme, host)
        conn: http.client.HTTPConnection
        if proxy is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(
                    host, port, timeout=self._connect_timeout, context=self._tls_context()
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self._connect_timeout)
        else:
            p = urllib.parse.urlsplit(proxy)
            if p.scheme != "http" or not p.hostname:
                raise TransportError(f"proxy {proxy}: expected an http://host:port URL")
            pport = p.port or (443 if p.scheme == "https" else 80)
            auth = _proxy_auth(p)
            if scheme == "https":
                conn = http.client.HTTPSConnection(
                    p.hostname or "", pport, timeout=self._connect_timeout,
                    context=self._tls_context(),
                )  # fmt: skip
                conn.set_tunnel(host, port, headers=auth)
            else:  # plain HTTP through the proxy: absolute URLs to it (see _target)
                conn = http.client.HTTPConnection(
                    p.hostname or "", pport, timeout=self._connect_timeout
                )
                conn._coco_proxy_auth = auth  # type: ignore[attr-defined]
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise TransportError(f"cannot connect to {host}:{port}: {_text(e)}") from None
        assert conn.sock is not None
        conn.sock.settimeout(self._read_timeout)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _get(self, key: _Key) -> tuple[http.client.HTTPConnection, bool]:
        while True:
            with self._lock:
                idle = self._idle.get(key)
                conn = idle.pop() if idle else None
            if conn is None:
                return self._new(key), False
            if _alive(conn):
                return conn, True
            conn.close()

    def put(self, key: _Key, conn: http.client.HTTPConnection) -> None:
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
        hdrs = {**self._headers, **(headers or {})}
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
        key: _Key = (u.scheme, u.hostname, port)
        replayable = content is None or isinstance(content, bytes | bytearray)
        while True:
            conn, reused = self._get(key)
            target = u.path or "/"
            if u.query:
                target += "?" + u.query
            hdrs = headers
            auth = getattr(conn, "_coco_proxy_auth", None)
            if auth is not None:  # plain HTTP through a forward proxy
                target = urllib.parse.urlunsplit((u.scheme, u.netloc, target, "", ""))
                hdrs = {**headers, **auth}
            try:
                conn.request(method, target, body=content, headers=hdrs)
                raw = conn.getresponse()
            except _STALE as e:
                conn.close()
                if reused and replayable:
                    continue  # the server closed the idle connection: once more, on a new one
                raise TransportError(_text(e)) from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise TransportError(_text(e)) from None
            except BaseException:  # the body's iterator failed (a digest check, say)
                conn.close()
                raise
            return Response(self, key, conn, raw, url)


def _alive(conn: http.client.HTTPConnection) -> bool:
    """An idle connection is reusable if the peer has not closed it: nothing to read yet."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _origin(url: str) -> tuple[str, str]:
    u = urllib.parse.urlsplit(url)
    return u.scheme, u.netloc.lower()


def _text(e: BaseException) -> str:
    if isinstance(e, http.client.IncompleteRead):
        return f"connection closed after {len(e.partial)} bytes, {e.expected} more expected"
    if isinstance(e, socket.timeout | TimeoutError):
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
