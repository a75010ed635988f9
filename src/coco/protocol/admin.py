"""The KBS admin API as its clients speak it: resources and policies, with a bearer admin token.

Used by the owner side (``coco kbs-client config ...``, through :mod:`coco.trustee.admin_client`,
which adds the reference-value calls) and by ``coco keyprovider serve``, which registers each key
encryption key it makes under its ``kid`` (``POST /kbs/v0/resource/<repo>/<type>/<tag>``), as
upstream's coco_keyprovider does. Every call checks the answer: anything but 200 raises
:class:`~coco.protocol.client.KbsRequestError` with the KBS's ``ErrorInformation``.

:func:`admin_token` signs the bearer JWT a KBS in ``AuthenticatedAuthorization`` mode accepts
from an Ed25519 (EdDSA), EC P-256 (ES256) or RSA (RS256) private key: ``iat``, ``nbf``, ``exp``
(upstream's coco_keyprovider: two hours) and the ``role`` the KBS's ACLs match.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from coco.crypto.jose import sign_jwt
from coco.errors import KbsError
from coco.protocol.client import _error_from, tls_verify
from coco.protocol.resource_uri import ResourceUri

__all__ = ["ADMIN_TOKEN_TTL", "AdminClient", "admin_token", "load_admin_key"]

ADMIN_TOKEN_TTL = 2 * 3600  # seconds, what coco_keyprovider signs for


def _b64url(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def load_admin_key(pem: bytes, where: str) -> Any:
    """An Ed25519, EC P-256 or RSA private key from PEM; :class:`KbsError` naming ``where``."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise KbsError(f"{where}: expected an unencrypted PEM private key: {e}") from None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name != "secp256r1":
        raise KbsError(f"{where}: EC key on {key.curve.name}: expected P-256 (ES256)")
    if not isinstance(
        key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    ):
        raise KbsError(
            f"{where}: {type(key).__name__}: expected an Ed25519, EC P-256 or RSA private key"
        )
    return key


def admin_token(
    key: Any, *, role: str = "admin", ttl: int = ADMIN_TOKEN_TTL, now: float | None = None,
    issuer: str | None = None, audience: str | None = None,
) -> str:  # fmt: skip
    """A compact admin JWT signed with ``key`` (see :func:`load_admin_key`)."""
    iat = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"iat": iat, "nbf": iat, "exp": iat + ttl, "role": role}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = [audience]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        alg = "EdDSA"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        alg = "ES256"
    else:
        alg = "RS256"
    return sign_jwt(claims, key, alg)


class AdminClient:
    """Admin calls to the KBS at ``url`` (``token``: the bearer JWT, or None when it is open)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        verify: str | bool = True,
        timeout: float = 30.0,
    ):
        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(verify=tls_verify(verify), timeout=timeout, headers=headers)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, what: str, **kw: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, f"{self.url}/kbs/v0/{path}", **kw)
        except httpx.HTTPError as e:
            raise KbsError(f"KBS {self.url}: {what}: {e}") from None
        if resp.status_code != 200:
            raise _error_from(resp, f"KBS {self.url}: {what}")
        return resp

    def set_resource(self, path: str, data: bytes) -> None:
        """Store ``data`` under ``repo/type/tag`` (a ``kbs:///`` prefix is accepted)."""
        key = ResourceUri.from_path(path).resource_path
        self._call("POST", f"resource/{key}", f"set resource {path}", content=data,
                   headers={"content-type": "application/octet-stream"})  # fmt: skip

    def delete_resource(self, path: str) -> None:
        key = ResourceUri.from_path(path).resource_path
        self._call("DELETE", f"resource/{key}", f"delete resource {path}")

    def set_resource_policy(self, rego: str) -> None:
        self._call("POST", "resource-policy", "set resource policy",
                   json={"policy": _b64url(rego)})  # fmt: skip

    def set_attestation_policy(self, rego: str, policy_id: str = "default_cpu") -> None:
        body = {"type": "rego", "policy_id": policy_id, "policy": _b64url(rego)}
        self._call("POST", "attestation-policy", f"set attestation policy {policy_id}", json=body)
