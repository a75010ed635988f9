"""The RCAR client: authenticate, attest, fetch resources from a KBS (protocol 0.4.0).

Written once and used by ``coco kbs-client get-resource`` and by the guest's KBC. It behaves as
upstream ``kbs_protocol`` does: a fresh TEE key per client, cookie session, on 401 it runs the
handshake again and retries (3 attempts in all), 404 is "resource not found", and every error
answer is parsed as ``ErrorInformation``. Unlike upstream, it retries only when a new token could
change the answer (no token, a token refused or expired): a policy's refusal is final, and its
error says which policy refused and how an admin changes it.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from coco.crypto.jose import JoseError, b64url_decode, jwe_decrypt, public_jwk
from coco.errors import KbsError
from coco.protocol.kbs import (
    PROTOCOL_VERSION,
    Attestation,
    Challenge,
    CompositeEvidence,
    ErrorInformation,
    InitData,
    ProtocolError,
    Request,
    RuntimeData,
    TeePubKey,
    report_data,
)
from coco.protocol.resource_uri import ResourceUri
from coco.tee.base import Attester

log = logging.getLogger(__name__)

__all__ = ["KbsClient", "KbsRequestError", "ResourceNotFoundError", "TeeKey"]

KEY_ALGORITHMS = ("ec-p256", "ec-p521", "rsa-oaep-256", "rsa1_5")
# 401 answers after which a fresh handshake (a new token) may succeed.
_RETRY_VARIANTS = ("TokenNotFound", "TokenVerifierError")


class KbsRequestError(KbsError):
    """The KBS answered an error; ``info`` is its ErrorInformation when it sent one."""

    def __init__(self, message: str, status: int, info: ErrorInformation | None = None):
        super().__init__(message)
        self.status = status
        self.info = info


class ResourceNotFoundError(KbsRequestError):
    """404 for a resource."""


def tls_verify(verify: str | bool) -> ssl.SSLContext | bool:
    """httpx ``verify`` from a CA file path (or True/False)."""
    if isinstance(verify, str):
        try:
            return ssl.create_default_context(cafile=verify)
        except (OSError, ssl.SSLError) as e:
            raise KbsError(f"CA certificate {verify}: {e}") from None
    return verify


@dataclass
class TeeKey:
    """The guest's ephemeral key pair that the KBS encrypts resources to."""

    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    pubkey: TeePubKey

    @classmethod
    def generate(cls, algorithm: str = "ec-p256") -> TeeKey:
        if algorithm in ("ec-p256", "ec-p521"):
            curve = ec.SECP256R1() if algorithm == "ec-p256" else ec.SECP521R1()
            key: Any = ec.generate_private_key(curve)
            jwk = public_jwk(key)
            return cls(
                key, TeePubKey("EC", "ECDH-ES+A256KW", crv=jwk["crv"], x=jwk["x"], y=jwk["y"])
            )
        if algorithm in ("rsa-oaep-256", "rsa1_5"):
            key = rsa.generate_private_key(65537, 2048)
            jwk = public_jwk(key)
            alg = "RSA-OAEP-256" if algorithm == "rsa-oaep-256" else "RSA1_5"
            return cls(key, TeePubKey("RSA", alg, n=jwk["n"], e=jwk["e"]))
        raise KbsError(
            f"TEE key algorithm {algorithm!r}: expected one of {', '.join(KEY_ALGORITHMS)}"
        )

    @classmethod
    def from_pem(cls, pem: bytes, where: str = "TEE key") -> TeeKey:
        """A key pair kept in a PEM file (``--tee-key-file``): EC P-256/P-521 or RSA (OAEP-256)."""
        from cryptography.hazmat.primitives import serialization

        try:
            key: Any = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as e:
            raise KbsError(f"{where}: expected an unencrypted PEM private key: {e}") from None
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in (
            "secp256r1",
            "secp521r1",
        ):
            jwk = public_jwk(key)
            return cls(
                key, TeePubKey("EC", "ECDH-ES+A256KW", crv=jwk["crv"], x=jwk["x"], y=jwk["y"])
            )
        if isinstance(key, rsa.RSAPrivateKey):
            jwk = public_jwk(key)
            return cls(key, TeePubKey("RSA", "RSA-OAEP-256", n=jwk["n"], e=jwk["e"]))
        raise KbsError(f"{where}: expected an EC P-256, EC P-521 or RSA private key")

    def to_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _error_from(resp: httpx.Response, what: str) -> KbsRequestError:
    info: ErrorInformation | None = None
    try:
        info = ErrorInformation.from_json(resp.content)
        msg = f"{what}: KBS answered {resp.status_code} {info.variant}: {info.detail}"
    except ProtocolError:
        msg = f"{what}: KBS answered {resp.status_code} with a body that is not ErrorInformation: {resp.text[:200]!r}"
    cls = ResourceNotFoundError if resp.status_code == 404 else KbsRequestError
    return cls(msg, resp.status_code, info)


