"""LocalFs storage: resources are files in upstream's layout; other namespaces beside them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coco.trustee.storage import NS_KBS, NS_REPOSITORY, StorageError, open_store


def _listing(path: Path) -> list[str]:  # the SQLite file's -wal/-shm companions aside
    return sorted(n for n in os.listdir(path) if not n.endswith(("-wal", "-shm")))


def test_resources_are_files(tmp_path: Path) -> None:
    (tmp_path / "repo" / "type").mkdir(parents=True)
    (tmp_path / "repo" / "type" / "tag").write_bytes(b"provisioned")
    (tmp_path / "repo" / "type" / ".hidden").write_bytes(b"x")
    (tmp_path / "deep" / "a" / "b").mkdir(parents=True)
    (tmp_path / "deep" / "a" / "b" / "c").write_bytes(b"too deep")
    s = open_store(f"localfs://{tmp_path}")
    assert s.get(NS_REPOSITORY, "repo/type/tag") == b"provisioned"
    assert s.get(NS_REPOSITORY, "repo/type/none") is None
    assert s.put(NS_REPOSITORY, "r/t/g", b"new") is True
    assert (tmp_path / "r" / "t" / "g").read_bytes() == b"new"
    assert s.put(NS_REPOSITORY, "r/t/g", b"again", overwrite=False) is False
    assert s.keys(NS_REPOSITORY) == ["r/t/g", "repo/type/tag"]
    assert s.delete(NS_REPOSITORY, "r/t/g") and not s.delete(NS_REPOSITORY, "r/t/g")
    # The other namespaces live in one hidden SQLite file, never in the resource tree.
    s.put(NS_KBS, "resource-policy.rego", b"package policy")
    assert s.get(NS_KBS, "resource-policy.rego") == b"package policy"
    assert _listing(tmp_path) == [".coco-kbs.sqlite", "deep", "r", "repo"]
    assert s.keys(NS_KBS) == ["resource-policy.rego"]
    s.ready()
    s.close()


def test_keys_that_would_leave_the_tree_are_refused(tmp_path: Path) -> None:
    s = open_store(f"localfs://{tmp_path}")
    for key in ("a/../b", "a/./b", "a//b", "/etc/passwd", ".a/b/c"):
        with pytest.raises(StorageError):
            s.put(NS_REPOSITORY, key, b"x")
    assert _listing(tmp_path) == [".coco-kbs.sqlite"]


def test_missing_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="expected a directory, found none"):
        open_store(f"localfs://{tmp_path}/absent")
    with pytest.raises(StorageError, match="expected sqlite:///PATH, localfs:///DIR"):
        open_store("redis://x")
