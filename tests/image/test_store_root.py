"""Which directories may become a layer store: a missing or empty one, or a store already; never
``/``, ``/etc``, a file or any other non-empty directory (a mistyped ``--store``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coco.errors import LayerStoreError
from coco.image.store import LayerStore
from tests.cli.run import invoke
from tests.imagekit import tar_layer, write_image


def _listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def test_missing_store_is_created_with_its_parents(tmp_path: Path) -> None:
    # the default store /var/lib/coco/store failed as root with ENOENT when /var/lib/coco was absent
    root = tmp_path / "var" / "lib" / "coco" / "store"
    s = LayerStore(root)
    assert s.root == root and (root / "layers").is_dir() and (root / "tmp").is_dir()
    assert LayerStore(root).layers() == []  # an existing store opens again


def test_empty_directory_becomes_a_store(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    LayerStore(tmp_path / "empty")
    assert "layers" in _listing(tmp_path / "empty")


@pytest.mark.parametrize("system_dir", ["/", "/etc"])
def test_system_directories_are_refused(system_dir: str) -> None:
    before = _listing(Path(system_dir))
    with pytest.raises(LayerStoreError) as ei:
        LayerStore(system_dir)
    msg = str(ei.value)
    assert msg.startswith(f"layer store {system_dir}:") and "expected a layer store" in msg
    assert _listing(Path(system_dir)) == before


def test_non_empty_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(LayerStoreError, match=r"holds other things \(such as 'holiday.jpg'\)"):
        LayerStore(d)
    assert _listing(d) == ["holiday.jpg"]


def test_file_or_file_parent_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(LayerStoreError, match="expected a directory, found something else"):
        LayerStore(f)
    with pytest.raises(LayerStoreError, match="cannot create the directory: Not a directory"):
        LayerStore(f / "store")
    assert f.read_text() == "x"


def test_cli_prune_and_pull_refuse_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    img = write_image(tmp_path / "lay", [tar_layer({"etc/hello": b"hi\n"})], tag="t")
    res = invoke(["image", "prune", "--store", "/etc", "-q"])
    assert res.exit_code == 1 and "\n" not in res.stderr.strip()
    assert res.stderr.startswith("coco: error: layer store /etc: expected a layer store")
    assert not os.path.exists("/etc/layers")
    not_store = tmp_path / "work"
    not_store.mkdir()
    (not_store / "notes.txt").write_text("keep me")
    bundle = tmp_path / "bundle"
    res = invoke(["image", "pull", "-q", "--store", str(not_store), img.ref, str(bundle)])
    assert res.exit_code == 1, res.output
    assert res.stderr.startswith(f"coco: error: layer store {not_store}: expected a layer store")
    assert _listing(not_store) == ["notes.txt"] and not bundle.exists()
