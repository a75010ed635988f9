"""Sealed secrets: ``sealed.<JWS>`` strings that only an attested guest can open.

A sealed secret is ``sealed.`` followed by a compact JWS (base64url without padding)::

    sealed.<{"alg":"ES256","kid":"<kid>"}>.<payload JSON>.<ES256 signature, r||s>

The signature is checked with the P-256 public JWK named by ``kid``: a KBS resource when the kid
is a resource URI (``kbs:///default/sealed-secret-key/1``), else a file under the sealed-secret
directory (``/run/confidential-containers/cdh/sealed-secret``; a kid that leads outside it is
refused). Only ``ES256`` is accepted. The payload (version ``0.1.0``) is one of:

- ``envelope``: a data key wrapped by a KMS provider (``provider``, ``key_id``, ``encrypted_key``,
  ``provider_settings``, ``annotations``) and the data under it (``encrypted_data``, ``iv``,
  ``wrap_type`` A256GCM or A256CTR);
- ``vault``: a secret held by a KMS provider under ``name`` (``kbs``: a resource URI).

``insecure_skip_verification`` (upstream's ``skip_sealed_secret_verification``) reads the payload
without looking at the header or the signature, as the legacy ``sealed.fakejwsheader.<payload>.
fakesignature`` secrets need; it warns, because anyone can then make a secret the hub believes.

:func:`keygen`, :func:`seal_vault` and :func:`seal_envelope` make keys and secrets (what upstream's
``secret`` tool does), for users and tests.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from coco.crypto.jose import (
    JoseError,
    b64url_decode,
    b64url_encode,
    private_key_jwk,
    public_jwk,
    public_key_from_jwk,
    verify_jws,
)
from coco.guest.cdh import wrap
from coco.guest.cdh.config import CDH_BASE_DIR
from coco.guest.cdh.errors import CdhError, SecretError
from coco.guest.cdh.kms import KmsContext, new_decryptor, new_encryptor, new_getter
from coco.guest.cdh.resource import ResourceGetter, is_resource_uri
from coco.jsonio import loads

log = logging.getLogger(__name__)

PREFIX = "sealed."
VERSION = "0.1.0"
ALG = "ES256"
SEALED_SECRET_DIR = CDH_BASE_DIR + "/sealed-secret"
MAX_SECRET = 1 << 20

_ENVELOPE = (
    "provider",
    "key_id",
    "encrypted_key",
    "encrypted_data",
    "wrap_type",
    "iv",
    "provider_settings",
    "annotations",
)
_VAULT = ("name", "provider", "provider_settings", "annotations")


@dataclass(frozen=True, slots=True)
class UnsealContext:
    """What unsealing needs from the hub."""

    getter: ResourceGetter | None = None
    kms: KmsContext = field(default_factory=KmsContext)
    sealed_secret_dir: str = SEALED_SECRET_DIR
    insecure_skip_verification: bool = False


# --- reading ------------------------------------------------------------------------------------


def _text(secret: bytes | str) -> str:
    if isinstance(secret, bytes | bytearray):
        if len(secret) > MAX_SECRET:
            raise SecretError(
                f"sealed secret: expected at most {MAX_SECRET} bytes, found {len(secret)}"
            )
        try:
            return bytes(secret).decode("ascii")
        except UnicodeDecodeError:
            raise SecretError(
                "sealed secret: expected ASCII text (sealed.<jws>), found other bytes"
            ) from None
    return secret


def _b64url(text: str, where: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise SecretError(f"{where}: expected base64url without padding, found other characters")
    try:
        return b64url_decode(text, where)
    except JoseError as e:
        raise SecretError(str(e)) from None


def _verified_payload(body: str, ctx: UnsealContext) -> bytes:
    parts = body.split(".")
    if len(parts) != 3:
        raise SecretError(
            f"sealed secret: expected sealed.<header>.<payload>.<signature>, found {len(parts)} "
            "dot-separated part(s) after 'sealed.'"
        )
    header = loads(
        _b64url(parts[0], "sealed secret header"), what="sealed secret header", error=SecretError
    )
    if not isinstance(header, dict):
        raise SecretError("sealed secret header: expected a JSON object")
    alg, kid = header.get("alg"), header.get("kid")
    if alg is None or kid is None:
        missing = "alg" if alg is None else "kid"
        raise SecretError(f"sealed secret header: expected 'alg' and 'kid', '{missing}' is missing")
    if alg != ALG:
        raise SecretError(f"sealed secret header: JWS algorithm must be {ALG}, found {alg!r}")
    if not isinstance(kid, str) or not kid:
        raise SecretError(f"sealed secret header: 'kid' must be a non-empty string, found {kid!r}")
    jwk_raw = _verification_key(kid, ctx)
    jwk = loads(jwk_raw, what=f"sealed secret key {kid}", error=SecretError)
    if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        raise SecretError(f"sealed secret key {kid}: expected an EC P-256 JWK")
    try:
        key = public_key_from_jwk(
            {k: jwk.get(k) for k in ("kty", "crv", "x", "y")}, f"sealed secret key {kid}"
        )
        verify_jws(
            f"{parts[0]}.{parts[1]}".encode("ascii"),
            _b64url(parts[2], "sealed secret signature"),
            key,
            ALG,
        )
    except JoseError as e:
        raise SecretError(f"sealed secret (kid {kid}): signature does not verify: {e}") from None
    return _b64url(parts[1], "sealed secret payload")


def _verification_key(kid: str, ctx: UnsealContext) -> bytes:
    if is_resource_uri(kid):
        if ctx.getter is None:
            raise SecretError(f"sealed secret key {kid}: no KBS client is configured to fetch it")
        return ctx.getter.get_resource(kid)
    base = Path(ctx.sealed_secret_dir)
    try:
        root = base.resolve(strict=True)
    except OSError:
        raise SecretError(
            f"sealed secret key {kid!r}: the key directory {base} does not exist"
        ) from None
    path = (root / kid).resolve()
    if path == root or root not in path.parents:
        raise SecretError(
            f"sealed secret key {kid!r}: expected a file under {base}, the kid leads outside it"
        )
    try:
        return path.read_bytes()
    except OSError as e:
        raise SecretError(f"sealed secret key {kid!r}: cannot read {path}: {e.strerror}") from None


_warned_skip = False


def _unverified_payload(text: str) -> bytes:
    global _warned_skip
    if not _warned_skip:
        log.warning(
            "sealed secrets are read WITHOUT checking their signature "
            "(skip_sealed_secret_verification: insecure, anyone can forge a secret)"
        )
        _warned_skip = True
    parts = text.split(".")
    if len(parts) != 4:
        raise SecretError(
            f"sealed secret: expected 4 dot-separated sections (sealed.<header>.<payload>.<signature>), "
            f"found {len(parts)}"
        )
    return _b64url(parts[2], "sealed secret payload")


def parse_payload(raw: bytes) -> dict[str, Any]:
    """The payload document, its version and type checked and its fields of the type present."""
    doc = loads(raw, what="sealed secret payload", error=SecretError)
    if not isinstance(doc, dict):
        raise SecretError("sealed secret payload: expected a JSON object")
    version = doc.get("version")
    if version != VERSION:
        raise SecretError(f"sealed secret payload: expected version {VERSION!r}, found {version!r}")
    kind = doc.get("type")
    fields = {"envelope": _ENVELOPE, "vault": _VAULT}.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise SecretError(
            f"sealed secret payload: unknown type {kind!r} (expected 'envelope' or 'vault')"
        )
    missing = [f for f in fields if f not in doc]
    if missing:
        raise SecretError(f"sealed secret payload ({kind}): missing field {missing[0]!r}")
    unknown = sorted(set(doc) - set(fields) - {"version", "type"})
    if unknown:
        raise SecretError(f"sealed secret payload ({kind}): unknown field {unknown[0]!r}")
    for f in ("provider_settings", "annotations"):
        if not isinstance(doc[f], dict):
            raise SecretError(f"sealed secret payload ({kind}): {f!r} must be a JSON object")
    for f in fields:
        if f not in ("provider_settings", "annotations") and not isinstance(doc[f], str):
            raise SecretError(f"sealed secret payload ({kind}): {f!r} must be a string")
    return doc


def _b64(doc: Mapping[str, Any], key: str) -> bytes:
    try:
        return base64.b64decode(doc[key], validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(f"sealed secret payload: {key!r} is not standard base64") from None


def unseal(secret: bytes | str, ctx: UnsealContext) -> bytes:
    """The plaintext of a sealed secret, or a :class:`SecretError` saying why not."""
    text = _text(secret)
    if not text.startswith(PREFIX):
        raise SecretError(
            f"sealed secret: expected a string starting with {PREFIX!r}, found {text[:12]!r}"
        )
    if ctx.insecure_skip_verification:
        raw = _unverified_payload(text)
    else:
        raw = _verified_payload(text[len(PREFIX) :], ctx)
    doc = parse_payload(raw)
    try:
        if doc["type"] == "vault":
            getter = new_getter(doc["provider"], doc["provider_settings"], ctx.kms)
            return getter.get_secret(doc["name"], doc["annotations"])
        if doc["wrap_type"] not in wrap.WRAP_TYPES:
            raise SecretError(
                f"sealed secret payload: wrap_type must be A256GCM or A256CTR, found {doc['wrap_type']!r}"
            )
        dec = new_decryptor(doc["provider"], doc["provider_settings"], ctx.kms)
        dek = dec.decrypt(_b64(doc, "encrypted_key"), doc["key_id"], doc["annotations"])
        return wrap.decrypt(
            dek, _b64(doc, "encrypted_data"), _b64(doc, "iv"), doc["wrap_type"],
            where="sealed envelope", err=SecretError,
        )  # fmt: skip
    except SecretError:
        raise
    except CdhError as e:
        raise SecretError(
            f"sealed secret ({doc['type']}, provider {doc['provider']!r}): {e}"
        ) from None


# --- making -------------------------------------------------------------------------------------


def seal(payload: Mapping[str, Any], kid: str, key: ec.EllipticCurvePrivateKey) -> str:
    """``sealed.<JWS>`` of ``payload`` signed ES256 with ``key`` under ``kid``."""
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise SecretError("sealing: expected an EC P-256 private key")
    header = json.dumps({"alg": ALG, "kid": kid}, separators=(",", ":")).encode()
    body = json.dumps(payload, separators=(",", ":")).encode()
    signing_input = f"{b64url_encode(header)}.{b64url_encode(body)}"
    from cryptography.hazmat.primitives import hashes

    r, s = decode_dss_signature(key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256())))
    return f"{PREFIX}{signing_input}.{b64url_encode(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def vault_payload(name: str, provider: str = "kbs", provider_settings: Mapping[str, Any] | None = None,
                  annotations: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "version": VERSION,
        "type": "vault",
        "name": name,
        "provider": provider,
        "provider_settings": dict(provider_settings or {}),
        "annotations": dict(annotations or {}),
    }


def envelope_payload(
    data: bytes, provider: str, key_id: str, kms: KmsContext, wrap_type: str = "A256GCM",
    provider_settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Encrypt ``data`` under a fresh data key that ``provider`` wraps with ``key_id``."""
    dek = os.urandom(wrap.KEY_SIZE)
    ct, iv = wrap.encrypt(dek, data, wrap_type)
    enc = new_encryptor(provider, provider_settings, kms)
    wrapped, annotations = enc.encrypt(dek, key_id)
    return {
        "version": VERSION,
        "type": "envelope",
        "provider": provider,
        "key_id": key_id,
        "encrypted_key": base64.b64encode(wrapped).decode(),
        "encrypted_data": base64.b64encode(ct).decode(),
        "wrap_type": wrap_type,
        "iv": base64.b64encode(iv).decode(),
        "provider_settings": dict(provider_settings or {}),
        "annotations": annotations,
    }


