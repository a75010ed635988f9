"""Hostile layers: each is contained in the layer/rootfs or refused, and nothing outside changes.

Every test plants a canary directory next to the store and checks it byte for byte afterwards;
a refusal must also leave no layer and no temp dir in the store.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

import pytest

from coco.errors import BundleError, LayerStoreError, UnpackError
from coco.image import LayerStore, UnpackLimits, create_bundle, remove_bundle, unpack_layer

from ._util import D, F, H, L, T, diff_id, tar, tree_files


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "canary").write_bytes(b"canary")
    (d / "sub").mkdir()
    return d


def _outside_state(outside: Path) -> dict[str, tuple[int, bytes | None]]:
    out = {}
    for p in sorted(outside.rglob("*")):
        st = p.lstat()
        out[str(p)] = (st.st_mode, p.read_bytes() if p.is_file() else None)
    return out


@pytest.fixture
def guard(outside: Path, tmp_path: Path):
    before = _outside_state(outside)
    top_before = set(os.listdir(tmp_path))
    yield
    assert _outside_state(outside) == before
    assert set(os.listdir(tmp_path)) - top_before <= {"store", "bundle"}


def _refused(store: LayerStore, data: bytes, match: str, **limits: object) -> UnpackError:
    with pytest.raises(UnpackError, match=match) as ei:
        store.add_layer(diff_id(data), io.BytesIO(data), limits=UnpackLimits(**limits))
    assert store.layers() == []
    assert os.listdir(store.root / "layers") == []
    assert os.listdir(store.root / "tmp") == []
    msg = str(ei.value)
    assert "\n" not in msg and "layer" in msg
    return ei.value


def _added(store: LayerStore, data: bytes, **limits: object) -> Path:
    return store.add_layer(diff_id(data), io.BytesIO(data), limits=UnpackLimits(**limits)).path


@pytest.mark.usefixtures("guard")
class TestContained:
    def test_dotdot_clamped(self, store: LayerStore, outside: Path) -> None:
        layer = _added(store, tar([F("../../outside/canary", b"evil"), F("a/../../../b", b"b")]))
        assert (layer / "outside/canary").read_bytes() == b"evil"
        assert (layer / "b").read_bytes() == b"b"
        assert tree_files(layer) == {"outside", "outside/canary", "b"}

    def test_absolute_paths_relative_to_root(self, store: LayerStore, outside: Path) -> None:
        name = str(outside / "canary")
        layer = _added(store, tar([F(name, b"evil"), D(str(outside / "newdir"))]))
        assert (layer / name.lstrip("/")).read_bytes() == b"evil"
        assert not (outside / "newdir").exists()

    def test_symlink_then_file_replaces_link(self, store: LayerStore, outside: Path) -> None:
        layer = _added(store, tar([L("s", str(outside / "canary")), F("s", b"not through")]))
        assert (layer / "s").read_bytes() == b"not through"
        assert not (layer / "s").is_symlink()

    def test_symlink_then_dir_and_hardlink_to_symlink(
        self, store: LayerStore, outside: Path
    ) -> None:
        layer = _added(
            store,
            tar([L("s", str(outside / "sub")), H("h", "s"), D("s", mode=0o777)]),
        )
        assert (layer / "h").is_symlink() and os.readlink(layer / "h") == str(outside / "sub")
        assert (layer / "s").is_dir() and not (layer / "s").is_symlink()

    def test_whiteout_clamped(self, store: LayerStore, outside: Path) -> None:
        layer = _added(store, tar([T("../../outside/.wh.canary"), T("/../.wh.sub")]))
        assert stat.S_ISCHR((layer / "outside/canary").lstat().st_mode)
        assert stat.S_ISCHR((layer / "sub").lstat().st_mode)

    def test_pax_trusted_xattrs_ignored(self, store: LayerStore) -> None:
        layer = _added(
            store,
            tar(
                [
                    D("d/", xattrs={"trusted.overlay.opaque": "y", "user.ok": "1"}),
                    F("d/f", b"x", xattrs={"trusted.overlay.redirect": "/etc"}),
                ]
            ),
        )
        assert "trusted.overlay.opaque" not in os.listxattr(layer / "d")
        assert "trusted.overlay.redirect" not in os.listxattr(layer / "d/f")
        assert os.getxattr(layer / "d", "user.ok") == b"1"

    def test_lower_symlink_not_followed_by_upper_layer(
        self, store: LayerStore, outside: Path, tmp_path: Path
    ) -> None:
        low = tar([L("evil", str(outside)), L("rel", "../../../../../" + str(outside))])
        up = tar(
            [
                F("evil/canary", b"through!"),
                F("rel/canary", b"through!"),
                T("evil/.wh.sub"),
                D("rel/", mode=0o700),
            ]
        )
        ids = [diff_id(low), diff_id(up)]
        for data in (low, up):
            store.add_layer(diff_id(data), io.BytesIO(data))
        for flatten in (True, False):
            b = create_bundle(
                store, ids, tmp_path / "bundle", image_config={"Cmd": ["x"]}, flatten=flatten
            )
            if flatten:  # followed as if the rootfs were / (as umoci): lands inside it
                inside = b.rootfs / str(outside).lstrip("/") / "canary"
                assert inside.read_bytes() == b"through!"
                assert (b.rootfs / "evil").is_symlink()
            else:  # overlay: the upper directory hides the lower symlink
                assert not (b.rootfs / "evil").is_symlink()
                assert (b.rootfs / "evil/canary").read_bytes() == b"through!"
            remove_bundle(store, b.path)
        assert (outside / "canary").read_bytes() == b"canary"

    @pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "overlay"])
    def test_upper_whiteouts_and_opaque_over_lower_symlinks(
        self, store: LayerStore, outside: Path, tmp_path: Path, flatten: bool
    ) -> None:
        low = tar([L("wh", str(outside)), L("opq", str(outside)), L("deep", str(outside))])
        up = tar(
            [
                T(".wh.wh"),  # removes the symlink, not what it points to
                D("opq/"),
                T("opq/.wh..wh..opq"),  # an opaque dir replacing a symlink: nothing cleared outside
                T("deep/.wh.canary"),  # a whiteout under a lower symlink: never reaches outside
                T("deep/sub/.wh..wh..opq"),
            ]
        )
        for data in (low, up):
            store.add_layer(diff_id(data), io.BytesIO(data))
        b = create_bundle(
            store,
            [diff_id(low), diff_id(up)],
            tmp_path / "bundle",
            image_config={"Cmd": ["x"]},
            flatten=flatten,
        )
        assert not os.path.lexists(b.rootfs / "wh")
        assert (b.rootfs / "opq").is_dir() and not (b.rootfs / "opq").is_symlink()
        assert os.listdir(b.rootfs / "opq") == []
        assert (outside / "canary").read_bytes() == b"canary" and (outside / "sub").is_dir()

    def test_last_duplicate_wins(self, store: LayerStore) -> None:
        layer = _added(
            store,
            tar(
                [
                    D("x/"),
                    F("x/f", b"1"),
                    F("x", b"file now"),
                    F("y", b"1"),
                    D("y/"),
                    F("y/in", b"2"),
                    F("z", b"1"),
                    F("z", b"2"),
                ]
            ),
        )
        assert (layer / "x").read_bytes() == b"file now"
        assert (layer / "y/in").read_bytes() == b"2"
        assert (layer / "z").read_bytes() == b"2"


@pytest.mark.usefixtures("guard")
class TestRefused:
    def test_parent_is_symlink_to_outside(self, store: LayerStore, outside: Path) -> None:
        _refused(store, tar([L("evil", str(outside)), F("evil/canary", b"x")]), "symlink")

    def test_parent_is_relative_symlink(self, store: LayerStore) -> None:
        _refused(store, tar([L("up", "../../../.."), F("up/tmp/x", b"x")]), "symlink")

    def test_parent_is_symlink_inside(self, store: LayerStore) -> None:
        _refused(store, tar([D("b/"), L("a", "b"), F("a/f", b"x")]), "parent 'a'")

    def test_parent_is_file(self, store: LayerStore) -> None:
        _refused(store, tar([F("a", b"x"), F("a/f", b"x")]), "not a directory")

    def test_hardlink_dotdot_outside(self, store: LayerStore) -> None:
        _refused(store, tar([H("h", "../../outside/canary")]), "inside the layer")

    def test_hardlink_absolute_outside(self, store: LayerStore, outside: Path) -> None:
        _refused(store, tar([H("h", str(outside / "canary"))]), "did not create")

    def test_hardlink_through_symlink(self, store: LayerStore, outside: Path) -> None:
        data = tar([L("s", str(outside)), H("h", "s/canary")])
        _refused(store, data, "did not create")

    def test_hardlink_through_planted_symlink_dir(self, store: LayerStore, outside: Path) -> None:
        data = tar([D("d/"), F("d/canary", b"x"), L("e", str(outside)), H("h", "e/canary")])
        _refused(store, data, "did not create")

    def test_hardlink_to_directory(self, store: LayerStore) -> None:
        _refused(store, tar([D("d/"), H("h", "d")]), "directory")

    def test_hardlink_to_self(self, store: LayerStore) -> None:
        _refused(store, tar([H("h", "h")]), "another file")

    @pytest.mark.parametrize(
        ("kind", "dev"), [(tarfile.CHRTYPE, (1, 3)), (tarfile.BLKTYPE, (8, 0))]
    )
    def test_device_nodes(self, store: LayerStore, kind: bytes, dev: tuple[int, int]) -> None:
        _refused(store, tar([T("dev/node", kind, dev=dev)]), "device nodes are refused")

    def test_device_nodes_allowed(self, store: LayerStore) -> None:
        layer = _added(
            store, tar([T("null", tarfile.CHRTYPE, dev=(1, 3))]), unsafe_allow_devices=True
        )
        assert (layer / "null").lstat().st_rdev == os.makedev(1, 3)

    def test_char_0_0_always_refused(self, store: LayerStore) -> None:
        data = tar([T("w", tarfile.CHRTYPE, dev=(0, 0))])
        _refused(store, data, "whiteout", unsafe_allow_devices=True)

    @pytest.mark.parametrize("name", [".wh..", ".wh...", "d/.wh.", ".wh."])
    def test_bad_whiteouts(self, store: LayerStore, name: str) -> None:
        _refused(store, tar([D("d/"), T(name)]), "whiteout")

    def test_inflates_past_max_layer_size_declared(self, store: LayerStore) -> None:
        data = tar([F("big", b"\0" * 200_000)])
        _refused(store, data, "max-layer-size", max_layer_size=100_000)

    def test_inflates_past_max_layer_size_many_small(self, store: LayerStore) -> None:
        data = tar([F(f"f{i}", b"x" * 1000) for i in range(100)])
        _refused(store, data, "max-layer-size", max_layer_size=50_000)

    def test_huge_pax_header(self, store: LayerStore) -> None:
        ti, d = F("f", b"x")
        ti.pax_headers = {"comment": "A" * 300_000}
        _refused(store, tar([(ti, d)]), "max-layer-size", max_layer_size=100_000)

    def test_max_files(self, store: LayerStore) -> None:
        data = tar([F(f"f{i}", b"") for i in range(50)])
        _refused(store, data, "max-files", max_files=10)

    def test_max_depth(self, store: LayerStore) -> None:
        _refused(store, tar([F("a/" * 40 + "f", b"")]), "path components", max_depth=20)

    def test_root_entry_not_a_dir(self, store: LayerStore) -> None:
        _refused(store, tar([F("./", b"x")]), "root must be a directory")

    def test_truncated(self, store: LayerStore) -> None:
        data = tar([F("a", b"x" * 5000), F("b", b"y")])
        with pytest.raises(UnpackError):
            store.add_layer(diff_id(data), io.BytesIO(data[:3000]))
        assert os.listdir(store.root / "tmp") == [] and store.layers() == []

    def test_garbage(self, store: LayerStore) -> None:
        _refused(store, b"not a tar at all" * 64, "expected a tar stream")

    def test_diff_id_mismatch(self, store: LayerStore) -> None:
        data = tar([F("a", b"x")])
        other = "sha256:" + "0" * 64
        with pytest.raises(UnpackError, match="diff_id mismatch"):
            store.add_layer(other, io.BytesIO(data))
        assert os.listdir(store.root / "tmp") == [] and store.layers() == []

    def test_trailing_garbage_changes_diff_id(self, store: LayerStore) -> None:
        data = tar([F("a", b"x")])
        with pytest.raises(UnpackError, match="diff_id mismatch"):
            store.add_layer(diff_id(data), io.BytesIO(data + b"extra"))
        assert store.layers() == []

    def test_hardlink_to_lower_layer(self, store: LayerStore) -> None:
        store.add_layer(
            diff_id(tar([F("etc/passwd", b"x")])), io.BytesIO(tar([F("etc/passwd", b"x")]))
        )
        data = tar([H("p", "etc/passwd")])
        with pytest.raises(UnpackError, match="did not create"):
            store.add_layer(diff_id(data), io.BytesIO(data))
        assert os.listdir(store.root / "tmp") == [] and len(store.layers()) == 1


def test_setuid_stripped_when_not_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    base = Path(tempfile.mkdtemp(prefix="coco-setuid-"))  # reachable for another user
    os.chmod(base, 0o755)
    dest = base / "dest"
    dest.mkdir()
    os.chown(dest, 65534, 65534)
    data = tar([F("su", b"x", mode=0o6755), F("plain", b"y", mode=0o750)])
    os.setegid(65534)
    os.seteuid(65534)
    try:
        unpack_layer(io.BytesIO(data), dest)
    finally:
        os.seteuid(0)
        os.setegid(0)
    assert stat.S_IMODE((dest / "su").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "plain").stat().st_mode) == 0o750
    assert (dest / "su").stat().st_uid == 65534
    shutil.rmtree(base)


def test_setuid_kept_as_root(store: LayerStore) -> None:
    layer = _added(store, tar([F("su", b"x", mode=0o4755, uid=0)]))
    assert stat.S_IMODE((layer / "su").stat().st_mode) == 0o4755


def test_failed_bundle_leaves_nothing(store: LayerStore, tmp_path: Path) -> None:
    data = tar([F("a", b"x")])
    store.add_layer(diff_id(data), io.BytesIO(data))
    missing = "sha256:" + "1" * 64
    with pytest.raises(LayerStoreError, match="no layer"):
        create_bundle(store, [diff_id(data), missing], tmp_path / "b", image_config={"Cmd": ["x"]})
    assert not (tmp_path / "b").exists() and store.bundles() == {}
    with pytest.raises(BundleError, match="Entrypoint"):
        create_bundle(store, [diff_id(data)], tmp_path / "b", image_config={}, flatten=True)
    assert not (tmp_path / "b").exists() and store.bundles() == {}
    with pytest.raises(BundleError, match="Entrypoint"):
        create_bundle(store, [diff_id(data)], tmp_path / "b", image_config={})
    assert not (tmp_path / "b").exists() and store.bundles() == {}
    assert not any(
        line.split()[1].startswith(str(tmp_path))
        for line in Path("/proc/self/mounts").read_text().splitlines()
    )


def test_bundle_dir_must_be_new(store: LayerStore, tmp_path: Path) -> None:
    data = tar([F("a", b"x")])
    store.add_layer(diff_id(data), io.BytesIO(data))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine").write_text("keep")
    with pytest.raises(BundleError, match="expected a new directory"):
        create_bundle(store, [diff_id(data)], tmp_path / "b", image_config={"Cmd": ["x"]})
    assert (tmp_path / "b" / "mine").read_text() == "keep"


def test_unpack_into_nonempty_dir_refused(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("x")
    with pytest.raises(UnpackError, match="empty directory"):
        unpack_layer(io.BytesIO(tar([F("a", b"")])), tmp_path)


def _gnu_sparse(name: str, data: bytes, realsize: int) -> bytes:
    """An old-GNU sparse entry (type 'S'): ``data`` at offset 0, a hole up to ``realsize``."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime = len(data), 1_700_000_000
    hdr = bytearray(ti.tobuf(tarfile.GNU_FORMAT))
    hdr[156:157] = b"S"
    hdr[386:398] = b"%011o\0" % 0
    hdr[398:410] = b"%011o\0" % len(data)
    hdr[483:495] = b"%011o\0" % realsize
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    pad = b"\0" * (-len(data) % 512)
    return bytes(hdr) + data + pad + b"\0" * 1024


