"""Our unpack + bundle against ``umoci unpack`` on the same multi-layer images, file by file."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from coco.image import LayerStore, create_bundle

from ._util import D, F, H, L, T, diff_id, snapshot, tar, umoci_unpack

BASE = [
    D("./", mode=0o755),
    D("bin/", mode=0o755),
    F("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755),
    F("bin/su", b"setuid!", mode=0o4755),
    F("bin/sg", b"setgid!", mode=0o2711, gid=42),
    D("etc/", mode=0o755),
    F("etc/passwd", b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"),
    F("etc/shadow", b"secret", mode=0o600, gid=42),
    D("home/", mode=0o755),
    D("home/app/", mode=0o750, uid=1000, gid=1000),
    F("home/app/.profile", b"export A=1\n", uid=1000, gid=1000),
    D("data/", mode=0o1777),
    F("data/keep", b"keep"),
    F("data/gone", b"gone"),
    D("data/sub/", mode=0o700, uid=7, gid=8),
    F("data/sub/x", b"x" * 5000, uid=7, gid=8),
    D("opaque/", mode=0o755),
    F("opaque/old1", b"1"),
    D("opaque/olddir/"),
    F("opaque/olddir/f", b"2"),
    D("replace/"),
    F("replace/was-file", b"file"),
    D("replace/was-dir/"),
    F("replace/was-dir/inner", b"inner"),
    L("lib", "usr/lib"),
    D("usr/"),
    D("usr/lib/"),
    F("usr/lib/libc.so", b"\x7fELF" + bytes(range(256)) * 40),
    H("usr/lib/libc.so.6", "usr/lib/libc.so"),
    L("etc/abs-link", "/etc/passwd"),
    L("etc/dangling", "../nowhere/at/all"),
    T("run-fifo", tarfile.FIFOTYPE, mode=0o640),
]

UPPER = [
    D("data/", mode=0o1777),
    T("data/.wh.gone"),
    F("data/new", b"new", mode=0o640, uid=3, gid=4),
    T("data/.wh.sub"),
    D("opaque/", mode=0o711),
    T("opaque/.wh..wh..opq"),
    F("opaque/fresh", b"fresh"),
    D("replace/"),
    D("replace/was-file/", mode=0o700),
    F("replace/was-file/now-inside", b"in"),
    F("replace/was-dir", b"now a file"),
    D("etc/"),
    F("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    H("etc/passwd-link", "etc/passwd"),
    D("gone-later/"),
    F("gone-later/f", b"f"),
    D("usr/"),
    D("usr/lib/"),
    F("usr/lib/libc.so", b"replaced"),
]

TOP = [
    D("./", mode=0o750),
    T("gone-later/.wh.f"),
    T(".wh.run-fifo"),
    D("usr/"),
    D("usr/lib/"),
    T("usr/lib/.wh.libc.so.6"),
    D("newdir/", mode=0o700, uid=5, gid=6),
    L("newdir/up", "../etc"),
    F("newdir/same-layer", b"kept"),
    T("newdir/.wh.same-layer"),
    T("newdir/.wh.later"),
    F("newdir/later", b"later wins"),
    F("bin/tool", b"second copy"),
    F("bin/tool", b"third copy wins", mode=0o700),
]

IMPLICIT = [
    F("deep/implicit/parents/f", b"implicit"),  # no entries for the parents
    F("data/implicit-child", b"c"),  # data/ exists below with mode 1777: must stay
    T("only-whiteouts/.wh.nothing"),  # must not create only-whiteouts/
]


def _layers(tmp_path: Path, store: LayerStore, layers: list[bytes]) -> list[str]:
    ids = []
    for data in layers:
        info = store.add_layer(diff_id(data), io.BytesIO(data))
        ids.append(info.diff_id)
    return ids


@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "overlay"])
def test_matches_umoci(tmp_path: Path, store: LayerStore, umoci: str, flatten: bool) -> None:
    layers = [tar(BASE), tar(UPPER), tar(TOP)]
    ref = snapshot(umoci_unpack(tmp_path, layers), dir_times=flatten)
    ids = _layers(tmp_path, store, layers)
    b = create_bundle(
        store, ids, tmp_path / "bundle", image_config={"Cmd": ["/bin/sh"]}, flatten=flatten
    )
    assert b.mode == ("flatten" if flatten else "overlay")
    ours = snapshot(b.rootfs, hide_whiteouts=True, dir_times=flatten)
    assert ours == ref
    # a few facts spelled out, so a shared blind spot of both sides would still show
    assert "data/gone" not in ours and "data/sub" not in ours and "opaque/old1" not in ours
    assert ours["bin/su"][0] == "-rwsr-xr-x"
    assert ours["newdir/same-layer"][0] == "-rw-r--r--"
    assert ours["#links"] == [["etc/passwd", "etc/passwd-link"]]
    assert (b.rootfs / "bin/tool").read_bytes() == b"third copy wins"


@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "overlay"])
def test_implicit_parents(tmp_path: Path, store: LayerStore, umoci: str, flatten: bool) -> None:
    lone = tar([D("lone/"), T("lone/.wh.ghost"), F("lone/real", b"r")])  # nothing below lone/
    layers = [tar(BASE), tar(IMPLICIT), lone]
    ref = snapshot(umoci_unpack(tmp_path, layers), dir_times=False)
    ids = _layers(tmp_path, store, layers)
    b = create_bundle(store, ids, tmp_path / "bundle", image_config={"Cmd": ["x"]}, flatten=flatten)
    ours = snapshot(b.rootfs, hide_whiteouts=True, dir_times=False)
    assert ours == ref
    assert ours["data"][:3] == ("drwxrwxrwt", 0, 0)
    assert "only-whiteouts" not in ours
    assert sorted(os.listdir(b.rootfs / "lone")) == ["real"]


def test_gnu_and_ustar_formats(tmp_path: Path, store: LayerStore, umoci: str) -> None:
    long = "d/" + "n" * 120 + "/" + "f" * 150
    layers = [
        tar([D("d/"), F(long, b"long"), L("d/l", "x" * 200)], fmt=tarfile.GNU_FORMAT),
        tar([D("e/"), F("e/f", b"ustar")], fmt=tarfile.USTAR_FORMAT),
    ]
    ref = snapshot(umoci_unpack(tmp_path, layers), dir_times=False)
    ids = _layers(tmp_path, store, layers)
    b = create_bundle(store, ids, tmp_path / "bundle", image_config={"Cmd": ["x"]}, flatten=True)
    assert snapshot(b.rootfs, dir_times=False) == ref
    assert (b.rootfs / long).read_bytes() == b"long"


@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "overlay"])
def test_root_opaque_and_whiteout_then_implicit_dir(
    tmp_path: Path, store: LayerStore, umoci: str, flatten: bool
) -> None:
    lower = tar(BASE)
    reset = tar([T(".wh..wh..opq"), D("etc/"), F("etc/only", b"only")])
    redo = tar([D("etc/"), T("etc/.wh.dir"), F("etc/dir/x", b"x"), F("etc/more", b"m")])
    pre = tar([D("etc/"), D("etc/dir/", mode=0o700, uid=9), F("etc/dir/old", b"o")])
    layers = [lower, pre, reset, pre, redo]
    ref = snapshot(umoci_unpack(tmp_path, layers), dir_times=False)
    ids = _layers(tmp_path, store, layers)
    b = create_bundle(store, ids, tmp_path / "bundle", image_config={"Cmd": ["x"]}, flatten=flatten)
    ours = snapshot(b.rootfs, hide_whiteouts=True, dir_times=False)
    assert ours == ref
    assert "bin" not in ours and ours["etc/dir"][:3] == ("drwxr-xr-x", 0, 0)
    assert "etc/dir/old" not in ours


def _host_tree(*dirs: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in dirs:
            tf.add(d, arcname=d.lstrip("/"))
    return buf.getvalue()


@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "overlay"])
def test_real_trees_match_umoci(
    tmp_path: Path, store: LayerStore, umoci: str, flatten: bool
) -> None:
    """Real directory trees of this machine (symlinks, odd modes, owners) in two layers."""
    zone = _host_tree("/usr/share/zoneinfo")
    etc = _host_tree("/etc")
    layers = [zone, etc, tar([D("etc/"), T("etc/.wh.passwd"), T("usr/share/zoneinfo/.wh.UTC")])]
    ref = snapshot(umoci_unpack(tmp_path, layers))
    ids = _layers(tmp_path, store, layers)
    b = create_bundle(store, ids, tmp_path / "bundle", image_config={"Cmd": ["x"]}, flatten=flatten)
    ours = snapshot(b.rootfs, hide_whiteouts=True)
    assert ours == ref
    assert len(ours) > 1000 and "etc/passwd" not in ours and "etc/group" in ours


def test_implicit_parent_through_lower_symlink_flatten(
    tmp_path: Path, store: LayerStore, umoci: str
) -> None:
    """usr-merged images: an upper layer writes ``bin/x`` without a ``bin/`` entry while the
    lower ``bin`` is a symlink; umoci follows it inside the rootfs, and so does flattening."""
    lower = tar(
        [
            D("usr/"),
            D("usr/bin/"),
            F("usr/bin/old", b"old"),
            D("usr/lib/", mode=0o750),
            F("usr/lib/gone", b"g"),
            L("bin", "usr/bin"),
            L("lib", "/usr/lib"),
            L("up", "../../../usr"),
            L("dangling", "nowhere"),
            L("dangling2", "nowhere2/deeper"),
        ]
    )
    upper = tar(
        [
            F("bin/new", b"new"),
            T("lib/.wh.gone"),
            F("lib/added", b"a"),
            F("up/bin/via-dotdot", b"d"),
            F("dangling/f", b"f"),
            T("dangling2/.wh.x"),
        ]
    )
    layers = [lower, upper]
    ref = snapshot(umoci_unpack(tmp_path, layers))
    ids = _layers(tmp_path, store, layers)
    b = create_bundle(store, ids, tmp_path / "bundle", image_config={"Cmd": ["x"]}, flatten=True)
    ours = snapshot(b.rootfs)
    assert ours == ref
    assert (b.rootfs / "bin").is_symlink() and (b.rootfs / "usr/bin/new").read_bytes() == b"new"
    assert "usr/lib/gone" not in ours and ours["usr/lib"][0] == "drwxr-x---"


SETGID_AND_BIG = [
    D("shared/", mode=0o2775, gid=9),  # a setgid directory: new entries inherit group 9
    F("shared/root-file", b"owned 0:0 in the tar"),
    L("shared/root-link", "root-file"),
    F("shared/app-file", b"app", uid=1000, gid=1000),
    F("big", bytes(range(256)) * (12 << 10) + b"tail"),  # 3 MiB + 4: several direct chunks
    F("empty", b""),
    F("one-byte", b"1"),
    F("big", b"a later copy is what stays: " + os.urandom(1 << 20)),  # duplicate: last wins
]


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_direct_file_writes_and_root_owners_match_umoci(
    tmp_path: Path, store: LayerStore, umoci: str, compression: str
) -> None:
    """File data goes from the decompressor straight to the file, and a 0:0 entry skips chown
    unless a setgid directory of another group would hand its group down: same tree as umoci."""
    import gzip

    import zstandard

    from coco.oci.compression import decompressed

    layers = [tar(BASE), tar(SETGID_AND_BIG)]
    ref = snapshot(umoci_unpack(tmp_path, layers), dir_times=True)
    packed = {"gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress}[compression]
    ids = []
    for data in layers:
        with decompressed(io.BytesIO(packed(data)), compression) as stream:
            ids.append(store.add_layer(diff_id(data), stream).diff_id)
    b = create_bundle(store, ids, tmp_path / "bundle", image_config={"Cmd": ["x"]}, flatten=True)
    ours = snapshot(b.rootfs, hide_whiteouts=True, dir_times=True)
    assert ours == ref
    assert ours["shared/root-file"][1:3] == (0, 0)  # not group 9 from the setgid parent
    assert ours["shared/root-link"][1:3] == (0, 0)
    assert (b.rootfs / "big").read_bytes().startswith(b"a later copy is what stays: ")
