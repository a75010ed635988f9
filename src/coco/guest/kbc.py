"""The guest's Key Broker Client (KBC): resources by URI, from a KBS after attesting, or from files.

Two clients with one interface (:class:`Kbc`): ``get_resource(uri) -> bytes`` and
``get_token() -> (token, tee_private_key_pem)``.

* :class:`CcKbc` (``cc_kbc``): a KBS speaking protocol 0.4.0. The attestation token comes from a
  pluggable :class:`TokenSource`: :class:`AttesterTokenSource` runs the RCAR handshake in this
  process with an attester and a fresh ephemeral key (through :class:`coco.protocol.client.KbsClient`;
  what the Attestation Agent itself uses), or the AA's ``GetToken("kbs")`` over ttRPC (what the
  CDH uses). The token is cached until its ``exp``; resources are fetched with
  ``Authorization: Bearer`` and decrypted with the TEE key. A 401 about the token
  (``TokenNotFound``, ``TokenVerifierError``) gets one fresh token and one retry; any other refusal
  (``PolicyDeny``, a missing resource) reaches the caller at once as :class:`KbsRefusedError`,
  without attesting again. A KBS that cannot be connected to is retried with exponential backoff a
  bounded number of times, then :class:`KbsUnavailableError` names the URL and the attempts.
* :class:`OfflineFsKbc` (``offline_fs_kbc``): upstream's JSON files of base64 resources.

:func:`kbc_from_params` builds one from upstream's ``aa_kbc_params`` (``cc_kbc::http://host:port``,
``offline_fs_kbc::null``), read by :func:`aa_kbc_params` from ``$AA_KBC_PARAMS`` or the kernel
command line's ``agent.aa_kbc_params=``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from coco import jsonio
from coco.crypto.jose import JoseError, b64url_decode, jwe_decrypt
from coco.errors import CocoError, KbsError
from coco.protocol.client import KbsClient, KbsRequestError, ResourceNotFoundError
from coco.protocol.kbs import ErrorInformation, ProtocolError
from coco.protocol.resource_uri import ResourceUri
from coco.tee.base import Attester

log = logging.getLogger(__name__)

CC_KBC = "cc_kbc"
OFFLINE_FS_KBC = "offline_fs_kbc"
KBC_NAMES = (CC_KBC, OFFLINE_FS_KBC)
OFFLINE_FS_FILES = (
    Path("/etc/aa-offline_fs_kbc-keys.json"),
    Path("/etc/aa-offline_fs_kbc-resources.json"),
)
OFFLINE_FS_EXTRA_ENV = "OFFLINE_FS_KBC_EXTRA_FILE_PATH"
KERNEL_CMDLINE = Path("/proc/cmdline")
CMDLINE_KEY = "agent.aa_kbc_params"
# aa.toml's tee_key_algorithm -> KbsClient's key algorithm names
TEE_KEY_ALGORITHMS = {
    "ECDH-ES+A256KW-P256": "ec-p256",
    "ECDH-ES+A256KW-P521": "ec-p521",
    "RSA-OAEP-256": "rsa-oaep-256",
}
TOKEN_MARGIN = 5.0  # seconds before exp at which a cached token counts as expired
_TOKEN_ERRORS = ("TokenNotFound", "TokenVerifierError")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class KbcError(KbsError):
    """The guest's KBS client could not produce what was asked."""


class KbsUnavailableError(KbcError):
    """The KBS could not be connected to, after every retry."""


class KbsRefusedError(KbsRequestError):
    """The KBS refused a resource (``PolicyDeny``, a missing resource, ...): ``info`` says why."""


class ResourceMissingError(KbcError):
    """``offline_fs_kbc``: no such resource in the files."""


# ------------------------------------------------------------------------------------ tokens


@dataclass(frozen=True)
class Token:
    """An attestation token and the TEE key its ``tee-pubkey`` claim names."""

    value: str
    private_key: PrivateKey
    expires: float | None  # the token's exp (seconds since the epoch), None if it has none

    @classmethod
    def make(cls, value: str, private_key: PrivateKey, where: str) -> Token:
        return cls(value, private_key, token_expiry(value, where))

    def private_key_pem(self) -> str:
        """PEM as upstream's AA hands it out: PKCS#8 for EC keys, PKCS#1 for RSA keys."""
        fmt = (
            serialization.PrivateFormat.TraditionalOpenSSL
            if isinstance(self.private_key, rsa.RSAPrivateKey)
            else serialization.PrivateFormat.PKCS8
        )
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, fmt, serialization.NoEncryption()
        ).decode("ascii")


