"""The two symmetric wraps of the CDH: ``A256GCM`` and ``A256CTR`` (sealed envelopes, layer keys).

- ``A256GCM``: AES-256-GCM, the IV is the 12-byte nonce, the data is ciphertext followed by the
  16-byte tag, no additional data.
- ``A256CTR``: AES-256-CTR with a 16-byte IV as the initial 128-bit big-endian counter (no
  integrity of its own: whoever chose it relies on something else to check the plaintext).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from coco.guest.cdh.errors import CdhError

WRAP_TYPES = ("A256GCM", "A256CTR")
KEY_SIZE = 32
_IV_SIZE = {"A256GCM": 12, "A256CTR": 16}


def _check(key: bytes, iv: bytes, wrap_type: str, where: str, err: type[CdhError]) -> None:
    if wrap_type not in _IV_SIZE:
        raise err(
            f"{where}: wrap_type {wrap_type!r} is not supported (expected A256GCM or A256CTR)"
        )
    if len(key) != KEY_SIZE:
        raise err(
            f"{where}: expected a {KEY_SIZE}-byte key for {wrap_type}, found {len(key)} bytes"
        )
    if len(iv) != _IV_SIZE[wrap_type]:
        raise err(
            f"{where}: expected a {_IV_SIZE[wrap_type]}-byte iv for {wrap_type}, found {len(iv)} bytes"
        )


def decrypt(
    key: bytes, data: bytes, iv: bytes, wrap_type: str, *, where: str, err: type[CdhError]
) -> bytes:
    """Open ``data``; raise ``err`` naming ``where`` when the key is wrong (GCM) or the shape is."""
    _check(key, iv, wrap_type, where, err)
    if wrap_type == "A256GCM":
        try:
            return AESGCM(key).decrypt(iv, data, None)
        except InvalidTag:
            raise err(f"{where}: A256GCM decryption failed: wrong key or tampered data") from None
    d = Cipher(algorithms.AES(key), modes.CTR(iv)).decryptor()
    return d.update(data) + d.finalize()


def encrypt(
    key: bytes, data: bytes, wrap_type: str = "A256GCM", iv: bytes | None = None
) -> tuple[bytes, bytes]:
    """(ciphertext, iv); a fresh random iv unless one is given."""
    if iv is None:
        iv = os.urandom(_IV_SIZE.get(wrap_type, 12))
    _check(key, iv, wrap_type, "encrypt", CdhError)
    if wrap_type == "A256GCM":
        return AESGCM(key).encrypt(iv, data, None), iv
    e = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return e.update(data) + e.finalize(), iv