def keygen(kid: str, output_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """A new P-256 signing key: ``<name>-private.json`` and ``<name>-public.json`` JWKs, where
    name is the kid with characters other than letters, digits, '.', '_', '-' made '_'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", kid).strip(".") or "key"
    d = Path(output_dir)
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = d / f"{name}-private.json", d / f"{name}-public.json"
    for p in (priv, pub):
        if p.exists():
            raise SecretError(f"keygen: {p} already exists, not overwritten")
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({**private_key_jwk(key), "kid": kid, "alg": ALG}, f)
    pub.write_text(json.dumps({**public_jwk(key), "kid": kid, "alg": ALG}))
    return priv, pub


def load_signing_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """An EC P-256 private key from a JWK file (what :func:`keygen` writes)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SecretError(f"signing key {p}: cannot read: {e.strerror}") from None
    jwk = loads(raw, what=f"signing key {p}", error=SecretError)
    if (
        not isinstance(jwk, dict)
        or jwk.get("kty") != "EC"
        or jwk.get("crv") != "P-256"
        or "d" not in jwk
    ):
        raise SecretError(f"signing key {p}: expected a private EC P-256 JWK (with 'd')")
    try:
        pub = public_key_from_jwk({k: jwk.get(k) for k in ("kty", "crv", "x", "y")}, str(p))
        d = int.from_bytes(b64url_decode(jwk["d"], f"{p}: d"), "big")
        key = ec.derive_private_key(d, ec.SECP256R1())
    except (JoseError, ValueError) as e:
        raise SecretError(f"signing key {p}: {e}") from None
    if key.public_key().public_numbers() != pub.public_numbers():  # type: ignore[union-attr]
        raise SecretError(f"signing key {p}: 'd' does not match 'x'/'y'")
    return key