def token_expiry(token: str, where: str) -> float | None:
    """The ``exp`` of a JWT (unverified: the KBS verifies it), or None when it has none."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise KbcError(
            f"{where}: expected a JWT (3 dot-separated parts), found {len(parts)} part(s)"
        )
    try:
        raw = b64url_decode(parts[1], f"{where}: JWT payload")
    except JoseError as e:
        raise KbcError(str(e)) from None
    payload = jsonio.loads(raw, what=f"{where}: JWT payload", error=KbcError)
    if not isinstance(payload, dict):
        raise KbcError(f"{where}: JWT payload: expected a JSON object")
    exp = payload.get("exp")
    if exp is None:
        return None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise KbcError(f"{where}: JWT exp: expected a number, found {exp!r}")
    return float(exp)


def load_private_key(pem: str | bytes, where: str) -> PrivateKey:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as e:
        raise KbcError(f"{where}: expected a PEM private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise KbcError(f"{where}: expected an EC or RSA private key, found {type(key).__name__}")
    return key


class TokenSource(Protocol):
    """Where a :class:`CcKbc` gets a fresh attestation token from."""

    def fetch_token(self) -> Token:
        """A new token (attesting again): called when there is none, it expired or was refused."""
        ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------ HTTP to the KBS


class _Unreachable(httpx.ConnectError):
    """Every connection attempt failed."""


class _RetryingTransport(httpx.BaseTransport):
    """Retries connections that fail (nothing was sent) with exponential backoff, then gives up."""

    def __init__(
        self, inner: httpx.BaseTransport, url: str, attempts: int, backoff: float,
        sleep: Callable[[float], None],
    ) -> None:  # fmt: skip
        if attempts < 1:
            raise KbcError(f"KBS {url}: connection attempts: expected at least 1, found {attempts}")
        self.inner, self.url, self.attempts, self.backoff, self.sleep = (
            inner, url, attempts, backoff, sleep,
        )  # fmt: skip

    def delays(self) -> list[float]:
        """The waits between attempts: backoff, 2*backoff, 4*backoff, ... (at most 30 s each)."""
        return [min(self.backoff * 2**i, 30.0) for i in range(self.attempts - 1)]

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        delays = self.delays()
        for i in range(self.attempts):
            try:
                return self.inner.handle_request(request)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                last = e
                if i < len(delays):
                    log.info(
                        "KBS %s: cannot connect (%s), retrying in %.1f s", self.url, e, delays[i]
                    )
                    self.sleep(delays[i])
        raise _Unreachable(
            f"KBS {self.url} unreachable: {self.attempts} connection attempt(s) over "
            f"{sum(delays):.1f} s failed, the last with: {last}",
            request=request,
        )

    def close(self) -> None:
        self.inner.close()


def kbs_http(
    url: str, *, cert: str | None = None, attempts: int = 5, backoff: float = 0.5,
    timeout: float = 30.0, sleep: Callable[[float], None] = time.sleep,
) -> httpx.Client:  # fmt: skip
    """An HTTP client for the KBS at ``url`` that retries failed connections.

    ``cert``: the KBS's certificate or CA as PEM text (aa.toml's ``[token_configs.kbs] cert``,
    cdh.toml's ``kbs_cert``), trusted in place of the system's CAs.
    """
    verify: ssl.SSLContext | bool = True
    if cert:
        try:
            verify = ssl.create_default_context(cadata=cert)
        except (ssl.SSLError, ValueError) as e:
            raise KbcError(f"KBS {url}: certificate: expected PEM text: {e}") from None
    inner = httpx.HTTPTransport(verify=verify)
    transport = _RetryingTransport(inner, url.rstrip("/"), attempts, backoff, sleep)
    return httpx.Client(transport=transport, timeout=timeout)


def _unavailable(e: BaseException) -> KbsUnavailableError | None:
    """The retry transport's final failure, if ``e`` is (or was raised while handling) it."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, _Unreachable):
            return KbsUnavailableError(str(seen))
        seen = seen.__context__
    return None


# ------------------------------------------------------------------------------ token sources


