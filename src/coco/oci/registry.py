"""A distribution-spec registry client: ping, auth (anonymous, basic, bearer token), manifests,
streamed blob download with digest verification, monolithic/streamed/chunked upload and
cross-repository mount.

One :class:`RegistryClient` talks to one registry host and is safe to share between threads.
With ``tls_verify=False`` it talks HTTPS without certificate checks and falls back to plain HTTP
when the registry does not speak TLS (like skopeo's ``--tls-verify=false``). Such a fallback is
remembered across processes (an empty file ``$XDG_CACHE_HOME/coco/http-registries/HOST[:PORT]``),
so that the next client with ``tls_verify=False`` goes straight to plain HTTP and tries HTTPS only
if that fails, and forgets it once HTTPS works there again. Best effort: an unwritable cache is no
memory. With ``tls_verify=True`` the memory is never read: plain HTTP stays impossible.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path

import coco.log
from coco import __version__
from coco.crypto.digest import HashingReader, sha256_digest
from coco.errors import AuthError, CocoError, DigestMismatchError, RegistryError
from coco.files import cache_dir
from coco.oci import mediatypes as mt
from coco.oci.auth import Credentials
from coco.oci.http import Pool, Response, TransportError
from coco.record import record

TYPE_CHECKING = False  # typing stays unloaded in short processes
if TYPE_CHECKING:
    import ssl  # loaded only when a TLS connection is made

log = coco.log.get(__name__)  # logging loads only if a record needs it
CHUNK = 1 << 20
_UA = f"coco/{__version__}"


@record
class Challenge:
    """A parsed ``WWW-Authenticate`` header."""

    scheme: str  # "basic" or "bearer"
    params: dict[str, str]

    @classmethod
    def parse(cls, header: str) -> Challenge:
        scheme, _, rest = header.strip().partition(" ")
        params = {
            k.lower(): v
            for k, v in re.findall(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*"((?:[^"\\]|\\.)*)"', rest)
        }
        for k, v in re.findall(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*([^",\s]+)', rest):
            params.setdefault(k.lower(), v)
        return cls(scheme.lower(), params)


CERTS_D = (Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d"))
"""Where a registry's own CA and client certificate are found (containers-certs.d(5))."""
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


def _verified_tls(registry: str, cert_dir: Path | None) -> ssl.SSLContext | None:
    """The system's CAs plus, as containers-certs.d(5) has it, every ``*.crt`` of ``cert_dir``
    (default: ``/etc/containers/certs.d/HOST[:PORT]/``, else docker's) and a client certificate
    ``NAME.cert`` with its ``NAME.key``; None when there is no such directory."""
    if cert_dir is None:
        cert_dir = next((d / registry for d in CERTS_D if (d / registry).is_dir()), None)
        if cert_dir is None:
            return None
    try:
        names = sorted(os.listdir(cert_dir))
    except OSError as e:
        raise RegistryError(
            f"{registry}: cert dir {cert_dir}: cannot read it: {e.strerror}"
        ) from None
    import ssl

    ctx = ssl.create_default_context()
    for name in names:
        path = cert_dir / name
        try:
            if name.endswith(".crt"):
                ctx.load_verify_locations(cafile=str(path))
            elif name.endswith(".cert"):
                key = path.with_suffix(".key")
                if not key.exists():
                    raise RegistryError(
                        f"{registry}: cert dir {cert_dir}: expected {key.name} beside {name}, "
                        "found none"
                    )
                ctx.load_cert_chain(str(path), str(key))
        except (ssl.SSLError, OSError) as e:
            raise RegistryError(f"{registry}: cert dir {cert_dir}: {name}: {e}") from None
    return ctx


