"""coco.files: mark_hierarchy_top sets ext4's top-of-hierarchy flag, as ``chattr +T`` and
``lsattr`` know it, and leaves filesystems without inode flags alone."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from coco.files import mark_hierarchy_top


def _attrs(path: Path) -> str:
    out = subprocess.run(["lsattr", "-d", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"lsattr cannot read inode flags here: {out.stderr.strip()}")
    return out.stdout.split()[0]


@pytest.fixture
def on_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory on the root filesystem (ext4 here), not on a tmpfs /tmp."""
    d = Path("/var/tmp") / f"coco-files-{tmp_path_factory.getbasetemp().name}"
    d.mkdir(parents=True, exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_flag_is_set_as_chattr_sets_it(on_disk: Path) -> None:
    if shutil.which("lsattr") is None:
        pytest.skip("lsattr (e2fsprogs) is not installed")
    d = on_disk / "layers"
    d.mkdir()
    before = _attrs(d)
    assert "T" not in before
    mark_hierarchy_top(d)
    after = _attrs(d)
    assert "T" in after
    # the other flags (extents, say) are kept
    assert set(before.replace("-", "")) <= set(after.replace("-", ""))
    mark_hierarchy_top(d)  # idempotent
    assert _attrs(d) == after


def test_no_inode_flags_or_no_directory_is_left_alone(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if shm.is_dir():  # tmpfs: FS_IOC_GETFLAGS is refused; nothing happens, nothing raised
        d = Path(tempfile.mkdtemp(dir=shm))
        try:
            mark_hierarchy_top(d)
            assert d.is_dir()
        finally:
            shutil.rmtree(d)
    mark_hierarchy_top(tmp_path / "missing")  # best effort: no error, nothing made
    assert not (tmp_path / "missing").exists()
    f = tmp_path / "file"
    f.write_bytes(b"x")
    mark_hierarchy_top(f)  # not a directory: left as it was
    assert f.read_bytes() == b"x"
