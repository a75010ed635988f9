"""Layer decompression: the one place a layer's bytes are inflated, by media type or by magic.

:func:`decompressed` gives a readable file of the tar inside a ``gzip``, ``zstd`` or
uncompressed layer, for ``coco image pull`` (streamed from the registry), genpolicy (the same)
and tardev (a file). A stream cut short is an error, whichever the compression: gzip's reader
raises :class:`EOFError`, and the zstd reader here raises :class:`zstandard.ZstdError` when the
last frame is unfinished (the library's own stream reader would end quietly).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import BinaryIO

from coco.oci.stream import ChunkReader

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BLOCK = 256 << 10  # the readers' block: igzip_threaded buffers 8 of them
_ZSTD_INPUT = 1 << 14  # compressed bytes fed per call: bounds what one call may inflate to


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
        return io.BufferedReader(ChunkReader(_zstd_frames(raw)), BLOCK)  # type: ignore[return-value]
    if compression == "none":
        return raw
    raise ValueError(f"unsupported layer compression {compression!r}")


def _zstd_frames(raw: BinaryIO) -> Iterator[bytes]:
    """Every zstd frame of ``raw`` inflated, one after the other; an unfinished last frame is an
    error."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    obj = dctx.decompressobj()
    fed = False  # the current frame has had input
    while chunk := raw.read(_ZSTD_INPUT):
        while chunk:
            fed = True
            out = obj.decompress(chunk)
            if obj.eof:  # a frame ended: what follows is the next frame
                chunk = obj.unused_data
                obj = dctx.decompressobj()
                fed = False
            else:
                chunk = b""
            if out:
                yield out
    if fed:
        raise zstandard.ZstdError("the last zstd frame is truncated")