@functools.cache
def _unverified_tls() -> ssl.SSLContext:
    """TLS without certificate checks, for ``--tls-verify=false`` (no CA bundle loaded)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_HOST_PORT = re.compile(r"([A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")


def _plain_http_mark(host: str) -> Path | None:
    """The file whose presence says that ``host`` (``name[:port]``) speaks plain HTTP."""
    if not _HOST_PORT.fullmatch(host):
        return None
    return cache_dir("http-registries", host)


def _remember_plain_http(mark: Path, plain: bool) -> None:
    """Record (``plain``) or forget that a registry speaks plain HTTP; best effort."""
    try:
        if plain:
            from coco.files import atomic_write

            mark.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(mark, b"")
        else:
            mark.unlink(missing_ok=True)
    except OSError as e:
        log.debug("%s: cannot update the scheme memory: %s", mark, e)


class RegistryClient:
    """Client for one registry host (``host[:port]``)."""

    def __init__(
        self,
        registry: str,
        *,
        credentials: Credentials | None = None,
        tls_verify: bool = True,
        timeout: float = 120.0,
        cert_dir: Path | None = None,
        retry_times: int = 0,
        retry_delay: float = 1.0,
    ) -> None:
        self.registry = registry
        self._host = "registry-1.docker.io" if registry == "docker.io" else registry
        self._creds = credentials
        self._tls_verify = tls_verify
        self._retries = max(0, retry_times)
        self._retry_delay = retry_delay
        self._http = Pool(
            tls=_verified_tls(registry, cert_dir) if tls_verify else _unverified_tls,
            connect_timeout=15.0,
            read_timeout=timeout,
            headers={"User-Agent": _UA},
        )
        self._base: str | None = None
        self._challenge: Challenge | None = None
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- connection and auth -------------------------------------------------------------------

    def ping(self, what: str | None = None) -> None:
        """Find the scheme (HTTPS, or HTTP when TLS verification is off) and the auth challenge;
        a registry that cannot be reached is tried ``retry_times`` more times."""
        what = what or self.registry
        for attempt in range(self._retries + 1):
            try:
                return self._ping(what)
            except RegistryError as e:
                if attempt == self._retries or "cannot connect" not in str(e):
                    raise
                self._backoff(attempt, what, "cannot connect")

    def _ping(self, what: str) -> None:
        with self._lock:
            if self._base is not None:
                return
            mark = None if self._tls_verify else _plain_http_mark(self._host)
            remembered = mark is not None and mark.exists()
            if self._tls_verify:
                schemes = ["https"]
            else:
                schemes = ["http", "https"] if remembered else ["https", "http"]
            failed: dict[str, Exception] = {}
            odd: RegistryError | None = None  # what a remembered plain-HTTP port answered
            for scheme in schemes:
                url = f"{scheme}://{self._host}/v2/"
                try:
                    resp = self._http.request("GET", url)
                    resp.read()
                except TransportError as e:
                    failed[scheme] = e
                    continue
                if resp.status_code == 401:
                    hdr = resp.headers.get("www-authenticate", "")
                    self._challenge = Challenge.parse(hdr) if hdr else Challenge("basic", {})
                elif resp.status_code != 200 and resp.status_code != 404:
                    odd = RegistryError(f"{what}: ping {url}: registry answered {_status(resp)}")
                    if scheme == "http" and remembered:
                        continue  # it may speak TLS now (Go answers plain HTTP there with 400)
                    raise odd
                self._base = f"{scheme}://{self._host}"
                if mark is not None and (scheme == "http") != remembered:
                    _remember_plain_http(mark, scheme == "http")
                return
            if odd is not None:
                raise odd
            hint = (
                " (a plain-HTTP registry? then set --tls-verify=false)" if self._tls_verify else ""
            )
            last = failed.get("http") or failed.get("https")
            raise RegistryError(
                f"{what}: cannot connect to {self.registry}: {_exc_text(last)}{hint}"
            )

    def _backoff(self, attempt: int, what: str, why: str, retry_after: str = "") -> None:
        """Wait before attempt ``attempt + 1``: doubling from ``retry_delay``, or the registry's
        Retry-After (at most a minute)."""
        delay = self._retry_delay * (1 << attempt)
        if retry_after.isdigit():
            delay = min(max(delay, float(retry_after)), 60.0)
        log.warning(
            "%s: %s; retrying in %.1f s (%d/%d)", what, why, delay, attempt + 1, self._retries
        )
        time.sleep(delay)

    def _token(self, scopes: tuple[str, ...]) -> str:
        key = " ".join(scopes)
        with self._lock:
            tok = self._tokens.get(key)
        if tok is not None:
            return tok
        assert self._challenge is not None
        realm = self._challenge.params.get("realm")
        if not realm:
            raise AuthError(f"{self.registry}: bearer challenge without a realm")
        params: list[tuple[str, str]] = []
        if "service" in self._challenge.params:
            params.append(("service", self._challenge.params["service"]))
        params.extend(("scope", s) for s in scopes)
        headers = {"Authorization": self._creds.basic()} if self._creds else {}
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(params)
        try:
            resp = self._http.request("GET", url, headers=headers)
            resp.read()
        except TransportError as e:
            raise AuthError(f"{self.registry}: token endpoint {realm}: {_exc_text(e)}") from None
        if resp.status_code in (401, 403):
            raise AuthError(
                f"{self.registry}: token endpoint {realm} refused the "
                f"{'credentials' if self._creds else 'anonymous request'}: {_status(resp)}"
            )
        if resp.status_code != 200:
            raise AuthError(f"{self.registry}: token endpoint {realm} answered {_status(resp)}")
        try:
            body = resp.json()
            tok = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            tok = None
        if not isinstance(tok, str) or not tok:
            raise AuthError(f"{self.registry}: token endpoint {realm}: no token in the answer")
        with self._lock:
            self._tokens[key] = tok
        return tok

    def _auth_headers(self, scopes: tuple[str, ...]) -> dict[str, str]:
        ch = self._challenge
        if ch is None:
            return {}
        if ch.scheme == "basic":
            if self._creds is None:
                return {}
            return {"Authorization": self._creds.basic()}
        if ch.scheme == "bearer":
            return {"Authorization": "Bearer " + self._token(scopes)}
        raise AuthError(f"{self.registry}: unsupported auth scheme {ch.scheme!r}")

    def _send(
        self,
        method: str,
        url: str,
        scopes: tuple[str, ...],
        what: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | Iterable[bytes] | None = None,
        stream: bool = False,
        follow: bool = False,
        _retried: bool = False,
    ) -> Response:
        self.ping(what)
        assert self._base is not None
        if url.startswith("/"):
            url = self._base + url
        hdrs = {**(headers or {}), **self._auth_headers(scopes)}
        replayable = not isinstance(content, Iterator)
        for attempt in range(self._retries + 1):
            again = replayable and attempt < self._retries  # connection errors, 5xx and 429
            try:
                resp = self._http.request(method, url, headers=hdrs, content=content, follow=follow)
                if not stream:
                    resp.read()
            except TransportError as e:
                if not again:
                    raise RegistryError(f"{what}: {method} {url}: {_exc_text(e)}") from None
                self._backoff(attempt, what, f"{method} {url}: {_exc_text(e)}")
                continue
            if resp.status_code in _RETRY_STATUS and again:
                resp.close()
                self._backoff(
                    attempt, what, f"{method} {url}: {_status(resp, read=False)}",
                    resp.headers.get("retry-after", ""),
                )  # fmt: skip
                continue
            break
        if resp.status_code == 401 and not _retried and replayable:
            hdr = resp.headers.get("www-authenticate", "")
            retry = False
            if self._challenge is None and hdr:
                # The registry asks for auth on this path although /v2/ did not: learn it.
                self._challenge = Challenge.parse(hdr)
                retry = True
            elif self._challenge is not None and self._challenge.scheme == "bearer":
                # The token may have expired: fetch a fresh one once.
                with self._lock:
                    self._tokens.pop(" ".join(scopes), None)
                retry = True
            if retry:
                resp.close()
                return self._send(
                    method,
                    url,
                    scopes,
                    what,
                    headers=headers,
                    content=content,
                    stream=stream,
                    follow=follow,
                    _retried=True,
                )
        if resp.status_code == 401:
            detail = _status(resp, read=not stream)
            resp.close()
            if self._creds is None:
                raise AuthError(
                    f"{what}: authentication required: {detail} (give --creds USER[:PASS], or "
                    "--authfile FILE with an auths entry or a credHelpers one for "
                    f"{self.registry})"
                )
            raise AuthError(
                f"{what}: credentials for user {self._creds.username!r} refused: {detail}"
            )
        return resp

    # --- manifests -----------------------------------------------------------------------------

    def get_manifest(self, repo: str, reference: str, what: str) -> tuple[bytes, str]:
        """The raw manifest bytes and their media type (digest-checked for a digest reference)."""
        resp = self._send(
            "GET",
            f"/v2/{repo}/manifests/{reference}",
            (f"repository:{repo}:pull",),
            what,
            headers={"Accept": mt.MANIFEST_ACCEPT},
        )
        if resp.status_code != 200:
            raise RegistryError(f"{what}: manifest: registry answered {_status(resp)}")
        raw = resp.content
        if reference.startswith("sha256:") and sha256_digest(raw) != reference:
            raise DigestMismatchError(
                f"{what}: manifest digest mismatch: expected {reference}, got {sha256_digest(raw)}"
            )
        ctype = resp.headers.get("content-type", "").split(";")[0].strip()
        return raw, ctype

    def list_tags(self, repo: str, what: str, *, limit: int = 100_000) -> list[str]:
        """The repository's tags, as the registry lists them (pages followed by their Link)."""
        from coco.jsonio import loads

        tags: list[str] = []
        url = f"/v2/{repo}/tags/list"
        while url and len(tags) < limit:
            resp = self._send("GET", url, (f"repository:{repo}:pull",), what)
            if resp.status_code != 200:
                raise RegistryError(f"{what}: tags: registry answered {_status(resp)}")
            body = loads(resp.content, what=f"{what}: tags", error=RegistryError)
            page = body.get("tags") if isinstance(body, dict) else None
            if page is not None and (
                not isinstance(page, list) or not all(isinstance(t, str) for t in page)
            ):
                raise RegistryError(f"{what}: tags: expected a list of strings, found {page!r:.80}")
            tags += page or []
            link = re.match(r"\s*<([^>]+)>", resp.headers.get("link", ""))
            url = urllib.parse.urljoin(self._base or "", link.group(1)) if link else ""
        return tags

    def put_manifest(
        self, repo: str, reference: str, raw: bytes, media_type: str, what: str
    ) -> str:
        resp = self._send(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            (f"repository:{repo}:pull,push",),
            what,
            headers={"Content-Type": media_type},
            content=raw,
        )
        if resp.status_code not in (200, 201, 202):
            raise RegistryError(f"{what}: manifest upload: registry answered {_status(resp)}")
        return resp.headers.get("docker-content-digest") or sha256_digest(raw)

    # --- blobs ---------------------------------------------------------------------------------

    def blob_exists(self, repo: str, digest: str, what: str, *, push: bool = False) -> bool:
        scope = f"repository:{repo}:pull,push" if push else f"repository:{repo}:pull"
        resp = self._send("HEAD", f"/v2/{repo}/blobs/{digest}", (scope,), what, follow=True)
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise RegistryError(f"{what}: blob check: registry answered {_status(resp, read=False)}")

    def open_blob(
        self, repo: str, digest: str, size: int | None, what: str, chunk: int = CHUNK
    ) -> Iterator[bytes]:
        """Stream a blob; the iterator raises DigestMismatchError at its end if it is corrupt."""
        resp = self._send(
            "GET",
            f"/v2/{repo}/blobs/{digest}",
            (f"repository:{repo}:pull",),
            what,
            stream=True,
            follow=True,
        )
        if resp.status_code != 200:
            detail = _status(resp, read=True)
            resp.close()
            raise RegistryError(f"{what}: download: registry answered {detail}")

        def body() -> Iterator[bytes]:
            try:
                yield from resp.iter_raw(chunk)
            except TransportError as e:
                raise DigestMismatchError(
                    f"{what}: download interrupted (truncated stream): {_exc_text(e)}"
                ) from None
            finally:
                resp.close()

        return iter(HashingReader(body(), what=what, expected_digest=digest, expected_size=size))

    def mount_blob(self, repo: str, digest: str, from_repo: str, what: str) -> bool:
        """Try a cross-repository mount; True if the registry mounted the blob."""
        q = urllib.parse.urlencode({"mount": digest, "from": from_repo})
        resp = self._send(
            "POST",
            f"/v2/{repo}/blobs/uploads/?{q}",
            (f"repository:{repo}:pull,push", f"repository:{from_repo}:pull"),
            what,
        )
        if resp.status_code == 201:
            return True
        if resp.status_code == 202:
            self._cancel(resp, repo, what)
            return False
        log.debug("%s: mount answered %s", what, resp.status_code)
        return False

    def _start_upload(self, repo: str, what: str) -> str:
        resp = self._send(
            "POST", f"/v2/{repo}/blobs/uploads/", (f"repository:{repo}:pull,push",), what
        )
        if resp.status_code != 202:
            raise RegistryError(f"{what}: upload start: registry answered {_status(resp)}")
        return self._location(resp, what)

    def _location(self, resp: Response, what: str) -> str:
        loc = resp.headers.get("location")
        if not loc:
            raise RegistryError(f"{what}: upload: registry sent no Location header")
        return urllib.parse.urljoin(resp.url, loc)

    def _cancel(self, resp: Response, repo: str, what: str) -> None:
        try:
            loc = self._location(resp, what)
            self._send("DELETE", loc, (f"repository:{repo}:pull,push",), what)
        except CocoError:
            pass

    def upload_bytes(self, repo: str, data: bytes, what: str, digest: str | None = None) -> str:
        """Monolithic upload: POST, then PUT with the whole body and its digest."""
        digest = digest or sha256_digest(data)
        loc = self._start_upload(repo, what)
        resp = self._send(
            "PUT",
            _with_query(loc, digest=digest),
            (f"repository:{repo}:pull,push",),
            what,
            headers={"Content-Type": "application/octet-stream"},
            content=data,
        )
        if resp.status_code not in (201, 204):
            raise RegistryError(f"{what}: upload: registry answered {_status(resp)}")
        return digest

    def upload_stream(
        self,
        repo: str,
        chunks: Iterable[bytes],
        what: str,
        *,
        expected_digest: str | None = None,
        expected_size: int | None = None,
        patch_size: int | None = None,
        trusted: bool = False,
    ) -> tuple[str, int]:
        """Streamed (one PATCH) or chunked (a PATCH per ``patch_size`` bytes) upload, then PUT
        ``?digest=`` with the digest computed on the way. Nothing is committed on failure."""
        loc = self._start_upload(repo, what)
        reader = HashingReader(
            chunks,
            what=what,
            expected_digest=expected_digest,
            expected_size=expected_size,
            trusted=trusted,
        )
        scope = (f"repository:{repo}:pull,push",)
        try:
            it = iter(reader)
            offset = 0
            while True:
                head = next(it, None)
                if head is None:
                    break
                seg = _Segment(head, it, patch_size)
                hdrs = {"Content-Type": "application/octet-stream"}
                resp = self._send("PATCH", loc, scope, what, headers=hdrs, content=iter(seg))
                if resp.status_code not in (202, 204):
                    raise RegistryError(f"{what}: upload chunk: registry answered {_status(resp)}")
                offset += seg.count
                loc = self._location(resp, what)
                if not seg.more:
                    break
            if reader.digest is None:  # empty blob, or the iterator was not exhausted
                for _ in it:
                    pass
            assert reader.digest is not None
            resp = self._send("PUT", _with_query(loc, digest=reader.digest), scope, what)
            if resp.status_code not in (201, 204):
                raise RegistryError(f"{what}: upload commit: registry answered {_status(resp)}")
        except BaseException:
            # best effort: the registry expires abandoned uploads anyway
            with contextlib.suppress(Exception):
                self._send("DELETE", loc, scope, what)
            raise
        return reader.digest, reader.size


