"""The one layer decompressor: every frame read, a stream cut short refused, whichever codec."""

from __future__ import annotations

import gzip
import io
import os
import threading

import pytest
import zstandard

from coco.oci.compression import decompressed, sniff
from coco.oci.stream import Cancelled, ChunkReader, prefetch

DATA = os.urandom(300_000) + b"\0" * 2_000_000


def _read(blob: bytes, kind: str, chunk: int = 65536) -> bytes:
    chunks = iter([blob[i : i + chunk] for i in range(0, len(blob), chunk)])
    return decompressed(ChunkReader(prefetch(chunks)), kind).read()


def test_codecs_and_magic() -> None:
    z = zstandard.ZstdCompressor()
    cases = {
        "gzip": gzip.compress(DATA),
        "zstd": z.compress(DATA[:1000]) + z.compress(DATA[1000:]),  # two frames
        "none": DATA,
    }
    for kind, blob in cases.items():
        assert sniff(blob[:4]) == kind
        assert _read(blob, kind) == DATA, kind


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_truncated_stream_is_an_error(kind: str) -> None:
    whole = gzip.compress(DATA) if kind == "gzip" else zstandard.ZstdCompressor().compress(DATA)
    # zstandard's own stream reader returns the bytes it has and ends quietly here
    with pytest.raises((EOFError, zstandard.ZstdError)):
        _read(whole[: len(whole) - 40], kind)


def test_unknown_compression_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported layer compression 'lz4'"):
        decompressed(io.BytesIO(b""), "lz4")


def test_prefetch_hands_over_the_source_error_and_stops_on_cancel() -> None:
    def failing():
        yield b"a"
        raise OSError("disk on fire")

    it = prefetch(failing())
    assert next(it) == b"a"
    with pytest.raises(OSError, match="disk on fire"):
        next(it)
    cancel = threading.Event()
    it = prefetch(iter([b"x"] * 100), cancel)
    next(it)
    cancel.set()
    with pytest.raises(Cancelled):
        list(it)


def _skippable(payload: bytes) -> bytes:
    return b"\x5a\x2a\x4d\x18" + len(payload).to_bytes(4, "little") + payload


def test_zstd_frames_of_every_shape_and_every_cut() -> None:
    """Frames with and without content size and checksum, a skippable frame, an empty frame:
    all read; a stream cut anywhere but between frames is an error, never a quiet short read."""
    plain = zstandard.ZstdCompressor(write_content_size=False, write_checksum=True)
    sized = zstandard.ZstdCompressor(level=3)
    pieces = [
        (sized.compress(b"a" * 70_000 + os.urandom(300)), None),
        (_skippable(b"ignored"), b""),
        (plain.compress(bytes(range(256)) * 900), None),  # several blocks
        (sized.compress(b""), b""),
    ]
    blob, edges, expected = b"", {0: b""}, b""
    for frame, content in pieces:
        blob += frame
        inflated = zstandard.ZstdDecompressor().decompressobj().decompress(frame)
        expected += inflated if content is None else content
        edges[len(blob)] = expected
    assert _read(blob, "zstd") == expected
    for cut in range(len(blob)):
        stream = decompressed(io.BytesIO(blob[:cut]), "zstd")
        if cut in edges:
            assert stream.read() == edges[cut]
        else:
            with pytest.raises(zstandard.ZstdError):
                stream.read()
    with pytest.raises(zstandard.ZstdError, match="expected a zstd frame"):
        _read(blob + b"\0" * 8, "zstd")


def test_zstd_memory_stays_bounded_by_the_reads() -> None:
    """8 KiB of zstd that inflate to 256 MiB: read 1 MiB at a time, nothing near that size is
    ever allocated (a decompressobj fed 16 KiB at once made one 256 MiB bytes)."""
    import tracemalloc

    bomb = zstandard.ZstdCompressor(level=1).compress(b"\0" * (256 << 20))
    assert len(bomb) < 16 << 10
    tracemalloc.start()
    try:
        stream = decompressed(io.BytesIO(bomb), "zstd")
        total = 0
        while data := stream.read(1 << 20):
            total += len(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 256 << 20
    assert peak < 8 << 20, f"peak Python allocation {peak >> 20} MiB"
