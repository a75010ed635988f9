"""The layer store: dedup by diff_id, shared layers, prune, concurrent commits."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest

from coco.errors import BundleError, LayerStoreError
from coco.image import LayerStore, UnpackLimits, create_bundle, remove_bundle, unpack_layer
from coco.image.bundle import _is_mount

from ._util import D, F, diff_id, tar

BASE = tar([D("etc/"), F("etc/os-release", b"ID=test\n")])
APP1 = tar([D("app/"), F("app/one", b"1")])
APP2 = tar([D("app/"), F("app/two", b"2")])


class _Exploding(io.BytesIO):
    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        raise AssertionError("the stream of a stored layer must not be read")


def test_present_layer_not_read_again(store: LayerStore) -> None:
    first = store.add_layer(diff_id(BASE), io.BytesIO(BASE))
    again = store.add_layer(diff_id(BASE), _Exploding())
    assert first == again and store.has(diff_id(BASE))
    assert (first.path / "etc/os-release").read_bytes() == b"ID=test\n"
    assert first.entries == 2


@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "overlay"])
def test_bundles_share_layers_and_prune(store: LayerStore, tmp_path: Path, flatten: bool) -> None:
    for data in (BASE, APP1, APP2):
        store.add_layer(diff_id(data), io.BytesIO(data))
    cfg = {"Cmd": ["/bin/true"]}
    b1 = create_bundle(
        store, [diff_id(BASE), diff_id(APP1)], tmp_path / "b1", image_config=cfg, flatten=flatten
    )
    b2 = create_bundle(
        store, [diff_id(BASE), diff_id(APP2)], tmp_path / "b2", image_config=cfg, flatten=flatten
    )
    assert (b1.rootfs / "app/one").exists() and not (b1.rootfs / "app/two").exists()
    assert (b2.rootfs / "app/two").exists() and (b2.rootfs / "etc/os-release").exists()
    assert _is_mount(b1.rootfs) is (not flatten)
    if not flatten:  # one copy on disk: both mounts show the store's inode
        base_ino = (store.get(diff_id(BASE)).path / "etc/os-release").stat().st_ino
        assert (b1.rootfs / "etc/os-release").stat().st_ino == base_ino
        assert (b2.rootfs / "etc/os-release").stat().st_ino == base_ino
        # writes go to the bundle's upper dir, never into the shared layer
        (b1.rootfs / "etc/os-release").write_bytes(b"changed")
        assert (store.get(diff_id(BASE)).path / "etc/os-release").read_bytes() == b"ID=test\n"
        assert (b2.rootfs / "etc/os-release").read_bytes() == b"ID=test\n"
    assert store.prune() == []
    remove_bundle(store, b1.path)
    assert not b1.path.exists()
    assert store.prune() == [diff_id(APP1)]
    assert sorted(store.layers()) == sorted([diff_id(BASE), diff_id(APP2)])
    assert (b2.rootfs / "app/two").read_bytes() == b"2"
    remove_bundle(store, b2.path)
    assert sorted(store.prune()) == sorted([diff_id(BASE), diff_id(APP2)])
    assert store.layers() == [] and os.listdir(store.root / "layers") == []


def test_prune_forgets_vanished_bundles_and_stale_tmp(store: LayerStore, tmp_path: Path) -> None:
    store.add_layer(diff_id(BASE), io.BytesIO(BASE))
    store.register_bundle(tmp_path / "gone", [diff_id(BASE)])
    (store.root / "tmp" / "layer-stale").mkdir()
    assert store.prune() == [diff_id(BASE)]
    assert store.bundles() == {} and os.listdir(store.root / "tmp") == []


def test_concurrent_adds_of_one_layer(store: LayerStore) -> None:
    big = tar([D("d/")] + [F(f"d/f{i}", bytes([i % 256]) * 2000) for i in range(300)])
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            LayerStore(store.root).add_layer(diff_id(big), io.BytesIO(big))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.layers() == [diff_id(big)]
    assert os.listdir(store.root / "tmp") == []
    files = sorted(os.listdir(store.get(diff_id(big)).path / "d"))
    assert len(files) == 300
    assert (store.get(diff_id(big)).path / "d/f7").read_bytes() == b"\x07" * 2000


def test_commit_keeps_the_first(store: LayerStore) -> None:
    with store.staging() as t1:
        s1 = unpack_layer(io.BytesIO(BASE), t1 / "fs")
    with store.staging() as t2:
        s2 = unpack_layer(io.BytesIO(BASE), t2 / "fs")
    a = store.commit(diff_id(BASE), t1, s1)
    b = store.commit(diff_id(BASE), t2, s2)
    assert a == b and not t2.exists() and not t1.exists()


@pytest.mark.parametrize("bad", ["sha256:abc", "md5:" + "0" * 32, "sha256:" + "G" * 64, ""])
def test_bad_diff_ids(store: LayerStore, bad: str) -> None:
    with pytest.raises(LayerStoreError, match="expected a diff_id"):
        store.add_layer(bad, io.BytesIO(BASE))
    with pytest.raises(LayerStoreError, match="expected a diff_id"):
        store.has(bad)


def test_sha512_diff_id(store: LayerStore) -> None:
    import hashlib

    d = "sha512:" + hashlib.sha512(BASE).hexdigest()
    assert store.add_layer(d, io.BytesIO(BASE)).diff_id == d


def test_limits_validated() -> None:
    with pytest.raises(ValueError, match="max_files"):
        UnpackLimits(max_files=0)


def test_overlay_refused_falls_back_to_flatten(tmp_path: Path) -> None:
    # overlay cannot name a lowerdir containing ':' -> the bundle is flattened instead
    store = LayerStore(tmp_path / "st:ore")
    store.add_layer(diff_id(BASE), io.BytesIO(BASE))
    b = create_bundle(store, [diff_id(BASE)], tmp_path / "b", image_config={"Cmd": ["x"]})
    assert b.mode == "flatten" and not _is_mount(b.rootfs)
    assert (b.rootfs / "etc/os-release").read_bytes() == b"ID=test\n"
    assert not (b.path / "overlay").exists()


@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "overlay"])
def test_failure_mid_assembly_leaves_no_bundle(
    store: LayerStore, tmp_path: Path, flatten: bool
) -> None:
    import shutil

    for data in (BASE, APP1):
        store.add_layer(diff_id(data), io.BytesIO(data))
    # a layer directory that vanished behind the store's back: flattening and mounting fail
    shutil.rmtree(store.get(diff_id(APP1)).path)
    with pytest.raises(BundleError, match=r"bundle .*No such file") as ei:
        create_bundle(
            store,
            [diff_id(BASE), diff_id(APP1)],
            tmp_path / "b",
            image_config={"Cmd": ["x"]},
            flatten=flatten,
        )
    assert "\n" not in str(ei.value)
    assert not (tmp_path / "b").exists() and store.bundles() == {}
    mounts = Path("/proc/self/mounts").read_text()
    assert str(tmp_path) not in mounts


def _pull_in_process(root: str, data: bytes, bundle: str) -> None:
    s = LayerStore(root)
    with s.session():
        info = s.add_layer(diff_id(data), io.BytesIO(data))
        create_bundle(s, [info.diff_id], bundle, image_config={"Cmd": ["x"]}, flatten=True)


def _prune_in_process(root: str, rounds: int) -> None:
    s = LayerStore(root)
    for _ in range(rounds):
        s.prune()


def test_processes_pulling_and_pruning(store: LayerStore, tmp_path: Path) -> None:
    import multiprocessing

    big = tar([D("d/")] + [F(f"d/f{i}", bytes([i % 256]) * 3000) for i in range(200)])
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_pull_in_process, args=(str(store.root), big, str(tmp_path / f"b{i}")))
        for i in range(3)
    ]
    procs.append(ctx.Process(target=_prune_in_process, args=(str(store.root), 20)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    for i in range(3):
        assert len(os.listdir(tmp_path / f"b{i}" / "rootfs" / "d")) == 200
    assert store.layers() == [diff_id(big)]
    assert sorted(store.bundles()) == [str(tmp_path / f"b{i}") for i in range(3)]
    assert store.prune() == [] and os.listdir(store.root / "tmp") == []
