"""Fixtures for the host side: the pod VM image, built once per session (the cache makes a re-run
instant), in the cache ``coco podvm build`` uses by default (``$COCO_PODVM_CACHE`` overrides)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

TOOLS = ("qemu-system-x86_64", "mmdebstrap", "swtpm", "mke2fs", "depmod")


def _missing() -> list[str]:
    return [
        t
        for t in TOOLS
        if shutil.which(t) is None and shutil.which(t, path="/usr/sbin:/sbin") is None
    ]


@pytest.fixture(scope="session")
def podvm_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of this source tree (what the wheel is built from), so that edits made while
    the session runs do not change the image's key; the key hashes content, not location, so the
    snapshot's image is the tree's own."""
    from coco.host.podvm import rootfs

    src = rootfs.find_source()
    dest = tmp_path_factory.mktemp("podvm-source")
    for path in rootfs.source_files(src):
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest


@pytest.fixture(scope="session")
def podvm_image(podvm_source: Path):
    """The pod VM image of this source tree (``coco.host.podvm.build.Image``)."""
    missing = _missing()
    if missing:
        pytest.skip(f"pod VM tools missing: {', '.join(missing)} (scripts/install-system-deps)")
    if os.geteuid() != 0:
        pytest.skip("building the pod VM image needs root (mmdebstrap, file owners)")
    from coco.host.podvm.build import build

    return build(source=podvm_source)


# a real containerd with its own config, root, state and sockets, and test images for it
from tests.host.containerd_fixture import containerd, test_images  # noqa: E402, F401
