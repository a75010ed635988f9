"""A large blob starts its writeback while it is written (so the final fsync is short) and still
lands whole and verified."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from coco.oci import layout as layout_mod
from coco.oci.layout import OciLayout
from tests.imagekit import tar_layer, write_image


def test_writeback_started_every_16_mib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_image(tmp_path / "lay", [tar_layer({"a": b"x"})], tag="t")
    calls: list[tuple[int, int]] = []
    real = layout_mod._start_writeback

    def spy(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(layout_mod, "_start_writeback", spy)
    chunk = os.urandom(1 << 20)
    data = chunk * 40  # 40 MiB in 1 MiB chunks
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    lay = OciLayout.open(tmp_path / "lay")
    with lay.transaction() as tx:
        got, size = tx.write_blob(iter([chunk] * 40), expected_digest=digest)
    assert (got, size) == (digest, len(data))
    assert calls == [(0, 16 << 20), (16 << 20, 16 << 20)]
    assert lay.read_blob(digest) == data
