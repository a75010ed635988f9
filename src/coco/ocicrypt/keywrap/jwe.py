"""The ``jwe`` key wrapper: private layer options sealed in a JWE (JSON serialization).

Like containers/ocicrypt (go-jose): content encryption ``A256GCM``; key management ``RSA-OAEP``
for RSA keys and ``ECDH-ES+A256KW`` for EC keys. One recipient gives the flattened serialization
with every header (``alg``, ``enc``, ``epk``) in ``protected``; several give the general one, with ``enc`` protected and each
recipient's ``alg`` (and ``epk``) in its own header. Unwrapping accepts RSA-OAEP, RSA-OAEP-256 and
ECDH-ES+A128/192/256KW with any AES-GCM or AES-CBC-HMAC content encryption, in either
serialization. The common case, an RSA key with ``RSA-OAEP``/``RSA-OAEP-256`` and AES-GCM and no
other header, is opened directly with ``cryptography`` (:func:`_unwrap_rsa_gcm`); anything else
goes through jwcrypto, which is only imported then.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

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

if TYPE_CHECKING:
    from jwcrypto import jwk as _jwk


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
    from jwcrypto import jwe as _jwe
    from jwcrypto import jwk as _jwk

    token = _jwe.JWE(plaintext, protected={"enc": CONTENT_ENC})
    for key in recipients:
        token.add_recipient(_jwk.JWK.from_pyca(key), header={"alg": _alg_for(key)})
    out = json.loads(token.serialize())
    return json.dumps(out, separators=(",", ":")).encode()


def _wrap_flattened(key: PublicKey, plaintext: bytes) -> bytes:
    """One recipient, as go-jose writes it: every header (alg, enc, epk) in ``protected``."""
    from jwcrypto import jwk as _jwk
    from jwcrypto.common import base64url_encode
    from jwcrypto.jwa import JWA

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
    from jwcrypto import jwk as _jwk

    return _jwk.JWK.from_pyca(key)


# what the direct path opens: RSA key management, AES-GCM content encryption, nothing else
_OAEP_HASHES = {"RSA-OAEP": "SHA1", "RSA-OAEP-256": "SHA256"}
_GCM_KEY_SIZES = {"A128GCM": 16, "A192GCM": 24, "A256GCM": 32}
_PLAIN_HEADERS = frozenset({"alg", "enc"})


def _b64url(text: str) -> bytes:
    """base64url without padding, as JWE uses it (raises ValueError when it is not)."""
    if "=" in text:
        raise ValueError("padded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as e:
        raise ValueError(str(e)) from None


def _direct_parts(obj: dict[str, Any]) -> list[tuple[str, bytes]] | None:
    """The (alg, encrypted_key) of each recipient when the JWE is one the direct path opens
    exactly (headers only ``alg``/``enc``, RSA-OAEP(-256), AES-GCM); None: use jwcrypto."""
    if "unprotected" in obj or "aad" in obj or not isinstance(obj.get("protected"), str):
        return None
    try:
        protected = json.loads(_b64url(obj["protected"]))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(protected, dict) or protected.get("enc") not in _GCM_KEY_SIZES:
        return None
    if "recipients" in obj:
        recips = [(r.get("header") or {}, r.get("encrypted_key")) for r in obj["recipients"]]
    else:
        recips = [(obj.get("header") or {}, obj.get("encrypted_key"))]
    out = []
    for header, ek in recips:
        if not isinstance(header, dict) or not isinstance(ek, str) or set(header) & set(protected):
            return None
        merged = {**protected, **header}
        if set(merged) - _PLAIN_HEADERS or merged.get("alg") not in _OAEP_HASHES:
            return None
        try:
            out.append((merged["alg"], _b64url(ek)))
        except ValueError:
            return None
    return out


def _unwrap_rsa_gcm(
    obj: dict[str, Any], parts: list[tuple[str, bytes]], key: rsa.RSAPrivateKey
) -> bytes | None:
    """Open the JWE with ``key`` on the direct path; None when ``key`` is not a recipient."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    enc = json.loads(_b64url(obj["protected"]))["enc"]
    try:
        iv, ct, tag = (_b64url(obj[k]) for k in ("iv", "ciphertext", "tag"))
    except (KeyError, ValueError):
        return None
    if len(iv) != 12 or len(tag) != 16:
        return None
    for alg, ek in parts:
        h = getattr(hashes, _OAEP_HASHES[alg])()
        try:
            cek = key.decrypt(ek, padding.OAEP(padding.MGF1(h), h, None))
        except ValueError:
            continue
        if len(cek) != _GCM_KEY_SIZES[enc]:
            continue
        try:
            return AESGCM(cek).decrypt(iv, ct + tag, obj["protected"].encode("ascii"))
        except InvalidTag:
            continue
    return None


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
    if not private_keys:
        raise KeyUnwrapError(f"{where}: no RSA or EC private key given")
    parts = _direct_parts(obj)
    if parts is not None and all(isinstance(k, rsa.RSAPrivateKey) for k in private_keys):
        for key in private_keys:
            found = _unwrap_rsa_gcm(obj, parts, key)  # type: ignore[arg-type]
            if found is not None:
                return found
        raise KeyUnwrapError(
            f"{where}: none of the {len(private_keys)} private key(s) given is a recipient"
        )
    from jwcrypto import jwe as _jwe
    from jwcrypto.common import JWException

    text = json.dumps(obj)
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
