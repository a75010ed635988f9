"""Helpers shared by the TEE verifiers: strict JSON field readers, report-data fitting, X.509.

Every reader takes a ``where`` string (``"snp evidence: attestation_report.measurement"``) so
that the error it raises names the field, what was expected and what was found.
"""

from __future__ import annotations

import base64
import binascii
import json
import warnings
from collections.abc import Iterable
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from coco.crypto.digest import fit as fit  # re-exported: the TEE modules import it from here
from coco.errors import AttestationError
from coco.jsonfields import Fields


def load_object(evidence: bytes | str | dict[str, Any], where: str) -> dict[str, Any]:
    """The evidence as a JSON object (parsing it when given as bytes or text)."""
    if isinstance(evidence, bytes | str):
        try:
            evidence = json.loads(evidence)
        except (ValueError, UnicodeDecodeError) as e:
            raise AttestationError(f"{where}: expected a JSON object, got invalid JSON: {e}") from e
    if not isinstance(evidence, dict):
        raise AttestationError(f"{where}: expected a JSON object, got {type(evidence).__name__}")
    return evidence


_FIELDS = Fields(AttestationError)


def check_keys(
    obj: dict[str, Any], required: Iterable[str], optional: Iterable[str], where: str
) -> None:
    """Refuse missing required keys and unknown keys."""
    _FIELDS.check(obj, where, required=required, optional=optional)


def get_object(obj: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    return _FIELDS.get(obj, key, where, dict)


def get_int(obj: dict[str, Any], key: str, where: str, bits: int) -> int:
    value = _FIELDS.get(obj, key, where, int)
    if not 0 <= value < (1 << bits):
        raise AttestationError(
            f"{where}.{key}: expected an unsigned {bits}-bit integer, got {value}"
        )
    return value


def get_str(obj: dict[str, Any], key: str, where: str) -> str:
    return _FIELDS.string(obj, key, where)


def byte_array(value: Any, where: str, size: int | None = None) -> bytes:
    """A JSON array of integers 0..255 (serde's encoding of ``[u8; N]`` / ``Vec<u8>``)."""
    if not isinstance(value, list):
        raise AttestationError(f"{where}: expected an array of bytes, got {type(value).__name__}")
    if size is not None and len(value) != size:
        raise AttestationError(f"{where}: expected {size} bytes, got {len(value)}")
    for i, b in enumerate(value):
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= 255:
            raise AttestationError(f"{where}[{i}]: expected a byte 0..255, got {b!r}")
    return bytes(value)


def b64(value: Any, where: str, *, urlsafe: bool = False) -> bytes:
    """Decode base64 (standard or URL-safe; padding optional) strictly."""
    if not isinstance(value, str):
        raise AttestationError(f"{where}: expected a base64 string, got {type(value).__name__}")
    text = value.strip()
    text += "=" * (-len(text) % 4)
    try:
        if urlsafe:
            if any(c in text for c in "+/"):
                raise ValueError("'+' or '/' in URL-safe base64")
            return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        kind = "base64url" if urlsafe else "base64"
        raise AttestationError(f"{where}: expected {kind}, got invalid data: {e}") from e


def unhex(value: Any, where: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise AttestationError(f"{where}: expected a hex string, got {type(value).__name__}")
    try:
        data = bytes.fromhex(value)
    except ValueError as e:
        raise AttestationError(f"{where}: expected hex, got invalid data: {e}") from e
    if size is not None and len(data) != size:
        raise AttestationError(f"{where}: expected {size} bytes, got {len(data)}")
    return data


def expect_equal(what: str, expected: bytes, found: bytes) -> None:
    if expected != found:
        raise AttestationError(f"{what} mismatch: expected {expected.hex()}, got {found.hex()}")


def load_der_cert(data: bytes, where: str) -> x509.Certificate:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # AMD/Intel certs have quirks (negative serials)
            return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise AttestationError(f"{where}: expected a DER X.509 certificate: {e}") from e


def load_pem_certs(data: bytes, where: str) -> list[x509.Certificate]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise AttestationError(f"{where}: expected PEM X.509 certificates: {e}") from e
    return certs


def cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def check_signed_by(cert: x509.Certificate, issuer: x509.Certificate, where: str) -> None:
    """Check that ``issuer``'s key signed ``cert`` (RSA PKCS#1 v1.5, RSA-PSS or ECDSA)."""
    key = issuer.public_key()
    alg = cert.signature_hash_algorithm
    if alg is None:
        raise AttestationError(f"{where}: certificate {cn(cert)!r} has no signature hash")
    if cert.issuer != issuer.subject:
        raise AttestationError(
            f"{where}: certificate {cn(cert)!r} is issued by {cert.issuer.rfc4514_string()!r}, "
            f"not by {issuer.subject.rfc4514_string()!r}"
        )
    try:
        if isinstance(key, rsa.RSAPublicKey):
            params = cert.signature_algorithm_parameters
            pad = params if isinstance(params, padding.PSS) else padding.PKCS1v15()
            key.verify(cert.signature, cert.tbs_certificate_bytes, pad, alg)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(alg))
        else:
            raise AttestationError(
                f"{where}: unsupported issuer key type {type(key).__name__} for {cn(cert)!r}"
            )
    except InvalidSignature:
        raise AttestationError(
            f"{where}: signature of certificate {cn(cert)!r} does not verify with the key of "
            f"{cn(issuer)!r}"
        ) from None


def sha(name: str) -> hashes.HashAlgorithm:
    return {"sha256": hashes.SHA256(), "sha384": hashes.SHA384()}[name]
