"""EAR (EAT Attestation Result) tokens: the trust-tier arithmetic and the ES256 signer.

The JWT header carries the signer's public key as ``jwk`` (with ``x5c`` when a certificate chain
is configured, ``x5u`` when a URL is), so a KBS can check the token against its trusted roots.
Without a configured signer the key is created once and kept in storage (namespace
``trustee_keys``), so every replica on the same storage signs with, and trusts, the same key.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coco.crypto.jose import public_jwk, sign_jwt
from coco.errors import AttestationError
from coco.trustee.storage import NS_KEYS, Store

log = logging.getLogger(__name__)

TRUST_CLAIMS = (
    "instance-identity", "configuration", "executables", "file-system",
    "hardware", "runtime-opaque", "storage-opaque", "sourced-data",
)  # fmt: skip
_TIERS = ("none", "affirming", "warning", "contraindicated")


def _tier(v: int) -> int:
    if -1 <= v <= 1:
        return 0
    if abs(v) < 32:
        return 1
    if abs(v) < 96:
        return 2
    return 3


def ear_status(vector: dict[str, int]) -> str:
    """The worst tier of a trust vector: none, affirming, warning or contraindicated."""
    return _TIERS[max((_tier(v) for v in vector.values()), default=0)]


def check_trust_vector(value: Any, where: str) -> dict[str, int]:
    if not isinstance(value, dict) or not value:
        raise AttestationError(f"{where}: policy must set trust_claims to a non-empty object")
    out: dict[str, int] = {}
    for k, v in value.items():
        if k not in TRUST_CLAIMS:
            raise AttestationError(
                f"{where}: unknown trust claim {k!r}: expected one of {TRUST_CLAIMS}"
            )
        if not isinstance(v, int) or isinstance(v, bool) or not -128 <= v <= 127:
            raise AttestationError(f"{where}: trust claim {k!r} must be an int8, found {v!r}")
        out[k] = v
    return out


class TokenSigner:
    """Signs EAR tokens with a P-256 key (ES256)."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        cert_chain: list[x509.Certificate] | None = None,
        cert_url: str | None = None,
    ):
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise AttestationError("token signer: expected an EC P-256 (prime256v1) private key")
        self.key = key
        self.jwk = public_jwk(key, "ES256")
        if cert_url:
            self.jwk["x5u"] = cert_url
        if cert_chain:
            leaf_pub = cert_chain[0].public_key()
            if (
                not isinstance(leaf_pub, ec.EllipticCurvePublicKey)
                or leaf_pub.public_numbers() != key.public_key().public_numbers()
            ):
                raise AttestationError(
                    "token signer: the first certificate of cert_path is not for key_path"
                )
            self.jwk["x5c"] = [
                base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                for c in cert_chain
            ]

    @classmethod
    def from_files(
        cls, key_path: str, cert_path: str | None = None, cert_url: str | None = None
    ) -> TokenSigner:
        try:
            with open(key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), None)
        except (OSError, ValueError) as e:
            raise AttestationError(f"token signer key {key_path}: {e}") from None
        chain = None
        if cert_path:
            try:
                with open(cert_path, "rb") as f:
                    chain = x509.load_pem_x509_certificates(f.read())
            except (OSError, ValueError) as e:
                raise AttestationError(f"token signer certificate {cert_path}: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AttestationError(f"token signer key {key_path}: expected an EC P-256 key")
        return cls(key, chain, cert_url)

    @classmethod
    def from_store(cls, store: Store) -> TokenSigner:
        """The storage-shared signing key, created on first use."""
        fresh = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        store.put(NS_KEYS, "as-token-signer", fresh, overwrite=False)
        pem = store.get(NS_KEYS, "as-token-signer")
        assert pem is not None
        key = serialization.load_pem_private_key(pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(key)

    def sign(self, claims: dict[str, Any]) -> str:
        return sign_jwt(claims, self.key, "ES256", {"jwk": self.jwk})