class KbsClient:
    """An RCAR session with one KBS. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        url: str,
        attester: Attester | None = None,
        *,
        key_algorithm: str = "ec-p256",
        init_data_toml: str | None = None,
        verify: str | bool = True,
        timeout: float = 30.0,
        http: httpx.Client | None = None,
        key: TeeKey | None = None,
        token: str | None = None,
    ):
        """``key``: the TEE key to use instead of a fresh one; ``token``: an attestation token
        (from an earlier :meth:`attest` with the same key) sent as ``Authorization: Bearer``."""
        self.url = url.rstrip("/")
        self.attester = attester
        self.key = key or TeeKey.generate(key_algorithm)
        self.init_data_toml = init_data_toml
        self._http = http or httpx.Client(verify=tls_verify(verify), timeout=timeout)
        self._own_http = http is None
        self.token: str | None = token

    def __enter__(self) -> KbsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    # -------------------------------------------------------------------------- handshake

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return self._http.post(
                f"{self.url}/kbs/v0/{path}",
                content=json.dumps(body).encode(),
                headers={"content-type": "application/json"},
            )
        except httpx.HTTPError as e:
            raise KbsError(f"KBS {self.url}: {path} request failed: {e}") from None

    def attest(self) -> str:
        """Run auth + attest; returns the attestation token (the session cookie is kept)."""
        if self.attester is None:
            if self.token:
                raise KbsError(
                    f"KBS {self.url}: the attestation token given has expired or cannot be read, "
                    "and no attester is configured to get another"
                )
            raise KbsError("attest: no attester configured for this client")
        self._http.cookies.clear()
        req = Request(PROTOCOL_VERSION, self.attester.tee, {
            "supported-hash-algorithms": ["sha256", "sha384", "sha512", "sm3"],
        })  # fmt: skip
        resp = self._post("auth", req.to_json())
        if resp.status_code != 200:
            raise _error_from(resp, f"KBS {self.url}: auth")
        try:
            challenge = Challenge.from_json(resp.content)
        except ProtocolError as e:
            raise KbsError(f"KBS {self.url}: auth: bad challenge: {e}") from None
        rd = report_data(challenge.nonce, self.key.pubkey, "", challenge.hash_algorithm())
        evidence = self.attester.get_evidence(rd)
        att = Attestation(
            RuntimeData(challenge.nonce, self.key.pubkey),
            CompositeEvidence(evidence, ""),
            InitData("toml", self.init_data_toml) if self.init_data_toml is not None else None,
        )
        resp = self._post("attest", att.to_json())
        if resp.status_code != 200:
            raise _error_from(resp, f"KBS {self.url}: attest")
        try:
            token = resp.json()["token"]
            if not isinstance(token, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise KbsError(
                f'KBS {self.url}: attest: expected {{"token": ...}}, got {resp.text[:200]!r}'
            ) from None
        self.token = token
        return token

    def _token_valid(self) -> bool:
        if not self.token:
            return False
        try:
            payload = json.loads(b64url_decode(self.token.split(".")[1]))
            return float(payload.get("exp", 0)) > time.time() + 5
        except (JoseError, ValueError, IndexError, TypeError):
            return False

    # -------------------------------------------------------------------------- resources

    def get_resource(self, path: str, plugin: str = "resource", attempts: int = 3) -> bytes:
        """Fetch and decrypt one resource; attests first when there is no valid session."""
        rel = (
            ResourceUri.from_path(path).resource_path if plugin == "resource" else path.lstrip("/")
        )
        last: KbsRequestError | None = None
        for _ in range(attempts):
            if not self._token_valid():
                self.attest()
            try:
                headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
                resp = self._http.get(f"{self.url}/kbs/v0/{plugin}/{rel}", headers=headers)
            except httpx.HTTPError as e:
                raise KbsError(f"KBS {self.url}: get {rel} failed: {e}") from None
            if resp.status_code == 200:
                try:
                    return jwe_decrypt(resp.json(), self.key.private_key)
                except (ValueError, JoseError) as e:
                    raise KbsError(
                        f"KBS {self.url}: resource {rel}: cannot decrypt response: {e}"
                    ) from None
            err = _error_from(resp, f"KBS {self.url}: get resource {rel}")
            variant = err.info.variant if err.info else None
            if variant in ("PolicyDeny", "PolicyEngineError"):
                what = "refused" if variant == "PolicyDeny" else "could not evaluate"
                raise KbsRequestError(
                    f"{err} (the KBS resource policy {what} this request; an admin changes that "
                    f"policy with `coco kbs-client --url {self.url} config set-resource-policy "
                    "--policy-file FILE`)",
                    err.status,
                    err.info,
                ) from None
            if resp.status_code != 401 or variant not in (*_RETRY_VARIANTS, None):
                raise err
            if self.attester is None:  # a token given by the caller, and no way to get another
                raise err
            last = err
            self.token = None  # redo the handshake, as kbs_protocol does
        assert last is not None
        raise last
