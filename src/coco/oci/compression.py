"""Layer decompression: the one place a layer's bytes are inflated, by media type or by magic.

:func:`decompressed` gives a readable file of the tar inside a ``gzip``, ``zstd`` or
uncompressed layer, for ``coco image pull`` (streamed from the registry), genpolicy (the same)
and tardev (a file). A stream cut short is an error, whichever the compression: gzip's reader
raises :class:`EOFError`, and the zstd reader here raises :class:`zstandard.ZstdError` when the
last frame is unfinished (the library's own stream reader would end quietly). Memory stays
bounded by the reads, whatever a layer inflates to (a few KiB of zstd can describe a GiB).
"""

from __future__ import annotations

import io

TYPE_CHECKING = False  # typing stays unloaded in short processes
if TYPE_CHECKING:
    from typing import Any, BinaryIO

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BLOCK = 256 << 10  # the readers' block: igzip_threaded buffers 8 of them
_ZSTD_INPUT = 1 << 17  # compressed bytes the zstd reader asks its source for at a time


def sniff(head: bytes) -> str:
    """``gzip``, ``zstd`` or ``none`` from a layer file's first bytes."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


def decompressed(raw: BinaryIO, compression: str) -> BinaryIO:
    """A readable file of what ``raw`` holds under ``compression`` (``gzip``, ``zstd``, ``none``:
    :func:`coco.oci.mediatypes.compression` of a media type, or :func:`sniff` of a file).

    Raises :class:`ValueError` for another compression name.
    """
    if compression == "gzip":
        try:
            from isal import igzip_threaded
        except ImportError:  # pragma: no cover - isal is a dependency; zlib works, slower
            import gzip

            return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
        return igzip_threaded.open(raw, "rb", threads=1, block_size=BLOCK)  # type: ignore[return-value]
    if compression == "zstd":
        return io.BufferedReader(_ZstdReader(raw), BLOCK)  # type: ignore[return-value]
    if compression == "none":
        return raw
    raise ValueError(f"unsupported layer compression {compression!r}")


class _ZstdFrames:
    """The compressed bytes on their way to the decompressor, with the zstd frame and block
    headers followed (RFC 8878 sections 3.1.1 and 3.1.2): only the headers are parsed, every block
    is skipped by its size. At the end of the stream :meth:`check_end` says whether the last frame
    was whole, which the library's stream reader does not."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._skip = 0  # bytes of block content (or skippable frame) still to pass
        self._head = b""  # header bytes collected so far
        self._need = 4  # header bytes wanted for the current state
        self._state = "magic"  # magic | fhd | header | block | skippable
        self._checksum = False
        self.frames = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data:
            self._follow(data)
        return data

    def _follow(self, data: bytes) -> None:
        i, end = 0, len(data)
        while i < end:
            if self._skip:
                step = min(self._skip, end - i)
                self._skip -= step
                i += step
                continue
            take = self._need - len(self._head)
            self._head += data[i : i + take]
            i += take
            if len(self._head) == self._need:
                head, self._head = self._head, b""
                self._header(head)

    def _header(self, head: bytes) -> None:
        import zstandard

        state = self._state
        if state == "magic":
            if head == ZSTD_MAGIC:
                self._state, self._need = "fhd", 1
                self.frames += 1
            elif head[1:] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50:
                self._state, self._need = "skippable", 4
            else:
                raise zstandard.ZstdError(f"expected a zstd frame, found bytes {head.hex()}")
        elif state == "skippable":
            self._skip = int.from_bytes(head, "little")
            self._state, self._need = "magic", 4
        elif state == "fhd":
            fhd = head[0]
            single = bool(fhd & 0x20)
            self._checksum = bool(fhd & 0x04)
            fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            rest = (0 if single else 1) + (0, 1, 2, 4)[fhd & 0x03] + fcs
            self._state = "header" if rest else "block"
            self._need = rest or 3
        elif state == "header":
            self._state, self._need = "block", 3
        else:  # block header: last flag, type, size
            word = int.from_bytes(head, "little")
            kind, size = (word >> 1) & 0x03, word >> 3
            if kind == 3:
                raise zstandard.ZstdError("expected a zstd block, found the reserved block type")
            self._skip = 1 if kind == 1 else size  # an RLE block holds one byte
            if word & 1:  # the frame's last block
                self._skip += 4 if self._checksum else 0
                self._state, self._need = "magic", 4

    def check_end(self) -> None:
        """Raise :class:`zstandard.ZstdError` unless the stream ended between frames."""
        if self._skip or self._head or self._state != "magic":
            import zstandard

            raise zstandard.ZstdError("the last zstd frame is truncated")


class _ZstdReader(io.RawIOBase):
    """zstandard's stream reader over :class:`_ZstdFrames`: streamed (each read inflates at most
    what it asked for, so a small frame of a huge size is never held whole), every frame read, and
    an unfinished last frame an error at the end."""

    def __init__(self, raw: BinaryIO) -> None:
        import zstandard

        self._frames = _ZstdFrames(raw)
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            self._frames, read_size=_ZSTD_INPUT, read_across_frames=True, closefd=False
        )

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._reader.readinto(b)
        if not n:
            self._frames.check_end()
        return n  # type: ignore[no-any-return]

    def close(self) -> None:
        self._reader.close()
        super().close()
