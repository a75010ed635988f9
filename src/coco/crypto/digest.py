"""Content digests (``algorithm:hex``) as the OCI image spec defines them, and streaming hashers.

A :class:`Digest` is parsed strictly: only ``sha256`` and ``sha512`` with lowercase hex of the right
length are accepted. :class:`HashingReader` wraps a chunk iterator, hashes and counts the bytes as
they pass and raises :class:`~coco.errors.DigestMismatchError` at the end when they differ from
what was promised.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

from coco.errors import DigestMismatchError, ManifestError
from coco.record import record

_HEX_LEN = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")


def fit(data: bytes, size: int) -> bytes:
    """Truncate ``data`` to ``size`` bytes or zero-pad it on the right (upstream's ``regularize_data``).

    How a digest or report data is fitted to a fixed evidence field (SNP REPORT_DATA and HOST_DATA,
    TDX MRCONFIGID, a TPM nonce).
    """
    return data[:size].ljust(size, b"\0")


def init_data_pcr(init_data: bytes) -> bytes:
    """A SHA-256 PCR after one extension from zero with ``init_data`` fitted to 32 bytes.

    What PCR 8 of a vTPM holds once the guest bound its initdata digest, and what the TPM verifier
    and the peer-pod VM's userdata check compare with.
    """
    return hashlib.sha256(bytes(32) + fit(init_data, 32)).digest()


@record
class Digest:
    """A parsed ``algorithm:hex`` digest."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: object, where: str = "digest") -> Digest:
        """Parse ``text``; raise :class:`ManifestError` naming ``where`` when it is not valid."""
        if not isinstance(text, str):
            raise ManifestError(f"{where}: expected a digest string, found {type(text).__name__}")
        m = _DIGEST_RE.match(text)
        if not m:
            raise ManifestError(f"{where}: expected 'sha256:<64 hex>', found {text[:80]!r}")
        alg, hexpart = m.group(1), m.group(2)
        want = _HEX_LEN.get(alg)
        if want is None:
            raise ManifestError(
                f"{where}: unsupported digest algorithm {alg!r} (expected sha256 or sha512)"
            )
        if len(hexpart) != want or not re.fullmatch(r"[0-9a-f]+", hexpart):
            raise ManifestError(
                f"{where}: expected {want} lowercase hex digits after '{alg}:', found {hexpart[:80]!r}"
            )
        return cls(alg, hexpart)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def short(self) -> str:
        return f"{self.algorithm}:{self.hex[:12]}"


def sha256_digest(data: bytes) -> str:
    """The ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def short(digest: str) -> str:
    """``sha256:0123456789ab`` form for messages."""
    alg, _, hexpart = digest.partition(":")
    return f"{alg}:{hexpart[:12]}" if hexpart else digest


class HashingReader:
    """Iterate over ``chunks``, hashing and counting them; check digest and size at the end.

    ``what`` names the content in error messages. When ``expected_size`` is given, receiving more
    bytes raises at once and fewer raises at the end (a truncated stream). When ``expected_digest``
    is given, a different digest raises at the end. After exhaustion :attr:`digest` and
    :attr:`size` hold what was seen.
    """

    def __init__(
        self,
        chunks: Iterable[bytes],
        *,
        what: str,
        expected_digest: str | None = None,
        expected_size: int | None = None,
        algorithm: str | None = None,
        trusted: bool = False,
    ) -> None:
        """``trusted``: the chunks were already checked against ``expected_digest`` upstream
        (by another HashingReader), so only count them instead of hashing twice."""
        if trusted and expected_digest is None:
            raise ValueError("trusted=True needs expected_digest")
        self._trusted = trusted
        self._chunks = chunks
        self._what = what
        self._expected_digest = expected_digest
        self._expected_size = expected_size
        alg = algorithm or (
            Digest.parse(expected_digest).algorithm if expected_digest else "sha256"
        )
        self._hasher = hashlib.new(alg)
        self._alg = alg
        self.size = 0
        self.digest: str | None = None

    def __iter__(self) -> Iterator[bytes]:
        h = self._hasher
        limit = self._expected_size
        trusted = self._trusted
        for chunk in self._chunks:
            if not chunk:
                continue
            self.size += len(chunk)
            if limit is not None and self.size > limit:
                raise DigestMismatchError(
                    f"{self._what}: size mismatch: expected {limit} bytes, received more"
                )
            if not trusted:
                h.update(chunk)
            yield chunk
        self.digest = self._expected_digest if trusted else f"{self._alg}:{h.hexdigest()}"
        if limit is not None and self.size != limit:
            raise DigestMismatchError(
                f"{self._what}: truncated: expected {limit} bytes, received {self.size}"
            )
        if self._expected_digest is not None and self.digest != self._expected_digest:
            raise DigestMismatchError(
                f"{self._what}: digest mismatch: expected {self._expected_digest}, got {self.digest}"
            )
