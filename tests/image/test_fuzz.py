"""Hypothesis fuzzing over tar headers: names, link targets, types, modes, sizes, bit flips.

Whatever the layer holds, unpacking either commits a layer or raises UnpackError, never another
exception; nothing outside the store changes; a refusal leaves no temp dir; a committed layer
flattened over a base full of escaping symlinks still writes nothing outside the bundle.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from coco.errors import UnpackError
from coco.image import LayerStore, UnpackLimits, create_bundle, remove_bundle
from coco.image.bundle import _is_mount, _umount

from ._util import L, diff_id, tar

OUTSIDE = Path(tempfile.gettempdir()) / "coco-fuzz-outside"

_COMPONENTS = ["a", "b", "c", "a", "b", "..", ".", "", ".wh.a", ".wh.b", ".wh..wh..opq", "x" * 20]
_TYPES = [
    tarfile.REGTYPE,
    tarfile.REGTYPE,
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.FIFOTYPE,
    tarfile.CONTTYPE,
    b"Z",
]

paths = st.one_of(
    st.lists(st.sampled_from(_COMPONENTS), min_size=1, max_size=5).map("/".join),
    st.lists(st.sampled_from(_COMPONENTS), min_size=1, max_size=3).map(lambda p: "/" + "/".join(p)),
    st.sampled_from(
        [str(OUTSIDE), str(OUTSIDE / "canary"), str(OUTSIDE / "new"), "../" * 8 + "tmp/x"]
    ),
)


@st.composite
def entries(draw: st.DrawFn) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(draw(paths))
    ti.type = draw(st.sampled_from(_TYPES))
    ti.linkname = draw(paths) if ti.type in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    ti.mode = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o000, 0o7777, 0o1777]))
    ti.uid = draw(st.sampled_from([0, 1000, 65534]))
    ti.gid = draw(st.sampled_from([0, 42]))
    ti.mtime = draw(st.sampled_from([0, 1_700_000_000]))
    ti.devmajor, ti.devminor = draw(st.sampled_from([(0, 0), (1, 3)]))
    data = None
    if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, b"Z"):
        data = draw(st.binary(max_size=600))
    return ti, data


layers = st.tuples(
    st.lists(entries(), min_size=1, max_size=12),
    st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=2),  # byte flips
)


def _state() -> dict[str, bytes | None]:
    return {
        str(p): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in sorted(OUTSIDE.rglob("*"))
    }


@pytest.fixture(scope="module")
def outside() -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    shutil.rmtree(OUTSIDE, ignore_errors=True)
    OUTSIDE.mkdir()
    (OUTSIDE / "canary").write_bytes(b"canary")
    (OUTSIDE / "dir").mkdir()
    yield OUTSIDE
    shutil.rmtree(OUTSIDE, ignore_errors=True)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(layer=layers)
def test_fuzz_tar_headers(outside: Path, layer: tuple[list, list]) -> None:
    items, flips = layer
    data = bytearray(tar(items))
    for pos, val in flips:
        if pos < len(data):
            data[pos] = val
            block = pos - pos % 512  # keep the header checksum valid so parsing goes on
            data[block + 148 : block + 156] = b" " * 8
            data[block + 148 : block + 156] = b"%06o\0 " % sum(data[block : block + 512])
    before = _state()
    root = Path(tempfile.mkdtemp(prefix="coco-fuzz-"))
    try:
        store = LayerStore(root / "store")
        base = tar([L("a", str(outside)), L("b", "../../../../.." + str(outside)), L("c", "/")])
        store.add_layer(diff_id(base), io.BytesIO(base))
        limits = UnpackLimits(max_files=50, max_layer_size=1 << 20)
        try:
            info = store.add_layer(diff_id(bytes(data)), io.BytesIO(bytes(data)), limits=limits)
        except UnpackError as e:
            event("refused: " + str(e).rpartition("': ")[2][:45])
            assert "\n" not in str(e)
            assert os.listdir(store.root / "tmp") == []
            assert store.layers() == [diff_id(base)]
        else:
            event("committed")
            b = create_bundle(
                store,
                [diff_id(base), info.diff_id],
                root / "bundle",
                image_config={"Cmd": ["x"]},
                flatten=True,
            )
            remove_bundle(store, b.path)
            assert not b.path.exists()
        assert _state() == before
        assert sorted(os.listdir(root)) == ["store"]
    finally:
        shutil.rmtree(root)


@settings(
    max_examples=int(os.environ.get("COCO_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(stack=st.lists(st.lists(entries(), min_size=1, max_size=8), min_size=2, max_size=3))
def test_fuzz_layer_stacks_bundle_in_both_modes(outside: Path, stack: list[list]) -> None:
    """Several fuzzed layers over the escaping base: whatever the store commits must assemble
    in overlay and in flatten mode (a bundle error there is a bug, not a refusal), and nothing
    outside the store and bundle changes."""
    before = _state()
    root = Path(tempfile.mkdtemp(prefix="coco-fuzz-"))
    try:
        store = LayerStore(root / "store")
        base = tar([L("a", str(outside)), L("b", "../../../../.." + str(outside)), L("c", "/")])
        ids = [store.add_layer(diff_id(base), io.BytesIO(base)).diff_id]
        limits = UnpackLimits(max_files=50, max_layer_size=1 << 20)
        for items in stack:
            data = tar(items)
            try:
                ids.append(store.add_layer(diff_id(data), io.BytesIO(data), limits=limits).diff_id)
            except UnpackError as e:
                assert "\n" not in str(e)
        event(f"{len(ids) - 1} fuzzed layers committed")
        for flatten in (True, False):
            b = create_bundle(
                store, ids, root / "bundle", image_config={"Cmd": ["x"]}, flatten=flatten
            )
            remove_bundle(store, b.path)
            assert not b.path.exists()
        assert os.listdir(store.root / "tmp") == []
        assert _state() == before
        assert sorted(os.listdir(root)) == ["store"]
    finally:
        if _is_mount(root / "bundle" / "rootfs"):
            _umount(root / "bundle" / "rootfs")
        shutil.rmtree(root)
