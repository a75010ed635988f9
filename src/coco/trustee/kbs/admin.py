"""Admin authentication and authorization for the KBS admin API.

Modes (``[admin] authorization_mode``): ``InsecureAllowAll`` (warns loudly), ``DenyAll`` and
``AuthenticatedAuthorization``: a bearer JWT (EdDSA, ES256, RS256, ...) signed by a configured
identity provider, with ``exp`` (60 s leeway) and a string ``role``; the first ACL whose role
matches and whose regex matches the request path and query allows the call.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization

from coco.crypto.jose import (
    JoseError,
    PublicKey,
    decode_jwt_unverified,
    load_jwk_set,
    read_source,
    verify_jws,
)
from coco.errors import KbsError

log = logging.getLogger(__name__)

MODES = ("InsecureAllowAll", "DenyAll", "AuthenticatedAuthorization")


class AdminAuthError(KbsError):
    """The admin call is not allowed."""


@dataclass
class IdentityProvider:
    issuer: str | None = None
    audience: str | None = None
    public_key_uri: str | None = None
    jwk_set_uri: str | None = None
    keys: list[PublicKey] = field(default_factory=list)
    kid_keys: dict[str, PublicKey] = field(default_factory=dict)

    def load(self) -> None:
        if bool(self.public_key_uri) == bool(self.jwk_set_uri):
            raise KbsError(
                "admin identity provider: expected exactly one of public_key_uri, jwk_set_uri"
            )
        src = self.public_key_uri or self.jwk_set_uri or ""
        where = f"admin identity provider {src}"
        try:
            if self.jwk_set_uri:
                jwks = load_jwk_set(src, where)
                self.keys.extend(jwks.keys)
                self.kid_keys.update(jwks.by_kid)
                return
            data = read_source(src, where)
        except JoseError as e:
            raise KbsError(str(e)) from None
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as e:
            raise KbsError(f"{where}: not a PEM public key: {e}") from None
        self.keys.append(key)  # type: ignore[arg-type]


@dataclass
class Acl:
    role: str
    allowed_endpoints: str
    regex: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        if not (
            self.allowed_endpoints.startswith("^/kbs") and self.allowed_endpoints.endswith("$")
        ):
            raise KbsError(
                f"admin ACL for role {self.role!r}: allowed_endpoints must start with '^/kbs' and end "
                f"with '$', found {self.allowed_endpoints!r}"
            )
        try:
            self.regex = re.compile(self.allowed_endpoints)
        except re.error as e:
            raise KbsError(f"admin ACL for role {self.role!r}: bad regex: {e}") from None


class AdminAuth:
    def __init__(
        self,
        mode: str,
        providers: list[IdentityProvider] | None = None,
        acls: list[Acl] | None = None,
    ):
        if mode not in MODES:
            raise KbsError(
                f"admin.authorization_mode: expected one of {', '.join(MODES)}, found {mode!r}"
            )
        self.mode = mode
        self.providers = providers or []
        self.acls = acls or []
        if mode == "InsecureAllowAll":
            log.warning(
                "ADMIN API IS OPEN: authorization_mode = InsecureAllowAll lets anyone who can reach "
                "this KBS set resources and policies. Never use this outside a test."
            )
        if mode == "AuthenticatedAuthorization":
            if not self.providers:
                raise KbsError(
                    "admin: AuthenticatedAuthorization needs at least one identity provider"
                )
            for p in self.providers:
                if not p.keys:
                    p.load()

    def check(self, authorization: str | None, uri: str) -> str:
        """Return the caller's role (or the mode name) or raise AdminAuthError."""
        if self.mode == "InsecureAllowAll":
            return "InsecureAllowAll"
        if self.mode == "DenyAll":
            raise AdminAuthError("Admin auth error: admin access is denied (DenyAll)")
        if not authorization or not authorization.startswith("Bearer "):
            raise AdminAuthError("Admin auth error: no 'Authorization: Bearer <token>' header")
        token = authorization[len("Bearer ") :].strip()
        try:
            header, claims, signing_input, sig = decode_jwt_unverified(token)
        except JoseError as e:
            raise AdminAuthError(f"Admin auth error: {e}") from None
        alg = header.get("alg")
        errors = []
        for p in self.providers:
            kid = header.get("kid")
            keys = [p.kid_keys[kid]] if isinstance(kid, str) and kid in p.kid_keys else p.keys
            for key in keys:
                try:
                    verify_jws(signing_input, sig, key, str(alg))
                except JoseError as e:
                    errors.append(str(e))
                    continue
                return self._authorize(p, claims, uri)
        raise AdminAuthError(
            f"Admin auth error: token not signed by any configured identity provider ({errors[-1] if errors else 'no keys'})"
        )

    def _authorize(self, p: IdentityProvider, claims: dict[str, Any], uri: str) -> str:
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise AdminAuthError("Admin auth error: token has no numeric 'exp' claim")
        if exp + 60 < time.time():
            raise AdminAuthError(f"Admin auth error: token expired at {int(exp)}")
        if p.issuer is not None and claims.get("iss") != p.issuer:
            raise AdminAuthError(
                f"Admin auth error: token issuer {claims.get('iss')!r}, expected {p.issuer!r}"
            )
        if p.audience is not None:
            aud = claims.get("aud")
            auds = aud if isinstance(aud, list) else [aud]
            if p.audience not in auds:
                raise AdminAuthError(
                    f"Admin auth error: token audience {aud!r} lacks {p.audience!r}"
                )
        role = claims.get("role")
        if not isinstance(role, str):
            raise AdminAuthError("Admin auth error: token has no string 'role' claim")
        for acl in self.acls:
            if acl.role == role and acl.regex.match(uri):
                return role
        raise AdminAuthError(f"Admin auth error: role {role!r} may not access {uri}")
