"""A bounds-checked reader for the binary structures of TEE evidence (quotes, event logs).

Every read names what it reads, so a short or cut input fails with where, what and how many bytes
were expected versus left, never with an IndexError or struct.error.
"""

from __future__ import annotations

import struct

from coco.errors import AttestationError


class ByteReader:
    """Reads ``data`` front to back; ``byteorder`` is ``"<"`` (little) or ``">"`` (big endian)."""

    def __init__(self, data: bytes, where: str, byteorder: str = "<") -> None:
        self.data, self.pos, self.where, self._order = data, 0, where, byteorder

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise AttestationError(
                f"{self.where}: truncated at {what} (offset {self.pos}): expected {n} bytes, "
                f"got {len(self.data) - self.pos}"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def _int(self, fmt: str, size: int, what: str) -> int:
        return int(struct.unpack(self._order + fmt, self.take(size, what))[0])

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return self._int("H", 2, what)

    def u32(self, what: str) -> int:
        return self._int("I", 4, what)

    def u64(self, what: str) -> int:
        return self._int("Q", 8, what)

    def done(self) -> None:
        """Refuse trailing bytes after the structure."""
        if self.pos != len(self.data):
            raise AttestationError(
                f"{self.where}: {len(self.data) - self.pos} unexpected trailing bytes"
            )
