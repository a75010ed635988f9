"""The ``AES_256_CTR_HMAC_SHA256`` layer cipher of containers/ocicrypt, as a two-stage stream.

Encrypt-then-MAC: the layer is encrypted with AES-256-CTR (IV = the 16-byte nonce, the whole
128-bit block counter incremented big-endian) and HMAC-SHA256, keyed with the *same* 32-byte
symmetric key, is computed over the ciphertext. Decryption recomputes the HMAC over the
ciphertext as it is read and compares it with the published one at the end of the stream, in
constant time. The last plaintext chunk is held back until that check passed, so a consumer never
sees the end of a layer whose HMAC is wrong.

Speed: AES and HMAC (OpenSSL) release the GIL. The cipher runs in a worker thread together with
whatever produces the source chunks (reading, the caller's digest check); the HMAC runs in the
consuming thread together with whatever consumes the output (hashing, writing). A small bounded
queue between them (:func:`coco.oci.stream.prefetch`) keeps memory at a few chunks whatever the
layer size.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from coco.errors import DecryptionError, OcicryptError
from coco.oci.stream import prefetch

CIPHER_NAME = "AES_256_CTR_HMAC_SHA256"
KEY_SIZE = 32
NONCE_SIZE = 16
HMAC_SIZE = 32
_QUEUE_DEPTH = 6


def new_key() -> bytes:
    """A fresh random 32-byte layer key."""
    return secrets.token_bytes(KEY_SIZE)


def new_nonce() -> bytes:
    """A fresh random 16-byte CTR nonce."""
    return secrets.token_bytes(NONCE_SIZE)


def _check_sizes(key: bytes, nonce: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise OcicryptError(f"{CIPHER_NAME}: key must be {KEY_SIZE} bytes, found {len(key)}")
    if len(nonce) != NONCE_SIZE:
        raise OcicryptError(f"{CIPHER_NAME}: nonce must be {NONCE_SIZE} bytes, found {len(nonce)}")


_malloc_tuned = False


def tune_malloc() -> None:
    """Keep glibc from mapping and unmapping every 1 MiB chunk (it halves AES throughput).

    Raises the mmap threshold so large chunk buffers come from the heap and are reused. Harmless
    elsewhere: a no-op when glibc's ``mallopt`` is not available.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 16 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _pipeline(
    source: Iterable[bytes],
    first: Callable[[bytes], Any],
    second: Callable[[Any], bytes],
    finish: Callable[[], None],
    name: str,
) -> Iterator[bytes]:
    """Run ``first`` over ``source`` in a worker thread (the reader queue of
    :func:`coco.oci.stream.prefetch`) and ``second`` in the consumer's thread.

    ``finish`` runs after the last item went through ``second`` and before the last output chunk is
    yielded (the place for an end-of-stream check). Errors of either stage propagate to the consumer;
    closing the consumer stops the worker.
    """

    def work() -> Iterator[Any]:
        try:
            for chunk in source:
                if chunk:
                    yield first(chunk)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    items = prefetch(work(), depth=_QUEUE_DEPTH, name=name)
    pending: bytes | None = None
    try:
        for item in items:
            out = second(item)
            if pending is not None:
                yield pending
            pending = out
        finish()
        if pending is not None:
            yield pending
    finally:
        items.close()  # type: ignore[attr-defined]


class EncryptingStream:
    """Iterate to get the ciphertext of ``chunks``; afterwards :attr:`hmac` holds the MAC."""

    def __init__(self, chunks: Iterable[bytes], key: bytes, nonce: bytes) -> None:
        _check_sizes(key, nonce)
        tune_malloc()
        self.key = key
        self.nonce = nonce
        self._chunks = chunks
        self._mac = hmac.new(key, digestmod="sha256")
        self._hmac: bytes | None = None
        self.size = 0

    @property
    def hmac(self) -> bytes:
        if self._hmac is None:
            raise OcicryptError("layer HMAC asked for before the whole layer was encrypted")
        return self._hmac

    def __iter__(self) -> Iterator[bytes]:
        enc = Cipher(algorithms.AES(self.key), modes.CTR(self.nonce)).encryptor()
        mac = self._mac

        def second(ct: bytes) -> bytes:
            mac.update(ct)
            self.size += len(ct)
            return ct

        def finish() -> None:
            enc.finalize()
            self._hmac = mac.digest()

        return _pipeline(self._chunks, enc.update, second, finish, "coco-encrypt")


def encrypt(chunks: Iterable[bytes], key: bytes, nonce: bytes) -> EncryptingStream:
    """Encrypt a layer stream; read :attr:`EncryptingStream.hmac` once it is exhausted."""
    return EncryptingStream(chunks, key, nonce)


def decrypt(
    chunks: Iterable[bytes], key: bytes, nonce: bytes, expected_hmac: bytes, what: str
) -> Iterator[bytes]:
    """Decrypt a layer stream, checking its HMAC at the end (``what`` names it in errors).

    Raises :class:`~coco.errors.DecryptionError` when the HMAC differs: a wrong key, a tampered or
    a truncated layer. The final plaintext chunk is only released after the check passed.
    """
    _check_sizes(key, nonce)
    if len(expected_hmac) != HMAC_SIZE:
        raise DecryptionError(f"{what}: HMAC must be {HMAC_SIZE} bytes, found {len(expected_hmac)}")
    tune_malloc()
    dec = Cipher(algorithms.AES(key), modes.CTR(nonce)).decryptor()
    mac = hmac.new(key, digestmod="sha256")
    seen = [0]

    def first(ct: bytes) -> bytes:
        # Both stages run in the worker: the consumer is usually busy already (hashing the
        # plaintext and inflating it in a pull, hashing and writing it in a copy).
        mac.update(ct)
        seen[0] += len(ct)
        return dec.update(ct)

    def second(pt: bytes) -> bytes:
        return pt

    def finish() -> None:
        dec.finalize()
        if not hmac.compare_digest(mac.digest(), expected_hmac):
            raise DecryptionError(
                f"{what}: HMAC mismatch after {seen[0]} bytes: the layer was tampered with, "
                "truncated, or decrypted with the wrong key"
            )

    return _pipeline(chunks, first, second, finish, "coco-decrypt")