class _Segment:
    """Up to ``limit`` bytes of an iterator, starting with ``head``; ``more`` if data remains."""

    def __init__(self, head: bytes, it: Iterator[bytes], limit: int | None) -> None:
        self._head = head
        self._it = it
        self._limit = limit
        self.count = 0
        self.more = False

    def __iter__(self) -> Iterator[bytes]:
        chunk: bytes | None = self._head
        while chunk is not None:
            self.count += len(chunk)
            yield chunk
            if self._limit is not None and self.count >= self._limit:
                self.more = True
                return
            chunk = next(self._it, None)


def _with_query(url: str, **params: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + urllib.parse.urlencode(params)


def _status(resp: Response, read: bool = True) -> str:
    """``404 MANIFEST_UNKNOWN: manifest unknown`` from a registry error answer."""
    text = f"{resp.status_code} {resp.reason_phrase}".strip()
    if not read:
        return text
    try:
        resp.read()
        body = resp.json()
        err = body["errors"][0]
        code, msg = err.get("code", ""), err.get("message", "")
        return f"{resp.status_code} {code}: {msg}".strip().rstrip(":")
    except Exception:
        return text


def _exc_text(e: BaseException | None) -> str:
    if e is None:
        return "unknown error"
    msg = str(e) or type(e).__name__
    return " ".join(msg.split())
