"""Fixtures for the image tests: a layer store in a temp dir, and a root/peer check."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from coco.image import LayerStore
from coco.image.bundle import _is_mount, _umount


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LayerStore]:
    if os.geteuid() != 0:
        pytest.skip("the layer store records whiteouts as device nodes: needs root")
    s = LayerStore(tmp_path / "store")
    yield s
    for b in list(s.bundles()):
        if _is_mount(Path(b) / "rootfs"):
            _umount(Path(b) / "rootfs")


@pytest.fixture
def umoci() -> str:
    path = shutil.which("umoci")
    if path is None:
        pytest.skip("umoci is not installed (apt-get install umoci)")
    return path
