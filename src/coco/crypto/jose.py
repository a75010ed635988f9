"""JOSE helpers: base64url, JWK, the KBS resource JWE and compact JWS/JWT.

The JWE is the flattened JSON serialization the KBS protocol uses (``protected``,
``encrypted_key``, ``iv``, ``ciphertext``, ``tag``; no ``aad``), content ``A256GCM``, key
management ``ECDH-ES+A256KW`` (P-256, P-521), ``RSA-OAEP-256`` or ``RSA1_5``. The protected header
is emitted in the exact compact form the Rust guest re-serializes to compute the AAD: keys ``alg``,
``enc``, ``epk`` in that order and ``crv``, ``kty``, ``x``, ``y`` inside ``epk``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from coco.errors import CocoError

log = logging.getLogger(__name__)

__all__ = [
    "JoseError",
    "JwkSet",
    "PrivateKey",
    "PublicKey",
    "b64url_decode",
    "b64url_encode",
    "decode_jwt_unverified",
    "jwe_decrypt",
    "jwe_encrypt",
    "load_jwk_set",
    "private_key_jwk",
    "public_jwk",
    "public_key_from_jwk",
    "read_source",
    "sign_jwt",
    "verify_jws",
]

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_CURVES: dict[str, tuple[type[ec.EllipticCurve], int]] = {
    "P-256": (ec.SECP256R1, 32),
    "P-384": (ec.SECP384R1, 48),
    "P-521": (ec.SECP521R1, 66),
}
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
JWE_KEY_ALGS = ("ECDH-ES+A256KW", "RSA-OAEP-256", "RSA1_5")


class JoseError(CocoError):
    """A JOSE object that is malformed, uses an unsupported algorithm or does not verify."""


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, where: str = "base64url value") -> bytes:
    if not isinstance(text, str):
        raise JoseError(f"{where}: expected a base64url string, found {type(text).__name__}")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise JoseError(f"{where}: not base64url: {e}") from None


def _int_b64(n: int, length: int | None = None) -> str:
    if length is None:
        length = max(1, (n.bit_length() + 7) // 8)
    return b64url_encode(n.to_bytes(length, "big"))


def public_jwk(key: PublicKey | PrivateKey, alg: str | None = None) -> dict[str, Any]:
    """The public JWK of a key (coordinates padded to the curve size)."""
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        key = key.public_key()
    jwk: dict[str, Any]
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = _CURVE_NAMES.get(key.curve.name)
        if crv is None:
            raise JoseError(f"JWK: unsupported curve {key.curve.name}")
        size = _CURVES[crv][1]
        nums = key.public_numbers()
        jwk = {"kty": "EC", "crv": crv, "x": _int_b64(nums.x, size), "y": _int_b64(nums.y, size)}
    elif isinstance(key, rsa.RSAPublicKey):
        nums = key.public_numbers()
        jwk = {"kty": "RSA", "n": _int_b64(nums.n), "e": _int_b64(nums.e)}
    elif isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}
    else:
        raise JoseError(f"JWK: unsupported key type {type(key).__name__}")
    if alg:
        jwk["alg"] = alg
    return jwk


def private_key_jwk(key: PrivateKey) -> dict[str, Any]:
    """The private JWK of an EC or RSA key (for handing keys to other JOSE libraries)."""
    jwk = public_jwk(key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        jwk["d"] = _int_b64(key.private_numbers().private_value, _CURVES[jwk["crv"]][1])
    elif isinstance(key, rsa.RSAPrivateKey):
        p = key.private_numbers()
        jwk.update(
            d=_int_b64(p.d), p=_int_b64(p.p), q=_int_b64(p.q), dp=_int_b64(p.dmp1),
            dq=_int_b64(p.dmq1), qi=_int_b64(p.iqmp),
        )  # fmt: skip
    else:
        raise JoseError("private JWK: only EC and RSA keys")
    return jwk


def public_key_from_jwk(jwk: Any, where: str = "JWK") -> PublicKey:
    """Load a public key from a JWK object (EC P-256/384/521, RSA, Ed25519)."""
    if not isinstance(jwk, dict):
        raise JoseError(f"{where}: expected a JSON object, found {type(jwk).__name__}")
    ident = tuple(jwk.get(k) for k in ("kty", "crv", "x", "y", "n", "e"))
    if all(isinstance(v, str | None) for v in ident):
        cached = _KEY_CACHE.get(ident)
        if cached is not None:
            return cached
        key = _load_jwk(jwk, where)
        _KEY_CACHE[ident] = key
        if len(_KEY_CACHE) > 4096:
            _KEY_CACHE.pop(next(iter(_KEY_CACHE)))
        return key
    return _load_jwk(jwk, where)


_KEY_CACHE: dict[tuple, PublicKey] = {}


def _load_jwk(jwk: dict[str, Any], where: str) -> PublicKey:
    kty = jwk.get("kty")
    try:
        if kty == "EC":
            crv = jwk.get("crv")
            if crv not in _CURVES:
                raise JoseError(
                    f"{where}: unsupported curve {crv!r}: expected P-256, P-384 or P-521"
                )
            curve_cls, size = _CURVES[crv]
            x = b64url_decode(jwk.get("x"), f"{where}.x")
            y = b64url_decode(jwk.get("y"), f"{where}.y")
            if len(x) > size or len(y) > size:
                raise JoseError(f"{where}: coordinates longer than {size} bytes for {crv}")
            nums = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve_cls()
            )
            return nums.public_key()
        if kty == "RSA":
            n = int.from_bytes(b64url_decode(jwk.get("n"), f"{where}.n"), "big")
            e = int.from_bytes(b64url_decode(jwk.get("e"), f"{where}.e"), "big")
            if n.bit_length() < 2048:
                raise JoseError(f"{where}: RSA modulus of {n.bit_length()} bits, expected >= 2048")
            return rsa.RSAPublicNumbers(e, n).public_key()
        if kty == "OKP" and jwk.get("crv") == "Ed25519":
            return ed25519.Ed25519PublicKey.from_public_bytes(b64url_decode(jwk.get("x"), where))
    except ValueError as e:
        raise JoseError(f"{where}: invalid key: {e}") from None
    raise JoseError(f"{where}: unsupported kty {kty!r}: expected EC, RSA or OKP")


# --------------------------------------------------------------------------------------- JWE


def _concat_kdf(z: bytes, alg: str, keylen_bits: int) -> bytes:
    algid = len(alg).to_bytes(4, "big") + alg.encode()
    other = algid + b"\0\0\0\0" + b"\0\0\0\0" + keylen_bits.to_bytes(4, "big")
    return hashlib.sha256(b"\0\0\0\1" + z + other).digest()[: keylen_bits // 8]


def _header_json(header: dict[str, Any]) -> str:
    return json.dumps(header, separators=(",", ":"), ensure_ascii=True)


def jwe_encrypt(tee_pubkey: dict[str, Any], plaintext: bytes) -> dict[str, str]:
    """Encrypt ``plaintext`` to a KBS ``tee-pubkey`` and return the flattened JWE object."""
    kty, alg = tee_pubkey.get("kty"), tee_pubkey.get("alg")
    cek = os.urandom(32)
    if kty == "EC" and alg == "ECDH-ES+A256KW":
        crv = tee_pubkey.get("crv")
        if crv not in ("P-256", "P-521"):
            raise JoseError(f"tee-pubkey: unsupported curve {crv!r}: expected P-256 or P-521")
        peer = public_key_from_jwk(tee_pubkey, "tee-pubkey")
        assert isinstance(peer, ec.EllipticCurvePublicKey)
        eph = ec.generate_private_key(_CURVES[crv][0]())
        z = eph.exchange(ec.ECDH(), peer)
        kek = _concat_kdf(z, alg, 256)
        encrypted_key = aes_key_wrap(kek, cek)
        epk = public_jwk(eph)
        header = _header_json(
            {
                "alg": alg,
                "enc": "A256GCM",
                "epk": {"crv": epk["crv"], "kty": "EC", "x": epk["x"], "y": epk["y"]},
            }
        )
    elif kty == "RSA" and alg in ("RSA-OAEP-256", "RSA1_5"):
        peer = public_key_from_jwk(tee_pubkey, "tee-pubkey")
        assert isinstance(peer, rsa.RSAPublicKey)
        if alg == "RSA-OAEP-256":
            pad: padding.AsymmetricPadding = padding.OAEP(
                mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
            )
        else:
            log.warning("tee-pubkey uses deprecated RSA1_5 key encryption")
            pad = padding.PKCS1v15()
        encrypted_key = peer.encrypt(cek, pad)
        header = _header_json({"alg": alg, "enc": "A256GCM"})
    else:
        raise JoseError(
            f"tee-pubkey: unsupported key kty={kty!r} alg={alg!r}: expected EC with "
            "ECDH-ES+A256KW, or RSA with RSA-OAEP-256 or RSA1_5"
        )
    protected = b64url_encode(header.encode())
    iv = os.urandom(12)
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode("ascii"))
    return {
        "protected": protected,
        "encrypted_key": b64url_encode(encrypted_key),
        "iv": b64url_encode(iv),
        "ciphertext": b64url_encode(sealed[:-16]),
        "tag": b64url_encode(sealed[-16:]),
    }


@dataclass(frozen=True)
class _Jwe:
    protected: str
    header: dict[str, Any]
    encrypted_key: bytes
    iv: bytes
    ciphertext: bytes
    tag: bytes
    aad: str | None


def _parse_jwe(obj: Any) -> _Jwe:
    if not isinstance(obj, dict):
        raise JoseError(f"JWE: expected a JSON object, found {type(obj).__name__}")
    allowed = {"protected", "encrypted_key", "iv", "ciphertext", "tag", "aad"}
    unknown = set(obj) - allowed
    if unknown:
        raise JoseError(f"JWE: unknown field(s) {', '.join(sorted(unknown))}")
    for f in ("protected", "encrypted_key", "iv", "ciphertext", "tag"):
        if not isinstance(obj.get(f), str):
            raise JoseError(f"JWE: missing or non-string field {f!r}")
    try:
        header = json.loads(b64url_decode(obj["protected"], "JWE protected"))
    except ValueError as e:
        raise JoseError(f"JWE: protected header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise JoseError("JWE: protected header is not a JSON object")
    return _Jwe(
        obj["protected"],
        header,
        b64url_decode(obj["encrypted_key"], "JWE encrypted_key"),
        b64url_decode(obj["iv"], "JWE iv"),
        b64url_decode(obj["ciphertext"], "JWE ciphertext"),
        b64url_decode(obj["tag"], "JWE tag"),
        obj.get("aad"),
    )


def jwe_decrypt(obj: Any, private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    """Decrypt a flattened JWE made by :func:`jwe_encrypt` (or an upstream KBS)."""
    jwe = _parse_jwe(obj)
    alg, enc = jwe.header.get("alg"), jwe.header.get("enc")
    if enc != "A256GCM":
        raise JoseError(f"JWE: unsupported enc {enc!r}: expected A256GCM")
    try:
        if alg == "ECDH-ES+A256KW":
            if not isinstance(private_key, ec.EllipticCurvePrivateKey):
                raise JoseError("JWE: ECDH-ES+A256KW needs an EC private key")
            epk = public_key_from_jwk(jwe.header.get("epk"), "JWE epk")
            if not isinstance(epk, ec.EllipticCurvePublicKey):
                raise JoseError("JWE: epk is not an EC key")
            if epk.curve.name != private_key.curve.name:
                raise JoseError("JWE: epk curve differs from the private key's curve")
            kek = _concat_kdf(private_key.exchange(ec.ECDH(), epk), alg, 256)
            cek = aes_key_unwrap(kek, jwe.encrypted_key)
        elif alg in ("RSA-OAEP-256", "RSA1_5"):
            if not isinstance(private_key, rsa.RSAPrivateKey):
                raise JoseError(f"JWE: {alg} needs an RSA private key")
            pad: padding.AsymmetricPadding = (
                padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
                if alg == "RSA-OAEP-256"
                else padding.PKCS1v15()
            )
            cek = private_key.decrypt(jwe.encrypted_key, pad)
        else:
            raise JoseError(f"JWE: unsupported alg {alg!r}: expected one of {JWE_KEY_ALGS}")
        aad = jwe.protected.encode("ascii")
        if jwe.aad is not None:
            aad += b"." + jwe.aad.encode("ascii")
        return AESGCM(cek).decrypt(jwe.iv, jwe.ciphertext + jwe.tag, aad)
    except (InvalidUnwrap, InvalidTag, ValueError) as e:
        raise JoseError(f"JWE: decryption failed ({alg}): {type(e).__name__} {e}") from None


# --------------------------------------------------------------------------------------- JWS


_EC_JWS = {"ES256": (ec.SECP256R1, hashes.SHA256, 32), "ES384": (ec.SECP384R1, hashes.SHA384, 48)}
_RSA_JWS = {"RS256": hashes.SHA256, "RS384": hashes.SHA384, "RS512": hashes.SHA512}
_PS_JWS = {"PS256": hashes.SHA256, "PS384": hashes.SHA384}
JWS_ALGS = ("EdDSA", *_EC_JWS, *_RSA_JWS, *_PS_JWS)


def sign_jwt(payload: dict[str, Any], key: PrivateKey, alg: str, header: dict | None = None) -> str:
    """A compact JWS of the JSON ``payload``; ``header`` adds fields after ``alg``/``typ``."""
    hdr: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if header:
        hdr.update(header)
    signing_input = (
        b64url_encode(_header_json(hdr).encode())
        + "."
        + b64url_encode(json.dumps(payload, separators=(",", ":")).encode())
    ).encode("ascii")
    if alg in _EC_JWS and isinstance(key, ec.EllipticCurvePrivateKey):
        _, h, size = _EC_JWS[alg]
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(h())))
        sig = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    elif alg in _RSA_JWS and isinstance(key, rsa.RSAPrivateKey):
        sig = key.sign(signing_input, padding.PKCS1v15(), _RSA_JWS[alg]())
    elif alg == "EdDSA" and isinstance(key, ed25519.Ed25519PrivateKey):
        sig = key.sign(signing_input)
    else:
        raise JoseError(f"JWS: cannot sign {alg} with a {type(key).__name__}")
    return signing_input.decode("ascii") + "." + b64url_encode(sig)


def decode_jwt_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Split a compact JWS: (header, payload, signing input, signature). Nothing is verified."""
    if not isinstance(token, str):
        raise JoseError("JWT: expected a string")
    parts = token.split(".")
    if len(parts) != 3:
        raise JoseError(f"JWT: expected 3 dot-separated parts, found {len(parts)}")
    try:
        header = json.loads(b64url_decode(parts[0], "JWT header"))
        payload = json.loads(b64url_decode(parts[1], "JWT payload"))
    except ValueError as e:
        raise JoseError(f"JWT: header or payload is not JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise JoseError("JWT: header and payload must be JSON objects")
    sig = b64url_decode(parts[2], "JWT signature")
    return header, payload, (parts[0] + "." + parts[1]).encode("ascii"), sig


def verify_jws(signing_input: bytes, signature: bytes, key: PublicKey, alg: str) -> None:
    """Check one JWS signature; raise :class:`JoseError` when it does not verify."""
    try:
        if alg in _EC_JWS:
            curve, h, size = _EC_JWS[alg]
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != curve.name:
                raise JoseError(f"JWS: {alg} needs an EC {curve.name} key")
            if len(signature) != 2 * size:
                raise JoseError(f"JWS: {alg} signature of {len(signature)} bytes")
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            key.verify(der, signing_input, ec.ECDSA(h()))
        elif alg in _RSA_JWS:
            if not isinstance(key, rsa.RSAPublicKey):
                raise JoseError(f"JWS: {alg} needs an RSA key")
            key.verify(signature, signing_input, padding.PKCS1v15(), _RSA_JWS[alg]())
        elif alg in _PS_JWS:
            if not isinstance(key, rsa.RSAPublicKey):
                raise JoseError(f"JWS: {alg} needs an RSA key")
            h = _PS_JWS[alg]()
            key.verify(signature, signing_input, padding.PSS(padding.MGF1(h), h.digest_size), h)
        elif alg == "EdDSA":
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise JoseError("JWS: EdDSA needs an Ed25519 key")
            key.verify(signature, signing_input)
        else:
            raise JoseError(f"JWS: unsupported alg {alg!r}: expected one of {', '.join(JWS_ALGS)}")
    except InvalidSignature:
        raise JoseError(f"JWS: bad {alg} signature") from None


# ---------------------------------------------------------------------------------- JWK sets


@dataclass(frozen=True)
class JwkSet:
    """The public keys of a JWK set, in order, and those that carry a ``kid`` by it."""

    keys: tuple[PublicKey, ...]
    by_kid: dict[str, PublicKey]


def read_source(uri: str, where: str) -> bytes:
    """The bytes at ``https://``/``http://`` URL, ``file://`` URI or path ``uri``."""
    if uri.startswith(("https://", "http://")):
        import httpx

        try:
            r = httpx.get(uri, timeout=10)
            r.raise_for_status()
            return r.content
        except httpx.HTTPError as e:
            raise JoseError(f"{where}: {e}") from None
    path = uri.removeprefix("file://")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise JoseError(f"{where}: {e}") from None


def load_jwk_set(uri: str, where: str, *, require_kid: bool = False) -> JwkSet:
    """Load the JWK set at ``uri`` (see :func:`read_source`) once.

    An OpenID discovery document is followed to its ``jwks_uri``. Refuses a document that is not
    ``{"keys": [...]}``, an empty set, a key that does not load, and (``require_kid``) a key
    without a ``kid``.
    """
    from coco import jsonio

    doc = jsonio.loads(read_source(uri, where), what=where, error=JoseError)
    if isinstance(doc, dict) and isinstance(doc.get("jwks_uri"), str) and "keys" not in doc:
        src = doc["jwks_uri"]
        doc = jsonio.loads(
            read_source(src, f"{where}: jwks_uri {src}"), what=where, error=JoseError
        )
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise JoseError(f'{where}: expected a JWK set {{"keys": [...]}}')
    if not keys:
        raise JoseError(f"{where}: no keys in the JWK set")
    loaded: list[PublicKey] = []
    by_kid: dict[str, PublicKey] = {}
    for i, k in enumerate(keys):
        kid = k.get("kid") if isinstance(k, dict) else None
        if require_kid and not isinstance(kid, str):
            raise JoseError(f"{where}: key {i} has no 'kid'")
        pub = public_key_from_jwk(k, f"{where} key {kid if isinstance(kid, str) else i}")
        loaded.append(pub)
        if isinstance(kid, str):
            by_kid[kid] = pub
    return JwkSet(tuple(loaded), by_kid)
