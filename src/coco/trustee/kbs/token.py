"""Attestation-token verification on the KBS side (EAR JWTs, ES256/RS256/RS384).

A token is trusted when its header ``jwk`` is the key of our own attestation service (shared
through storage by every replica), or when its ``x5c`` chain leads to a certificate of
``trusted_certs_paths`` and the leaf holds the ``jwk``, or when it names by ``kid`` a key of
``trusted_jwk_sets``. ``insecure_header_jwk`` trusts any header key: it warns.
Verified tokens are cached (bounded) so a token reused for several resources is checked once;
``exp`` is re-checked on every use.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
import time
from collections import OrderedDict
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from coco.crypto.jose import (
    JoseError,
    PublicKey,
    decode_jwt_unverified,
    load_jwk_set,
    public_key_from_jwk,
    verify_jws,
)
from coco.errors import KbsError

log = logging.getLogger(__name__)

LEEWAY = 60
_TOKEN_ALGS = ("ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "EdDSA")


class TokenVerifierError(KbsError):
    """An attestation token that is malformed, untrusted, badly signed or expired."""


def _same_key(a: Any, b: Any) -> bool:
    if isinstance(a, ec.EllipticCurvePublicKey) and isinstance(b, ec.EllipticCurvePublicKey):
        return a.public_numbers() == b.public_numbers()
    if isinstance(a, rsa.RSAPublicKey) and isinstance(b, rsa.RSAPublicKey):
        return a.public_numbers() == b.public_numbers()
    return False


def _b64_any(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TokenVerifierError("x5c: expected base64 strings")
    try:
        t = text.replace("-", "+").replace("_", "/")
        return base64.b64decode(t + "=" * (-len(t) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise TokenVerifierError(f"x5c: not base64: {e}") from None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, Exception):  # InvalidSignature and unsupported algorithms
        return False


def _check_validity(cert: x509.Certificate, now: dt.datetime) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise TokenVerifierError(
            f"x5c: certificate {cert.subject.rfc4514_string()} is not valid now"
        )


def verify_x5c(x5c: Any, roots: list[x509.Certificate]) -> x509.Certificate:
    """Check that the ``x5c`` chain leads to one of ``roots``; returns the leaf."""
    if not isinstance(x5c, list) or not x5c:
        raise TokenVerifierError("token header jwk without x5c: the key is not endorsed")
    try:
        chain = [x509.load_der_x509_certificate(_b64_any(c)) for c in x5c]
    except ValueError as e:
        raise TokenVerifierError(f"x5c: not a DER certificate: {e}") from None
    now = dt.datetime.now(dt.UTC)
    leaf = chain[0]
    current = leaf
    pool = chain[1:]
    for _ in range(len(chain) + 1):
        _check_validity(current, now)
        if any(current == r for r in roots):
            return leaf
        for root in roots:
            if _issued_by(current, root):
                _check_validity(root, now)
                return leaf
        nxt = next((c for c in pool if c != current and _issued_by(current, c)), None)
        if nxt is None:
            break
        pool.remove(nxt)
        current = nxt
    raise TokenVerifierError("x5c: the certificate chain does not lead to a trusted certificate")


class TokenVerifier:
    def __init__(
        self,
        *,
        own_keys: list[PublicKey] | None = None,
        trusted_certs_paths: list[str] | None = None,
        trusted_jwk_sets: list[str] | None = None,
        insecure_header_jwk: bool = False,
    ):
        self.own_keys = list(own_keys or [])
        self.roots: list[x509.Certificate] = []
        for path in trusted_certs_paths or []:
            try:
                with open(path, "rb") as f:
                    self.roots.extend(x509.load_pem_x509_certificates(f.read()))
            except (OSError, ValueError) as e:
                raise TokenVerifierError(
                    f"attestation_token.trusted_certs_paths {path}: {e}"
                ) from None
        self.jwks: dict[str, PublicKey] = {}
        for src in trusted_jwk_sets or []:
            self._load_jwks(src)
        self.insecure_header_jwk = insecure_header_jwk
        if insecure_header_jwk:
            log.warning(
                "attestation_token.insecure_header_jwk = true: ANY token carrying its own key in the "
                "header is trusted; use only for testing"
            )
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def _load_jwks(self, src: str) -> None:
        try:
            jwks = load_jwk_set(src, f"trusted_jwk_sets {src}", require_kid=True)
        except JoseError as e:
            raise TokenVerifierError(str(e)) from None
        self.jwks.update(jwks.by_kid)

    def _key_for(self, header: dict[str, Any]) -> PublicKey:
        jwk = header.get("jwk")
        if jwk is not None:
            try:
                key = public_key_from_jwk(jwk, "token header jwk")
            except JoseError as e:
                raise TokenVerifierError(str(e)) from None
            if self.insecure_header_jwk:
                return key
            if any(_same_key(key, k) for k in self.own_keys):
                return key
            if not self.roots:
                raise TokenVerifierError(
                    "token signed by an unknown key and no attestation_token.trusted_certs_paths configured"
                )
            leaf = verify_x5c(jwk.get("x5c") if isinstance(jwk, dict) else None, self.roots)
            if not _same_key(leaf.public_key(), key):
                raise TokenVerifierError("x5c: the leaf certificate's key is not the header jwk")
            return key
        kid = header.get("kid")
        if isinstance(kid, str) and kid in self.jwks:
            return self.jwks[kid]
        raise TokenVerifierError("token header has neither a jwk nor a kid of a trusted JWK set")

    def remember(self, token: str, claims: dict[str, Any]) -> None:
        """Trust a token this process has just signed itself (no need to check our own signature)."""
        self._cache[token] = claims
        while len(self._cache) > 4096:
            self._cache.popitem(last=False)

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or TokenVerifierError saying why it is refused."""
        now = time.time()
        claims = self._cache.get(token)
        if claims is None:
            try:
                header, claims, signing_input, sig = decode_jwt_unverified(token)
            except JoseError as e:
                raise TokenVerifierError(str(e)) from None
            alg = header.get("alg")
            if alg not in _TOKEN_ALGS:
                raise TokenVerifierError(
                    f"token alg {alg!r}: expected one of {', '.join(_TOKEN_ALGS)}"
                )
            key = self._key_for(header)
            try:
                verify_jws(signing_input, sig, key, alg)
            except JoseError as e:
                raise TokenVerifierError(f"token signature: {e}") from None
            exp = claims.get("exp")
            if not isinstance(exp, int | float) or isinstance(exp, bool):
                raise TokenVerifierError("token has no numeric 'exp' claim")
            self._cache[token] = claims
            while len(self._cache) > 4096:
                self._cache.popitem(last=False)
        if claims["exp"] + LEEWAY < now:
            self._cache.pop(token, None)
            raise TokenVerifierError(f"token expired at {int(claims['exp'])} (now {int(now)})")
        return claims


TEE_PUBKEY_POINTERS = (
    ("tdx", "attester_runtime_data", "tee-pubkey"),
    ("tdx", "attester_user_data", "tee-pubkey"),
    ("customized_claims", "runtime_data", "tee-pubkey"),
    ("submods", "cpu0", "ear.veraison.annotated-evidence", "runtime_data_claims", "tee-pubkey"),
    ("tee-pubkey",),
)


def tee_pubkey_of(claims: dict[str, Any]) -> dict[str, Any]:
    for ptr in TEE_PUBKEY_POINTERS:
        node: Any = claims
        for part in ptr:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            return node
    raise TokenVerifierError("token carries no tee-pubkey")
