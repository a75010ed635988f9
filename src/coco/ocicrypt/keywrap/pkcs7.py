"""The ``pkcs7`` key wrapper: private layer options in a CMS/PKCS#7 EnvelopedData for X.509 certs.

As containers/ocicrypt writes it (go.mozilla.org/pkcs7): one KeyTransRecipientInfo per certificate
(version 0, IssuerAndSerialNumber, ``rsaEncryption`` = RSAES-PKCS1-v1_5), content encrypted with
AES-128-GCM. Go encodes the GCM parameters oddly: the parameters element carries tag 16 without
the constructed bit around the real ``GCMParameters`` SEQUENCE, and the nonce is tagged ``[4]``
instead of OCTET STRING. ``openssl cms`` refuses that, so this module reads and writes the DER
itself with a tiny strict reader; it accepts both that form and the standard one (RFC 5084), plus
AES-CBC content encryption.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding as sympad
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from coco.errors import CocoError, OcicryptError
from coco.ocicrypt.keywrap import KeyUnwrapError

SCHEME = "pkcs7"

OID_ENVELOPED = "1.2.840.113549.1.7.3"
OID_DATA = "1.2.840.113549.1.7.1"
OID_RSA = "1.2.840.113549.1.1.1"
_GCM = {"2.16.840.1.101.3.4.1.6": 16, "2.16.840.1.101.3.4.1.26": 24, "2.16.840.1.101.3.4.1.46": 32}
_CBC = {"2.16.840.1.101.3.4.1.2": 16, "2.16.840.1.101.3.4.1.22": 24, "2.16.840.1.101.3.4.1.42": 32}
_AES128_GCM = "2.16.840.1.101.3.4.1.6"

# --- a minimal DER reader/writer ---------------------------------------------------------------


class _DerError(CocoError):
    pass


@dataclass(frozen=True, slots=True)
class _Tlv:
    tag: int
    value: bytes
    raw: bytes

    @property
    def constructed(self) -> bool:
        return bool(self.tag & 0x20)

    def children(self) -> list[_Tlv]:
        return _read_all(self.value)


def _read_one(buf: bytes, pos: int) -> tuple[_Tlv, int]:
    start = pos
    if pos + 2 > len(buf):
        raise _DerError(f"truncated element at offset {pos}")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise _DerError(f"multi-byte tags are not used here (offset {pos})")
    n = buf[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 4:
            raise _DerError(f"unsupported length encoding at offset {start}")
        if pos + k > len(buf):
            raise _DerError(f"truncated length at offset {start}")
        n = int.from_bytes(buf[pos : pos + k], "big")
        pos += k
    if pos + n > len(buf):
        raise _DerError(f"element at offset {start} runs past the end ({n} bytes announced)")
    return _Tlv(tag, buf[pos : pos + n], buf[start : pos + n]), pos + n


def _read_all(buf: bytes) -> list[_Tlv]:
    out, pos = [], 0
    while pos < len(buf):
        tlv, pos = _read_one(buf, pos)
        out.append(tlv)
    return out


def _expect(tlv: _Tlv, tag: int, what: str) -> _Tlv:
    if tlv.tag != tag:
        raise _DerError(f"{what}: expected tag 0x{tag:02x}, found 0x{tlv.tag:02x}")
    return tlv


def _seq(tlv: _Tlv, what: str, n_min: int, n_max: int | None = None) -> list[_Tlv]:
    kids = _expect(tlv, 0x30, what).children()
    if len(kids) < n_min or (n_max is not None and len(kids) > n_max):
        raise _DerError(f"{what}: expected {n_min}..{n_max or 'n'} elements, found {len(kids)}")
    return kids


def _oid_decode(value: bytes) -> str:
    if not value:
        raise _DerError("empty OBJECT IDENTIFIER")
    first = value[0]
    parts = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    n = 0
    for b in value[1:]:
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(n)
            n = 0
    return ".".join(map(str, parts))


def _oid(tlv: _Tlv, what: str) -> str:
    return _oid_decode(_expect(tlv, 0x06, what).value)


def _int(tlv: _Tlv, what: str) -> int:
    return int.from_bytes(_expect(tlv, 0x02, what).value, "big", signed=True)


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _len(len(value)) + value


def _enc_oid(oid: str) -> bytes:
    nums = [int(x) for x in oid.split(".")]
    out = bytearray([40 * nums[0] + nums[1]])
    for n in nums[2:]:
        chunk = [n & 0x7F]
        n >>= 7
        while n:
            chunk.append(0x80 | (n & 0x7F))
            n >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _enc_int(n: int) -> bytes:
    length = max(1, (n.bit_length() + 8) // 8)
    return _tlv(0x02, n.to_bytes(length, "big", signed=True))


# --- wrapping ----------------------------------------------------------------------------------


def wrap(certs: Sequence[x509.Certificate], plaintext: bytes) -> bytes:
    """Envelope ``plaintext`` for every certificate (RSA keys); return the DER ContentInfo."""
    if not certs:
        raise OcicryptError("pkcs7: no recipient certificates")
    cek = secrets.token_bytes(16)
    nonce = secrets.token_bytes(12)
    infos = []
    for cert in certs:
        pub = cert.public_key()
        if not isinstance(pub, rsa.RSAPublicKey):
            raise OcicryptError(
                f"pkcs7: certificate {cert.subject.rfc4514_string()!r}: expected an RSA key, "
                f"found {type(pub).__name__}"
            )
        ias = _tlv(0x30, cert.issuer.public_bytes() + _enc_int(cert.serial_number))
        alg = _tlv(0x30, _enc_oid(OID_RSA))
        ek = _tlv(0x04, pub.encrypt(cek, padding.PKCS1v15()))
        infos.append(_tlv(0x30, _enc_int(0) + ias + alg + ek))
    ct = AESGCM(cek).encrypt(nonce, plaintext, None)
    # Go's encoding, byte for byte: params element tagged 0x10 (primitive) around the SEQUENCE,
    # nonce tagged [4] (0x84), ICV length 16.
    gcm_params = _tlv(0x30, _tlv(0x84, nonce) + _enc_int(16))
    content_alg = _tlv(0x30, _enc_oid(_AES128_GCM) + _tlv(0x10, gcm_params))
    eci = _tlv(0x30, _enc_oid(OID_DATA) + content_alg + _tlv(0xA0, _tlv(0x04, ct)))
    env = _tlv(0x30, _enc_int(0) + _tlv(0x31, b"".join(sorted(infos))) + eci)
    return _tlv(0x30, _enc_oid(OID_ENVELOPED) + _tlv(0xA0, env))


@dataclass(frozen=True, slots=True)
class _Recipient:
    issuer: bytes
    serial: int
    encrypted_key: bytes


def _parse(blob: bytes) -> tuple[list[_Recipient], str, _Tlv | None, bytes]:
    top, end = _read_one(blob, 0)
    if end != len(blob):
        raise _DerError(f"{len(blob) - end} trailing bytes after the ContentInfo")
    ci = _seq(top, "ContentInfo", 2, 2)
    if _oid(ci[0], "contentType") != OID_ENVELOPED:
        raise _DerError(f"contentType: expected envelopedData, found {_oid(ci[0], 'contentType')}")
    wrapped = _expect(ci[1], 0xA0, "content").children()
    if len(wrapped) != 1:
        raise _DerError("content: expected one EnvelopedData")
    env = _seq(wrapped[0], "EnvelopedData", 3, 4)
    if env[1].tag == 0xA0:  # originatorInfo
        env = [env[0], *env[2:]]
    recips = []
    for ri in _expect(env[1], 0x31, "recipientInfos").children():
        kids = _seq(ri, "RecipientInfo", 4, 4)
        if kids[0].tag != 0x02:
            raise _DerError("RecipientInfo: only KeyTransRecipientInfo is supported")
        ias = _seq(kids[1], "IssuerAndSerialNumber", 2, 2)
        alg = _seq(kids[2], "keyEncryptionAlgorithm", 1, 2)
        if _oid(alg[0], "keyEncryptionAlgorithm") != OID_RSA:
            continue
        ek = _expect(kids[3], 0x04, "encryptedKey").value
        recips.append(_Recipient(ias[0].raw, _int(ias[1], "serialNumber"), ek))
    eci = _seq(env[2], "EncryptedContentInfo", 2, 3)
    calg = _seq(eci[1], "contentEncryptionAlgorithm", 1, 2)
    alg_oid = _oid(calg[0], "contentEncryptionAlgorithm")
    params = calg[1] if len(calg) > 1 else None
    if len(eci) < 3:
        raise _DerError("EncryptedContentInfo: no encryptedContent")
    ec_tlv = eci[2]
    if ec_tlv.tag == 0x80:
        content = ec_tlv.value
    elif ec_tlv.tag == 0xA0:
        content = b"".join(_expect(k, 0x04, "encryptedContent").value for k in ec_tlv.children())
    else:
        raise _DerError(f"encryptedContent: unexpected tag 0x{ec_tlv.tag:02x}")
    return recips, alg_oid, params, content


def _decrypt_content(alg_oid: str, params: _Tlv | None, cek: bytes, content: bytes) -> bytes:
    if alg_oid in _GCM:
        if params is None:
            raise _DerError("AES-GCM without parameters")
        p = params
        if p.tag == 0x10:  # Go's primitive wrapper around the SEQUENCE
            p, end = _read_one(p.value, 0)
            if end != len(params.value):
                raise _DerError("GCM parameters: trailing bytes")
        kids = _seq(p, "GCMParameters", 1, 2)
        if kids[0].tag not in (0x04, 0x84):
            raise _DerError(f"GCMParameters: nonce has tag 0x{kids[0].tag:02x}")
        nonce = kids[0].value
        icv = _int(kids[1], "ICVlen") if len(kids) > 1 else 12
        if icv != 16:
            raise _DerError(f"GCMParameters: ICV length {icv} is not supported (expected 16)")
        if len(cek) != _GCM[alg_oid]:
            raise ValueError("content key of the wrong size")
        return AESGCM(cek).decrypt(nonce, content, None)
    if alg_oid in _CBC:
        if params is None or params.tag != 0x04 or len(params.value) != 16:
            raise _DerError("AES-CBC: expected a 16-byte IV")
        if len(cek) != _CBC[alg_oid]:
            raise ValueError("content key of the wrong size")
        d = Cipher(algorithms.AES(cek), modes.CBC(params.value)).decryptor()
        padded = d.update(content) + d.finalize()
        u = sympad.PKCS7(128).unpadder()
        return u.update(padded) + u.finalize()
    raise _DerError(f"unsupported content encryption algorithm {alg_oid}")


def unwrap(
    private_keys: Sequence[rsa.RSAPrivateKey | object],
    certs: Sequence[x509.Certificate],
    blob: bytes,
    where: str = "pkcs7",
) -> bytes:
    """Open the envelope with a private key; certificates pick the matching recipient.

    With a certificate whose public key matches a private key, only its RecipientInfo is tried (as
    skopeo does, which needs both); RSA keys without a certificate are tried on every recipient
    (the AES-GCM tag tells a wrong guess apart).
    """
    try:
        recips, alg_oid, params, content = _parse(blob)
    except _DerError as e:
        raise KeyUnwrapError(f"{where}: malformed PKCS#7 envelope: {e}") from None
    keys = [k for k in private_keys if isinstance(k, rsa.RSAPrivateKey)]
    if not keys:
        raise KeyUnwrapError(f"{where}: no RSA private key given")
    attempts: list[tuple[rsa.RSAPrivateKey, _Recipient]] = []
    for key in keys:
        pub = key.public_key().public_numbers()
        matched = [
            r
            for c in certs
            if isinstance(c.public_key(), rsa.RSAPublicKey)
            and c.public_key().public_numbers() == pub  # type: ignore[union-attr]
            for r in recips
            if r.issuer == c.issuer.public_bytes() and r.serial == c.serial_number
        ]
        attempts += [(key, r) for r in (matched or recips)]
    for key, r in attempts:
        try:
            cek = key.decrypt(r.encrypted_key, padding.PKCS1v15())
            return _decrypt_content(alg_oid, params, cek, content)
        except _DerError as e:
            raise KeyUnwrapError(f"{where}: malformed PKCS#7 envelope: {e}") from None
        except (ValueError, InvalidTag):
            continue
    raise KeyUnwrapError(
        f"{where}: none of the {len(keys)} RSA private key(s) given opens the envelope "
        f"({len(recips)} recipient(s))"
    )
