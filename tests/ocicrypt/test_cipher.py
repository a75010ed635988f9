"""The layer cipher against openssl (an independent AES-256-CTR and HMAC-SHA256), and its errors."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading

import pytest

from coco.errors import DecryptionError, OcicryptError
from coco.ocicrypt import cipher

from .conftest import openssl


def _chunks(data: bytes, size: int = 1 << 20) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, (1 << 20) + 5, 3 * (1 << 20)])
def test_encrypt_matches_openssl(length: int) -> None:
    data = os.urandom(length)
    key, nonce = cipher.new_key(), cipher.new_nonce()
    stream = cipher.encrypt(_chunks(data, 700_000), key, nonce)
    ct = b"".join(stream)
    want = openssl("enc", "-aes-256-ctr", "-K", key.hex(), "-iv", nonce.hex(), input=data)
    assert ct == want
    mac = openssl(
        "mac", "-digest", "SHA256", "-macopt", f"hexkey:{key.hex()}", "-binary", "HMAC",
        input=ct,
    )  # fmt: skip
    assert stream.hmac == mac
    assert stream.size == length


def test_decrypt_openssl_ciphertext() -> None:
    data = os.urandom(2_500_000)
    key, nonce = cipher.new_key(), cipher.new_nonce()
    ct = openssl("enc", "-aes-256-ctr", "-K", key.hex(), "-iv", nonce.hex(), input=data)
    mac = hmac.new(key, ct, hashlib.sha256).digest()
    out = b"".join(cipher.decrypt(_chunks(ct, 333_333), key, nonce, mac, "L"))
    assert out == data


def test_counter_wraps_whole_block() -> None:
    # The counter is the whole 128-bit block (Go cipher.NewCTR): an IV of all 0xff wraps to zero.
    key = bytes(range(32))
    nonce = b"\xff" * 16
    data = bytes(64)
    ct = b"".join(cipher.encrypt([data], key, nonce))
    assert ct == openssl("enc", "-aes-256-ctr", "-K", key.hex(), "-iv", nonce.hex(), input=data)


def _encrypted(n: int = 3_000_000) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    data = os.urandom(n)
    key, nonce = cipher.new_key(), cipher.new_nonce()
    s = cipher.encrypt(_chunks(data), key, nonce)
    ct = b"".join(s)
    return data, key, nonce, ct, s.hmac


def test_tampered_byte_is_refused_and_tail_withheld() -> None:
    data, key, nonce, ct, mac = _encrypted()
    bad = bytearray(ct)
    bad[1234] ^= 1
    got: list[bytes] = []
    with pytest.raises(DecryptionError, match=r"^img layer 1: HMAC mismatch after 3000000 bytes"):
        for c in cipher.decrypt(_chunks(bytes(bad)), key, nonce, mac, "img layer 1"):
            got.append(c)
    # Everything but the last chunk came out; the last one was held back until the check.
    assert sum(map(len, got)) == len(data) - len(_chunks(data)[-1])


def test_truncated_stream_is_refused() -> None:
    _, key, nonce, ct, mac = _encrypted()
    with pytest.raises(DecryptionError, match="HMAC mismatch after 2999990 bytes"):
        b"".join(cipher.decrypt(_chunks(ct[:-10]), key, nonce, mac, "L"))


def test_wrong_key_is_refused() -> None:
    _, _, nonce, ct, mac = _encrypted(10_000)
    with pytest.raises(DecryptionError, match="HMAC mismatch"):
        b"".join(cipher.decrypt([ct], cipher.new_key(), nonce, mac, "L"))


def test_source_error_propagates() -> None:
    def src():
        yield b"a" * 100
        raise OcicryptError("source broke")

    key, nonce = cipher.new_key(), cipher.new_nonce()
    with pytest.raises(OcicryptError, match="source broke"):
        b"".join(cipher.decrypt(src(), key, nonce, b"0" * 32, "L"))


def test_closing_early_stops_the_worker() -> None:
    key, nonce = cipher.new_key(), cipher.new_nonce()
    closed = threading.Event()

    def src():
        try:
            while True:
                yield b"z" * (1 << 20)
        finally:
            closed.set()

    it = iter(cipher.encrypt(src(), key, nonce))
    next(it)
    next(it)
    it.close()  # type: ignore[attr-defined]
    assert closed.wait(5)
    assert not [t for t in threading.enumerate() if t.name == "coco-encrypt"]


def test_bad_sizes() -> None:
    with pytest.raises(OcicryptError, match="key must be 32 bytes, found 16"):
        cipher.encrypt([], b"k" * 16, b"n" * 16)
    with pytest.raises(OcicryptError, match="nonce must be 16 bytes, found 12"):
        cipher.decrypt([], b"k" * 32, b"n" * 12, b"m" * 32, "L")
    with pytest.raises(DecryptionError, match="HMAC must be 32 bytes"):
        cipher.decrypt([], b"k" * 32, b"n" * 16, b"m", "L")
    with pytest.raises(OcicryptError, match="before the whole layer"):
        _ = cipher.encrypt([b"x"], b"k" * 32, b"n" * 16).hmac
