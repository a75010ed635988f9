"""The ``jwe`` key wrapper: private layer options sealed in a JWE (JSON serialization).

Like containers/ocicrypt (go-jose): content encryption ``A256GCM``; key management ``RSA-OAEP``
for RSA keys and ``ECDH-ES+A256KW`` for EC keys. One recipient gives the flattened serialization
with every header (``alg``, ``enc``, ``epk``) in ``protected``; several give the general one, with ``enc`` protected and each
recipient's ``alg`` (and ``epk``) in its own header. Unwrapping accepts RSA-OAEP, RSA-OAEP-256 and
ECDH-ES+A128/192/256KW with any AES-GCM or AES-CBC-HMAC content encryption, in either
serialization.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto import jwe as _jwe
from jwcrypto import jwk as _jwk
from jwcrypto.common import JWException, base64url_encode
from jwcrypto.jwa import JWA

from coco.errors import OcicryptError
from coco.ocicrypt.keywrap import KeyUnwrapError

SCHEME = "jwe"
CONTENT_ENC = "A256GCM"
_UNWRAP_ALGS = [
    "RSA-OAEP",
    "RSA-OAEP-256",
    "ECDH-ES+A128KW",
    "ECDH-ES+A192KW",
    "ECDH-ES+A256KW",
    "A128GCM",
    "A192GCM",
    "A256GCM",
    "A128CBC-HS256",
    "A192CBC-HS384",
    "A256CBC-HS512",
]
_TOP_KEYS = frozenset(
    {
        "protected",
        "unprotected",
        "header",
        "encrypted_key",
        "recipients",
        "iv",
        "ciphertext",
        "tag",
        "aad",
    }
)
_RECIPIENT_KEYS = frozenset({"header", "encrypted_key"})

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _alg_for(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA-OAEP"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ECDH-ES+A256KW"
    raise OcicryptError(f"jwe: unsupported public key type {type(key).__name__}")


def wrap(recipients: Sequence[PublicKey], plaintext: bytes) -> bytes:
    """Seal ``plaintext`` to every key in ``recipients``; return the JWE JSON bytes."""
    if not recipients:
        raise OcicryptError("jwe: no recipients")
    if len(recipients) == 1:
        return _wrap_flattened(recipients[0], plaintext)
    token = _jwe.JWE(plaintext, protected={"enc": CONTENT_ENC})
    for key in recipients:
        token.add_recipient(_jwk.JWK.from_pyca(key), header={"alg": _alg_for(key)})
    out = json.loads(token.serialize())
    return json.dumps(out, separators=(",", ":")).encode()


def _wrap_flattened(key: PublicKey, plaintext: bytes) -> bytes:
    """One recipient, as go-jose writes it: every header (alg, enc, epk) in ``protected``."""
    alg = _alg_for(key)
    enc = JWA.encryption_alg(CONTENT_ENC)
    headers: dict[str, Any] = {"alg": alg, "enc": CONTENT_ENC}
    wrapped = JWA.keymgmt_alg(alg).wrap(_jwk.JWK.from_pyca(key), enc.input_keysize, None, headers)
    headers.update(wrapped.get("header", {}))
    protected = base64url_encode(json.dumps(dict(sorted(headers.items())), separators=(",", ":")))
    iv, ciphertext, tag = enc.encrypt(wrapped["cek"], protected.encode("ascii"), plaintext)
    out = {
        "protected": protected,
        "encrypted_key": base64url_encode(wrapped["ek"]),
        "iv": base64url_encode(iv),
        "ciphertext": base64url_encode(ciphertext),
        "tag": base64url_encode(tag),
    }
    return json.dumps(out, separators=(",", ":")).encode()


def _check_shape(obj: Any, where: str) -> None:
    if not isinstance(obj, dict):
        raise KeyUnwrapError(f"{where}: expected a JWE JSON object")
    extra = sorted(set(obj) - _TOP_KEYS)
    if extra:
        raise KeyUnwrapError(f"{where}: unknown JWE member {extra[0]!r}")
    for k in ("iv", "ciphertext", "tag", "protected"):
        if k in obj and not isinstance(obj[k], str):
            raise KeyUnwrapError(f"{where}: JWE member {k!r} must be a string")
    if "ciphertext" not in obj:
        raise KeyUnwrapError(f"{where}: JWE without 'ciphertext'")
    recips = obj.get("recipients")
    if recips is not None:
        if not isinstance(recips, list) or not recips:
            raise KeyUnwrapError(f"{where}: 'recipients' must be a non-empty array")
        for i, r in enumerate(recips):
            if not isinstance(r, dict) or set(r) - _RECIPIENT_KEYS:
                raise KeyUnwrapError(f"{where}: recipients[{i}]: unexpected shape")


@functools.lru_cache(maxsize=32)
def _private_jwk(key: PrivateKey) -> _jwk.JWK:
    """One JWK per private key object: jwcrypto rebuilds (and re-validates, ~50 ms for RSA) the
    key behind a new JWK, so every layer of a pull would pay for it again."""
    return _jwk.JWK.from_pyca(key)


def unwrap(private_keys: Sequence[PrivateKey], blob: bytes, where: str = "jwe") -> bytes:
    """Open a JWE with the first of ``private_keys`` that is one of its recipients."""
    try:
        obj = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyUnwrapError(f"{where}: not a JWE in JSON serialization") from None
    _check_shape(obj, where)
    if "recipients" in obj:
        # go-jose repeats the first recipient's encrypted_key at the top level; drop it so the
        # general form is parsed as such.
        obj = {k: v for k, v in obj.items() if k not in ("encrypted_key", "header")}
    text = json.dumps(obj)
    if not private_keys:
        raise KeyUnwrapError(f"{where}: no RSA or EC private key given")
    for key in private_keys:
        try:
            token = _jwe.JWE()
            token.allowed_algs = _UNWRAP_ALGS
            token.deserialize(text, _private_jwk(key))
            return bytes(token.payload)
        except (JWException, ValueError, TypeError, KeyError):
            continue
    raise KeyUnwrapError(
        f"{where}: none of the {len(private_keys)} private key(s) given is a recipient"
    )