class AttesterTokenSource:
    """Runs the RCAR handshake in this process: a fresh ephemeral TEE key for every token."""

    def __init__(
        self, url: str, attester: Attester, *, key_algorithm: str = "ec-p256",
        init_data_toml: str | None = None, http: httpx.Client | None = None,
    ) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.attester = attester
        self.key_algorithm = key_algorithm
        self.init_data_toml = init_data_toml
        self._http = http or kbs_http(self.url)
        self.attestations = 0  # handshakes run (for tests and the benchmark)

    def fetch_token(self) -> Token:
        client = KbsClient(
            self.url, self.attester, key_algorithm=self.key_algorithm,
            init_data_toml=self.init_data_toml, http=self._http,
        )  # fmt: skip
        self.attestations += 1
        try:
            value = client.attest()
        except KbsRequestError:
            raise
        except KbsError as e:
            raise _unavailable(e) or e from None
        return Token.make(value, client.key.private_key, f"KBS {self.url}: token")

    def close(self) -> None:
        self._http.close()


class AaTokenSource:
    """Tokens from the Attestation Agent over ttRPC: ``GetToken("kbs")`` answers JSON
    ``{"token": ..., "tee_keypair": <PEM>}`` (what upstream's CDH uses)."""

    def __init__(self, socket: str | None = None, timeout: float = 50.0) -> None:
        from coco.rpc.services import AA_SOCKET

        self.socket = socket or AA_SOCKET
        self.timeout = timeout

    def fetch_token(self) -> Token:
        from coco.rpc import Stub, SyncClient
        from coco.rpc.protos import attestation_agent_pb2 as pb
        from coco.rpc.services import ATTESTATION_AGENT

        where = f"AA {self.socket}: GetToken(kbs)"
        try:
            with SyncClient(self.socket) as client:
                reply = Stub(client, ATTESTATION_AGENT, timeout=self.timeout).GetToken(
                    pb.GetTokenRequest(TokenType="kbs")
                )
        except CocoError as e:  # the AA's status, or an unusable socket address
            raise KbcError(f"{where}: {e}") from None
        except OSError as e:
            raise KbcError(f"{where}: cannot reach the attestation agent: {e}") from None
        doc = jsonio.loads(reply.Token, what=f"{where}: reply", error=KbcError)
        if (
            not isinstance(doc, dict)
            or not isinstance(doc.get("token"), str)
            or not isinstance(doc.get("tee_keypair"), str)
        ):
            raise KbcError(f'{where}: expected {{"token": "...", "tee_keypair": "<PEM>"}}')
        key = load_private_key(doc["tee_keypair"], f"{where}: tee_keypair")
        return Token.make(doc["token"], key, f"{where}: token")

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------- clients


class Kbc(Protocol):
    """What the CDH and the AA call."""

    name: str

    def get_resource(self, uri: ResourceUri | str) -> bytes: ...

    def get_token(self) -> tuple[str, str]: ...

    def close(self) -> None: ...


