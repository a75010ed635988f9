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