@pytest.mark.usefixtures("guard")
def test_sparse_file_hole_counts_against_limit(store: LayerStore) -> None:
    one = _gnu_sparse("sparse", b"s" * 512, 10_000_000)
    _refused(store, one, "max-layer-size", max_layer_size=1_000_000)
    # each under the limit, together over it: what they write counts, not what they read
    three = b"".join(_gnu_sparse(f"s{i}", b"s" * 512, 600_000)[:-1024] for i in range(3))
    three += b"\0" * 1024
    assert len(three) < 6000
    _refused(store, three, "max-layer-size", max_layer_size=1_000_000)


@pytest.mark.usefixtures("guard")
def test_sparse_file_within_limit(store: LayerStore) -> None:
    layer = _added(store, _gnu_sparse("sparse", b"s" * 512, 8192))
    content = (layer / "sparse").read_bytes()
    assert content == b"s" * 512 + b"\0" * (8192 - 512)


def test_replacing_directories_stays_linear(tmp_path: Path) -> None:
    """A layer that turns a directory into a file over and over must cost about what its
    entries cost, not entries x layer size (each replacement used to rescan every path).

    The cost is counted in Python lines executed (sys.settrace), which does not depend on the
    machine's load the way a timing would."""
    import sys

    base = [F(f"f{i}") for i in range(3_000)]
    flips = [e for _ in range(1_000) for e in (D("d/"), F("d"))]

    def lines(entries: list, name: str) -> int:
        dest = tmp_path / name
        dest.mkdir()
        data = tar(entries)
        count = 0

        def trace(frame: object, event: str, arg: object) -> object:
            nonlocal count
            count += event == "line"
            return trace

        sys.settrace(trace)
        try:
            unpack_layer(io.BytesIO(data), dest)
        finally:
            sys.settrace(None)
        return count

    plain = lines(base + [F(f"g{i}") for i in range(2_000)], "plain")  # as many entries
    flipping = lines(base + flips, "flipping")
    assert flipping < 2 * plain, (flipping, plain)


def test_full_disk_while_files_are_written(tmp_path: Path) -> None:
    """Small files are written by a thread of the unpacker's own: a write that fails there (a
    full filesystem: a 1 MiB tmpfs) fails the unpack with the entry it was writing, and every
    descriptor is closed when unpack_layer returns."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        fds = len(os.listdir("/proc/self/fd"))
        blob = tar([F(f"f{i}", os.urandom(400 << 10)) for i in range(4)])
        with pytest.raises(UnpackError) as e:
            unpack_layer(io.BytesIO(blob), mnt)
        msg = str(e.value)
        assert msg.count("\n") == 0 and "No space left on device" in msg, msg
        assert "layer entry " in msg and "'f" in msg and "cannot create file" in msg, msg
        assert len(os.listdir("/proc/self/fd")) == fds
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