class CcKbc:
    """``cc_kbc``: resources from a KBS, with a cached attestation token (see the module doc)."""

    name = CC_KBC

    def __init__(
        self, url: str, source: TokenSource, *, http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.source = source
        self._http = http or kbs_http(self.url)
        self._clock = clock
        self._token: Token | None = None

    @classmethod
    def with_attester(
        cls, url: str, attester: Attester, *, cert: str | None = None,
        key_algorithm: str = "ec-p256", init_data_toml: str | None = None, attempts: int = 5,
        backoff: float = 0.5, sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> CcKbc:  # fmt: skip
        """A KBC that attests in this process with ``attester``."""
        http = kbs_http(url, cert=cert, attempts=attempts, backoff=backoff, sleep=sleep)
        source = AttesterTokenSource(
            url, attester, key_algorithm=key_algorithm, init_data_toml=init_data_toml, http=http
        )
        return cls(url, source, http=http, clock=clock)

    def __enter__(self) -> CcKbc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.source.close()
        self._http.close()

    # -- tokens ----------------------------------------------------------------------------
    def _valid(self, token: Token | None) -> bool:
        if token is None:
            return False
        return token.expires is None or token.expires - TOKEN_MARGIN > self._clock()

    def token(self, *, refresh: bool = False) -> Token:
        """The cached token while it is valid, else a fresh one from the source."""
        if refresh or not self._valid(self._token):
            self._token = self.source.fetch_token()
        return self._token  # type: ignore[return-value]

    def get_token(self) -> tuple[str, str]:
        tok = self.token()
        return tok.value, tok.private_key_pem()

    # -- resources ---------------------------------------------------------------------------
    def get_resource(self, uri: ResourceUri | str) -> bytes:
        res = ResourceUri.of(uri)
        token = self.token()
        resp = self._get(res, token)
        if resp.status_code == 401 and _token_refused(resp):
            log.info("KBS %s: token refused (%s): attesting again", self.url, _variant(resp))
            token = self.token(refresh=True)
            resp = self._get(res, token)
        if resp.status_code != 200:
            raise _refusal(resp, f"KBS {self.url}: resource {res}")
        where = f"KBS {self.url}: resource {res}"
        body = jsonio.loads(resp.content, what=f"{where}: response", error=KbcError)
        try:
            return jwe_decrypt(body, token.private_key)
        except JoseError as e:
            raise KbcError(f"{where}: cannot decrypt the response: {e}") from None

    def _get(self, res: ResourceUri, token: Token) -> httpx.Response:
        try:
            return self._http.get(
                self.url + res.kbs_path, headers={"authorization": f"Bearer {token.value}"}
            )
        except httpx.HTTPError as e:
            raise _unavailable(e) or KbcError(
                f"KBS {self.url}: resource {res}: request failed: {e}"
            ) from None


def _error_info(resp: httpx.Response) -> ErrorInformation | None:
    try:
        return ErrorInformation.from_json(resp.content)
    except ProtocolError:
        return None


def _variant(resp: httpx.Response) -> str:
    info = _error_info(resp)
    return info.variant if info else "no ErrorInformation"


def _token_refused(resp: httpx.Response) -> bool:
    info = _error_info(resp)
    return info is None or info.variant in _TOKEN_ERRORS


def _refusal(resp: httpx.Response, what: str) -> KbsRequestError:
    info = _error_info(resp)
    if info is not None:
        msg = f"{what}: refused with {resp.status_code} {info.variant}: {info.detail}"
    else:
        msg = f"{what}: refused with {resp.status_code} and a body that is not ErrorInformation: {resp.text[:200]!r}"
    if resp.status_code == 404 or (info is not None and "not found" in info.detail):
        return ResourceNotFoundError(msg, resp.status_code, info)
    return KbsRefusedError(msg, resp.status_code, info)


class OfflineFsKbc:
    """``offline_fs_kbc``: resources from JSON files ``{"<repo>/<type>/<tag>": "<base64>"}``.

    The files are upstream's (:data:`OFFLINE_FS_FILES`) plus those named, comma-separated, by
    ``$OFFLINE_FS_KBC_EXTRA_FILE_PATH``; a missing file is a warning, a malformed one an error,
    and a key found in two files takes the later file's value (with a warning).
    """

    name = OFFLINE_FS_KBC

    def __init__(
        self, files: Sequence[Path | str] | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        if files is None:
            env = os.environ if environ is None else environ
            extra = [p for p in env.get(OFFLINE_FS_EXTRA_ENV, "").split(",") if p.strip()]
            files = [*OFFLINE_FS_FILES, *(Path(p.strip()) for p in extra)]
        self.files = [Path(f) for f in files]
        self._resources: dict[str, bytes] = {}
        for path in self.files:
            for key, value in self._load(path).items():
                if key in self._resources:
                    log.warning("offline_fs_kbc: %s: %s overrides an earlier file's", path, key)
                self._resources[key] = value

    @staticmethod
    def _load(path: Path) -> dict[str, bytes]:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            log.warning("offline_fs_kbc: %s does not exist: no resources from it", path)
            return {}
        except OSError as e:
            raise KbcError(f"offline_fs_kbc: {path}: cannot read it: {e.strerror}") from None
        doc = jsonio.loads(raw, what=f"offline_fs_kbc: {path}", error=KbcError)
        if not isinstance(doc, dict):
            raise KbcError(
                f"offline_fs_kbc: {path}: expected a JSON object of "
                f'"<repo>/<type>/<tag>": "<base64>", found {type(doc).__name__}'
            )
        out: dict[str, bytes] = {}
        for key, value in doc.items():
            uri = ResourceUri.parse(f"kbs:///{key}", f"offline_fs_kbc: {path}: key")
            if not isinstance(value, str):
                raise KbcError(
                    f"offline_fs_kbc: {path}: {key}: expected a base64 string, "
                    f"found {type(value).__name__}"
                )
            try:
                out[uri.resource_path] = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as e:
                raise KbcError(f"offline_fs_kbc: {path}: {key}: not base64: {e}") from None
        return out

    def get_resource(self, uri: ResourceUri | str) -> bytes:
        res = ResourceUri.of(uri)
        try:
            return self._resources[res.resource_path]
        except KeyError:
            files = ", ".join(map(str, self.files)) or "no files"
            raise ResourceMissingError(f"offline_fs_kbc: resource {res}: not in {files}") from None

    def get_token(self) -> tuple[str, str]:
        raise KbcError("offline_fs_kbc: there is no attestation token without a KBS (use cc_kbc)")

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------- factory


def parse_kbc_params(text: str, where: str = "aa_kbc_params") -> tuple[str, str]:
    """``<kbc name>::<KBS URL>`` as (name, url)."""
    parts = text.strip().split("::")
    if len(parts) != 2 or not parts[0]:
        raise KbcError(
            f"{where} {text!r}: expected <kbc>::<url>, e.g. cc_kbc::http://127.0.0.1:8080 "
            "or offline_fs_kbc::null"
        )
    name, url = parts
    if name not in KBC_NAMES:
        raise KbcError(
            f"{where} {text!r}: unknown KBC {name!r}: expected one of {', '.join(KBC_NAMES)}"
        )
    if name == CC_KBC and not url.startswith(("http://", "https://")):
        raise KbcError(
            f"{where} {text!r}: cc_kbc: expected an http:// or https:// KBS URL, found {url!r}"
        )
    return name, url


def aa_kbc_params(
    environ: Mapping[str, str] | None = None, cmdline: Path = KERNEL_CMDLINE
) -> str | None:
    """Upstream's ``aa_kbc_params``: ``$AA_KBC_PARAMS``, else ``agent.aa_kbc_params=`` on the
    kernel command line, else None."""
    env = os.environ if environ is None else environ
    value = env.get("AA_KBC_PARAMS")
    if value:
        return value
    try:
        text = cmdline.read_text(errors="replace")
    except OSError:
        return None
    for word in text.split():
        if word.startswith(CMDLINE_KEY + "="):
            return word[len(CMDLINE_KEY) + 1 :]
    return None


def make_kbc(
    name: str, url: str = "", *, source: TokenSource | None = None,
    attester: Attester | None = None, cert: str | None = None, **kw: Any,
) -> Kbc:  # fmt: skip
    """A KBC by name. ``cc_kbc`` takes its tokens from ``source``, or attests in this process with
    ``attester`` (default: the TEE detected on this machine)."""
    if name == OFFLINE_FS_KBC:
        return OfflineFsKbc()
    if name != CC_KBC:
        raise KbcError(f"KBC {name!r}: expected one of {', '.join(KBC_NAMES)}")
    if source is not None:
        return CcKbc(url, source, http=kbs_http(url, cert=cert))
    if attester is None:
        from coco.tee.detect import detect_attester

        attester = detect_attester()
    return CcKbc.with_attester(url, attester, cert=cert, **kw)


def kbc_from_params(
    params: str | None = None, *, environ: Mapping[str, str] | None = None,
    cmdline: Path = KERNEL_CMDLINE, **kw: Any,
) -> Kbc:  # fmt: skip
    """The KBC that ``aa_kbc_params`` (given, or found by :func:`aa_kbc_params` in ``environ``
    and ``cmdline``) names; ``kw`` go to :func:`make_kbc`."""
    text = params if params is not None else aa_kbc_params(environ, cmdline)
    if text is None:
        raise KbcError(
            "aa_kbc_params: not set: expected $AA_KBC_PARAMS or agent.aa_kbc_params= on the "
            f"kernel command line ({KERNEL_CMDLINE}), e.g. cc_kbc::http://127.0.0.1:8080"
        )
    name, url = parse_kbc_params(text)
    return make_kbc(name, url, **kw)


__all__ = [
    "AaTokenSource",
    "AttesterTokenSource",
    "CcKbc",
    "Kbc",
    "KbcError",
    "KbsRefusedError",
    "KbsUnavailableError",
    "OfflineFsKbc",
    "ResourceMissingError",
    "Token",
    "TokenSource",
    "aa_kbc_params",
    "kbc_from_params",
    "kbs_http",
    "make_kbc",
    "parse_kbc_params",
]
