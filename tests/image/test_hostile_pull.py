"""Hostile images pulled end to end: pushed to a real docker-registry, pulled by ``pull_image``
(and the CLI) in overlay and ``--flatten`` modes.

Beside the bundle sits a canary directory (files, a subdirectory, a symlink, modes) that the
layers aim at with absolute names, ``..`` chains of every depth that reaches it from the rootfs
or from a layer directory of the store, symlinks planted in lower layers, hardlinks and
whiteouts. After every pull it must be unchanged byte for byte. A pull either contains every
entry inside the rootfs or is refused with one line naming the layer and the entry; a refused
pull leaves no bundle directory, no layer and no temp dir in the store.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import tarfile
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from coco.errors import CocoError
from coco.image import LayerStore, UnpackLimits
from coco.image.pull import PullOptions, pull_image
from coco.oci.transport import Access
from tests.conftest import Registry
from tests.imagekit import image_blobs

from ._util import MTIME, D, F, H, L, T, tar

ACCESS = Access(tls_verify=False)
END = b"\0" * 1024  # the two zero blocks that end a tar


# -- pushing raw images ------------------------------------------------------------------------
def _request(method: str, url: str, body: bytes = b"", ctype: str = "") -> urllib.request.Request:
    req = urllib.request.Request(url, data=body if method != "POST" else b"", method=method)
    if ctype:
        req.add_header("Content-Type", ctype)
    return req


def push_blobs(
    reg: Registry,
    tars: Sequence[bytes],
    *,
    compression: str = "gzip",
    blobs: Sequence[bytes] = (),
    config: dict[str, object] | None = None,
) -> str:
    """Push an image of ``tars`` (or of the given compressed ``blobs`` for them) straight through
    the registry API: the layer bytes reach the registry exactly as built (no tool re-encodes
    them). Returns the docker:// reference."""
    extra = {"config": config} if config else None
    manifest, cfg, built, _ = image_blobs(list(tars), compression=compression, config_extra=extra)
    if blobs:  # same diff_ids, other compressed bytes: rebuild the manifest around them
        from coco.oci import mediatypes as mt
        from coco.oci.models import Descriptor, go_json
        from tests.imagekit import layer_media_type, sha256

        built = list(blobs)
        man = json.loads(manifest)
        man["layers"] = [
            Descriptor(layer_media_type(compression), sha256(b), len(b)).to_json() for b in built
        ]
        assert man["mediaType"] == mt.OCI_MANIFEST
        manifest = go_json(man)
    repo = f"hostile/{uuid.uuid4().hex[:12]}"
    base = f"http://{reg.host}/v2/{repo}"
    for blob in [cfg, *built]:
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        with urllib.request.urlopen(_request("POST", f"{base}/blobs/uploads/")) as r:
            loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = f"http://{reg.host}{loc}"
        sep = "&" if "?" in loc else "?"
        put = _request("PUT", f"{loc}{sep}digest={digest}", blob, "application/octet-stream")
        with urllib.request.urlopen(put) as r:
            assert r.status == 201
    mt_ = json.loads(manifest)["mediaType"]
    with urllib.request.urlopen(_request("PUT", f"{base}/manifests/v1", manifest, mt_)) as r:
        assert r.status == 201
    return reg.url(repo, "v1")


# -- raw tar pieces the tarfile writer will not make ---------------------------------------------
def pax(name: str, records: dict[str, bytes | str], body: bytes = b"", **kw: object) -> bytes:
    """A PAX 'x' header with ``records`` verbatim (NULs, newlines, numbers of any sign) and the
    ustar member it applies to, without the end-of-archive blocks."""
    data = b""
    for key, value in records.items():
        kv = b" " + key.encode() + b"=" + (value if isinstance(value, bytes) else value.encode())
        n = len(kv) + 2
        while len(str(n)) + len(kv) + 1 != n:
            n = len(str(n)) + len(kv) + 1
        data += str(n).encode() + kv + b"\n"
    xh = tarfile.TarInfo("PaxHeaders/x")
    xh.type, xh.size = tarfile.XHDTYPE, len(data)
    return xh.tobuf(tarfile.USTAR_FORMAT) + _pad(data) + raw(name, body, **kw)


def raw(name: str, body: bytes = b"", *, kind: bytes = tarfile.REGTYPE, **kw: object) -> bytes:
    """One header (GNU format, no name cleaning) and its data."""
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mtime = kind, len(body), MTIME
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti.tobuf(tarfile.GNU_FORMAT) + _pad(body)


def gnu_long(name: str, kind: bytes = tarfile.GNUTYPE_LONGNAME) -> bytes:
    ti = tarfile.TarInfo("././@LongLink")
    data = name.encode() + b"\0"
    ti.type, ti.size = kind, len(data)
    return ti.tobuf(tarfile.GNU_FORMAT) + _pad(data)


def with_field(header: bytes, start: int, value: bytes) -> bytes:
    """``header`` (one 512-byte block first) with bytes replaced and the checksum redone."""
    b = bytearray(header)
    b[start : start + len(value)] = value
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b[:512])
    return bytes(b)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


# -- the canary ----------------------------------------------------------------------------------
@dataclass
class Scene:
    tmp: Path
    outside: Path
    store: LayerStore
    reg: Registry

    @property
    def bundle(self) -> Path:
        return self.tmp / "bundle"

    def snapshot(self) -> dict[str, tuple[object, ...]]:
        out: dict[str, tuple[object, ...]] = {}
        for p in [self.outside, *sorted(self.outside.rglob("*"))]:
            st = p.lstat()
            rec: tuple[object, ...] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
            if stat.S_ISLNK(st.st_mode):
                rec += (os.readlink(p),)
            elif stat.S_ISREG(st.st_mode):
                rec += (p.read_bytes(), st.st_nlink)
            else:
                rec += (sorted(os.listdir(p)) if stat.S_ISDIR(st.st_mode) else st.st_rdev,)
            out[str(p.relative_to(self.tmp))] = rec
        return out


@pytest.fixture
def scene(tmp_path: Path, store: LayerStore, open_registry: Registry) -> Scene:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "canary").write_bytes(b"canary\n")
    (out / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    (out / "sub").mkdir()
    (out / "sub" / "deep").write_bytes(b"deep\n")
    (out / "link").symlink_to("canary")
    os.chmod(out / "canary", 0o640)
    os.utime(out / "canary", (1_600_000_000, 1_600_000_000))
    return Scene(tmp_path, out, store, open_registry)


def ups(target: str) -> list[str]:
    """``target`` behind ``..`` chains of every depth that could reach the canary directory from
    the rootfs (bundle/rootfs) or from a layer directory (store/layers/<hex>/fs)."""
    return ["../" * n + target for n in range(1, 7)]


def _pull(s: Scene, ref: str, flatten: bool, limits: UnpackLimits | None = None) -> Path:
    opts = PullOptions(access=ACCESS, flatten=flatten, jobs=2, limits=limits)
    res = pull_image(ref, s.bundle, s.store, opts)
    assert res.bundle.mode == ("flatten" if flatten else "overlay")
    return res.bundle.rootfs


def contained(
    s: Scene, layers: Sequence[bytes], flatten: bool, check: Callable[[Path], None] | None = None
) -> Path:
    before = s.snapshot()
    rootfs = _pull(s, push_blobs(s.reg, layers), flatten)
    assert s.snapshot() == before
    assert sorted(os.listdir(s.tmp)) == ["bundle", "outside", "store"]
    if check is not None:
        check(rootfs)
    return rootfs


def refused(
    s: Scene,
    layers: Sequence[bytes],
    flatten: bool,
    match: str,
    *,
    limits: UnpackLimits | None = None,
    ref: str | None = None,
    names: str = "layer",
) -> str:
    before = s.snapshot()
    with pytest.raises(CocoError, match=match) as ei:
        _pull(s, ref or push_blobs(s.reg, layers), flatten, limits)
    msg = str(ei.value)
    assert "\n" not in msg and names in msg, msg
    assert s.snapshot() == before
    assert not os.path.lexists(s.bundle)
    assert os.listdir(s.store.root / "layers") == []
    assert os.listdir(s.store.root / "tmp") == []
    assert s.store.bundles() == {}
    assert sorted(os.listdir(s.tmp)) == ["outside", "store"]
    return msg


MODES = pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "overlay"])


def _inside(rootfs: Path, rel: str) -> bytes:
    """A file of the rootfs read without following any symlink (as the guest would see it)."""
    fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        parts = rel.split("/")
        for name in parts[:-1]:
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        f = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        with os.fdopen(f, "rb") as fh:
            return fh.read()
    finally:
        os.close(fd)


# -- symlinks planted by a lower layer, written through by an upper one --------------------------
@MODES
def test_lower_symlink_dir_to_outside_then_writes(scene: Scene, flatten: bool) -> None:
    out = str(scene.outside)
    low = tar([L("etc", out), *(L(f"up{i}", u) for i, u in enumerate(ups("outside")))])
    top = tar(
        [
            F("etc/canary", b"pwned"),
            F("etc/passwd", b"evil::0:0"),
            F("etc/sub/deep", b"pwned"),
            *(F(f"up{i}/canary", b"pwned") for i in range(6)),
        ]
    )

    def check(rootfs: Path) -> None:
        if flatten:  # followed as if the rootfs were / (as umoci): the files land inside it
            assert _inside(rootfs, out.lstrip("/") + "/canary") == b"pwned"
            assert os.readlink(rootfs / "etc") == out
        else:  # overlay: the upper directory hides the lower symlink
            assert _inside(rootfs, "etc/passwd") == b"evil::0:0"

    contained(scene, [low, top], flatten, check)


@MODES
def test_host_paths_above_the_test_dir_untouched(scene: Scene, flatten: bool) -> None:
    """The canary sits beside the bundle; these aim at the host's /tmp itself (absolute
    symlinks, absolute names, long .. chains) and must never reach it."""
    tag = uuid.uuid4().hex
    sentinel = Path("/tmp") / f"coco-sentinel-{tag}"
    sentinel.write_bytes(b"sentinel")
    new = f"coco-new-{tag}"
    try:
        low = tar([L("t", "/tmp"), L("r", "/"), L("u", "../" * 12 + "tmp")])
        top = tar(
            [
                F(f"t/{new}", b"x"),
                F(f"r/tmp/{new}-2", b"x"),
                F(f"u/{new}-3", b"x"),
                F(f"/tmp/{new}-4", b"x"),
                F("../" * 12 + f"tmp/{new}-5", b"x"),
                T(f"t/.wh.{sentinel.name}"),
                T(f"r/tmp/.wh.{sentinel.name}"),
                T("u/.wh..wh..opq"),
            ]
        )
        contained(scene, [low, top], flatten)
        assert sentinel.read_bytes() == b"sentinel"
        assert not any(p.name.startswith(new) for p in Path("/tmp").iterdir())
    finally:
        sentinel.unlink()


@MODES
def test_lower_symlink_chain_and_loops(scene: Scene, flatten: bool) -> None:
    out = str(scene.outside)
    low = tar(
        [
            L("a", "b/c"),
            L("b", "../../../../.."),
            L("chain1", "chain2"),
            L("chain2", "chain3"),
            L("chain3", out),
            L("loop1", "loop2"),
            L("loop2", "loop1"),
            L("self", "self"),
            L("dot", "."),
            L("dotdot", ".."),
        ]
    )
    top = tar(
        [
            F("a/canary", b"x"),
            F("chain1/canary", b"x"),
            F("chain1/sub/deep", b"x"),
            F("loop1/f", b"x"),
            F("self/f", b"x"),
            F("dot/canary", b"x"),
            F("dotdot/outside/canary", b"x"),
        ]
    )
    contained(scene, [low, top], flatten)


@MODES
def test_hardlinks_into_lower_symlink_dir(scene: Scene, flatten: bool) -> None:
    out = str(scene.outside)
    low = tar([L("etc", out), L("up", "../../../outside")])
    top = tar([F("f", b"mine"), H("etc/canary", "f"), H("up/passwd", "f"), H("etc/new", "f")])
    contained(scene, [low, top], flatten)


@MODES
def test_whiteouts_through_lower_symlinks(scene: Scene, flatten: bool) -> None:
    out = str(scene.outside)
    low = tar([L("etc", out), L("rel", "../../outside"), L("lnk", out + "/canary")])
    top = tar(
        [
            T("etc/.wh.canary"),
            T("etc/.wh.sub"),
            T("rel/.wh.passwd"),
            T("etc/sub/.wh.deep"),
            T(".wh.lnk"),  # removes the symlink itself, not what it points to
        ]
    )
    rootfs = contained(scene, [low, top], flatten)
    assert not os.path.lexists(rootfs / "lnk")


@MODES
def test_opaque_through_lower_symlinks(scene: Scene, flatten: bool) -> None:
    out = str(scene.outside)
    low = tar([L("etc", out), L("rel", "../../outside"), L("root", "/")])
    top = tar([T("etc/.wh..wh..opq"), T("rel/sub/.wh..wh..opq"), T("root/.wh..wh..opq")])
    contained(scene, [low, top], flatten)


@MODES
def test_lower_symlink_file_replaced_not_written_through(scene: Scene, flatten: bool) -> None:
    out = str(scene.outside)
    low = tar([L("passwd", out + "/passwd"), L("s", out + "/canary"), H("h", "s")])
    top = tar([F("passwd", b"mine"), F("h", b"over"), D("s/", mode=0o777)])

    def check(rootfs: Path) -> None:
        assert _inside(rootfs, "passwd") == b"mine"
        assert _inside(rootfs, "h") == b"over"
        assert (rootfs / "s").is_dir() and not (rootfs / "s").is_symlink()

    contained(scene, [low, top], flatten, check)


@MODES
def test_symlink_dir_symlink_flip_across_layers(scene: Scene, flatten: bool) -> None:
    out = str(scene.outside)
    one = tar([L("x", out), D("x/"), F("x/in", b"1"), L("x", out + "/sub")])
    two = tar([F("x/deep", b"2"), D("y/"), F("y/keep", b"k")])
    three = tar([L("y", out), F("z", b"z")])
    four = tar([F("y/canary", b"4"), T("y/.wh.passwd")])
    contained(scene, [one, two, three, four], flatten)


@MODES
def test_dir_replaced_by_file_symlink_whiteout_with_lower_children(
    scene: Scene, flatten: bool
) -> None:
    """Directories a later layer deletes, or replaces by a file or a symlink, with implicit
    children in between (the overlay metadata fix-up must follow the merged view)."""
    base = tar(
        [D(f"{d}/", mode=0o700) for d in "abcd"]
        + [D(f"{d}/s/", mode=0o711) for d in "abcd"]
        + [F(f"{d}/s/f", b"1") for d in "abcd"]
    )
    mid = tar([F(f"{d}/s/g", b"2") for d in "abcd"])
    top = tar(
        [T(".wh.a"), F("b", b"file"), L("c", str(scene.outside)), D("d/"), T("d/.wh..wh..opq")]
    )
    last = tar([F("a/s/h", b"3")])

    def check(rootfs: Path) -> None:
        assert sorted(os.listdir(rootfs / "a")) == ["s"] and os.listdir(rootfs / "a/s") == ["h"]
        assert _inside(rootfs, "b") == b"file"
        assert os.readlink(rootfs / "c") == str(scene.outside)
        assert os.listdir(rootfs / "d") == []

    contained(scene, [base, mid, top, last], flatten, check)


@MODES
def test_trusted_overlay_xattrs_from_pax_ignored(scene: Scene, flatten: bool) -> None:
    low = tar([D("d/"), F("d/keep", b"k"), D("e/"), F("e/keep", b"k")])
    top = tar(
        [
            D("d/", xattrs={"trusted.overlay.opaque": "y"}),
            D("e/", xattrs={"trusted.overlay.redirect": str(scene.outside)}),
            F("f", b"x", xattrs={"trusted.overlay.metacopy": "", "user.ok": "1"}),
        ]
    )

    def check(rootfs: Path) -> None:
        assert _inside(rootfs, "d/keep") == b"k" and _inside(rootfs, "e/keep") == b"k"
        assert os.getxattr(rootfs / "f", "user.ok") == b"1"

    contained(scene, [low, top], flatten, check)


@MODES
def test_opaque_at_root_and_other_meta_whiteouts(scene: Scene, flatten: bool) -> None:
    low = tar([F("old", b"o"), D("dir/"), F("dir/x", b"x"), L("out", str(scene.outside))])
    top = tar([T(".wh..wh..opq"), T(".wh..wh.plnk"), F("new", b"n"), T("dir/.wh..wh..opq")])

    def check(rootfs: Path) -> None:
        assert sorted(os.listdir(rootfs)) == ["new"]  # as umoci: "dir" held only a whiteout

    contained(scene, [low, top], flatten, check)


# -- names --------------------------------------------------------------------------------------
@MODES
def test_dotdot_and_absolute_names_are_clamped(scene: Scene, flatten: bool) -> None:
    out = str(scene.outside)
    layer = tar(
        [
            *(F(u, b"pwned") for u in ups("outside/canary")),
            F(out + "/passwd", b"pwned"),
            D(out + "/sub/", mode=0o777),
            F("a/../../../../outside/sub/deep", b"pwned"),
            D(".."),
            D("./"),
            D("//"),
            D("."),
        ]
    )

    def check(rootfs: Path) -> None:
        assert _inside(rootfs, "outside/canary") == b"pwned"
        assert _inside(rootfs, out.lstrip("/") + "/passwd") == b"pwned"

    contained(scene, [layer], flatten, check)


@MODES
def test_pax_path_and_gnu_longname_overrides(scene: Scene, flatten: bool) -> None:
    out = str(scene.outside)
    layer = (
        pax("innocent", {"path": "../../../../outside/canary"}, b"pax")
        + pax("innocent2", {"path": out + "/passwd"}, b"pax")
        + pax("sym", {"linkpath": out + "/canary"}, kind=tarfile.SYMTYPE)
        + gnu_long("../" * 8 + "outside/sub/deep")
        + raw("short", b"gnu")
        + gnu_long(out + "/canary", tarfile.GNUTYPE_LONGLINK)
        + raw("sym2", kind=tarfile.SYMTYPE, linkname="short")
        + pax("nl", {"path": "new\nline"}, b"nl")
        + pax("bin", {"hdrcharset": "BINARY", "path": b"\xff\xfe"}, b"bin")
        + END
    )

    def check(rootfs: Path) -> None:
        assert _inside(rootfs, "outside/canary") == b"pax"
        assert _inside(rootfs, "outside/sub/deep") == b"gnu"
        assert os.readlink(rootfs / "sym") == out + "/canary"
        assert os.readlink(rootfs / "sym2") == out + "/canary"
        assert _inside(rootfs, "new\nline") == b"nl"
        assert os.listdir(os.fsencode(rootfs)).count(b"\xff\xfe") == 1

    contained(scene, [layer], flatten, check)


@MODES
def test_pax_linkpath_hardlink_outside_refused(scene: Scene, flatten: bool) -> None:
    layer = (
        raw("f", b"f")
        + pax("h", {"linkpath": str(scene.outside / "canary")}, kind=tarfile.LNKTYPE)
        + END
    )
    msg = refused(scene, [layer], flatten, r"entry 2 'h': expected a hardlink to an earlier file")
    assert "layer sha256:" in msg


@MODES
@pytest.mark.parametrize(
    ("records", "match"),
    [
        ({"path": b"a\0b"}, r"expected a name without NUL bytes"),
        ({"linkpath": b"/etc\0x"}, r"expected a link target without NUL bytes"),
        ({"size": "-1000000"}, r"expected a size of 0 or more, found -1000000"),
        ({"GNU.sparse.size": "zz"}, r"expected a valid tar header after entry 1"),
        ({"uid": "-1"}, r"expected a uid below 2\^32-1, found -1"),
        ({"gid": "99999999999"}, r"expected a gid below 2\^32-1"),
    ],
    ids=["nul-path", "nul-link", "negative-size", "bad-number", "uid", "gid"],
)
def test_bad_pax_records_refused(
    scene: Scene, flatten: bool, records: dict[str, bytes | str], match: str
) -> None:
    kind = tarfile.SYMTYPE if "linkpath" in records else tarfile.REGTYPE
    layer = (
        raw("first", b"1")
        + pax("x", records, b"" if kind == tarfile.SYMTYPE else b"x", kind=kind)
        + END
    )
    refused(scene, [layer], flatten, match)


@MODES
def test_name_longer_than_path_max(scene: Scene, flatten: bool) -> None:
    deep = "/".join(["d" * 250] * 20) + "/f"  # 5000+ characters, each component legal
    layer = gnu_long(deep) + raw("x", b"deep") + END
    rootfs = contained(scene, [layer], flatten)
    assert _inside(rootfs, deep) == b"deep"


@MODES
def test_component_longer_than_name_max_refused(scene: Scene, flatten: bool) -> None:
    layer = gnu_long("ok/" + "n" * 300) + raw("x", b"x") + END
    refused(scene, [layer], flatten, r"entry 1 'ok/n+': cannot create file: File name too long")


@MODES
def test_whiteouts_of_dot_dotdot_empty_refused(scene: Scene, flatten: bool) -> None:
    for name in (".wh..", ".wh...", "d/.wh.", ".wh./"):
        refused(scene, [tar([F("keep", b"k")]), tar([D("d/"), T(name)])], flatten, "whiteout")


# -- hardlinks ----------------------------------------------------------------------------------
@MODES
@pytest.mark.parametrize(
    ("layers", "match"),
    [
        ([[H("h", "t"), F("t", b"t")]], r"entry 1 'h': expected a hardlink to an earlier file"),
        ([[F("t", b"t")], [T(".wh.t"), H("h", "t")]], r"entry 2 'h': .*did not create"),
        ([[F("etc/passwd", b"x")], [H("p", "etc/passwd")]], r"entry 1 'p': .*did not create"),
        (
            [[H("h", "../../outside/canary")]],
            r"entry 1 'h': hardlink target: expected a path inside",
        ),
        ([[D("d/"), H("h", "d")]], r"entry 2 'h': expected a hardlink to a file"),
        ([[L("s", "/"), H("h", "s/etc/passwd")]], r"entry 2 'h': .*did not create"),
    ],
    ids=["later-target", "whited-out", "lower-layer", "dotdot", "directory", "through-symlink"],
)
def test_hardlinks_refused(
    scene: Scene, flatten: bool, layers: list[list[tuple]], match: str
) -> None:
    refused(scene, [tar(ly) for ly in layers], flatten, match)


@MODES
def test_hardlink_to_symlink_to_outside_stays_a_link(scene: Scene, flatten: bool) -> None:
    out = str(scene.outside)
    layer = tar([L("s", out + "/canary"), H("h", "s"), T("p", tarfile.FIFOTYPE), H("hp", "p")])

    def check(rootfs: Path) -> None:
        assert os.readlink(rootfs / "h") == out + "/canary"
        assert stat.S_ISFIFO((rootfs / "hp").lstat().st_mode)

    contained(scene, [layer], flatten, check)


@MODES
def test_hardlink_first_copy_replaced_through_lower_symlink(scene: Scene, flatten: bool) -> None:
    """Flattening walks a layer directory in name order, not tar order: a file reached through
    a lower symlink (b -> a) may replace or remove the first copy of a hardlink group before
    the other names are linked to it."""
    low = tar([D("a/"), F("a/x", b"lower"), D("m/"), L("b", "a"), L("n", "m")])
    top = tar(
        [
            F("a/x", b"X"),
            H("c", "a/x"),  # a sequential untar links the "X" file
            F("b/x", b"through b"),  # then replaces a/x through the symlink
            F("m/y", b"Y"),
            H("z", "m/y"),
            T("n/.wh..wh..opq"),  # an opaque dir through a symlink: m/y goes
        ]
    )

    def check(rootfs: Path) -> None:
        assert _inside(rootfs, "c") == b"X"
        assert _inside(rootfs, "z") == b"Y"
        if flatten:
            assert _inside(rootfs, "a/x") == b"through b"

    contained(scene, [low, top], flatten, check)


# -- entry types and metadata --------------------------------------------------------------------
@MODES
@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (T("dev/sda", tarfile.BLKTYPE, dev=(8, 0)), r"entry 1 'dev/sda': device nodes are refused"),
        (T("dev/mem", tarfile.CHRTYPE, dev=(1, 1)), r"device nodes are refused"),
        (T("w", tarfile.CHRTYPE, dev=(0, 0)), r"character device 0:0 is refused"),
        (T("v", b"V"), r"entry 1 'v': unsupported tar entry type"),
    ],
    ids=["block", "char", "char-0-0", "volume-header"],
)
def test_special_entries_refused(scene: Scene, flatten: bool, entry: tuple, match: str) -> None:
    refused(scene, [tar([entry])], flatten, match)


@MODES
def test_modes_with_type_bits_and_setuid(scene: Scene, flatten: bool) -> None:
    layer = (
        raw("typed", b"x", mode=0o170777)
        + raw("su", b"x", mode=0o6755)
        + raw("p", kind=tarfile.FIFOTYPE, mode=0o4777)
        + raw("d", kind=tarfile.DIRTYPE, mode=0o40000)
        + raw("d/f", b"in a 000 dir")
        + END
    )

    def check(rootfs: Path) -> None:
        assert stat.S_ISREG((rootfs / "typed").lstat().st_mode)
        assert stat.S_IMODE((rootfs / "typed").lstat().st_mode) == 0o777
        assert stat.S_IMODE((rootfs / "su").lstat().st_mode) == 0o6755  # kept: we are root
        assert stat.S_ISFIFO((rootfs / "p").lstat().st_mode)
        assert stat.S_IMODE((rootfs / "d").lstat().st_mode) == 0
        assert _inside(rootfs, "d/f") == b"in a 000 dir"

    contained(scene, [layer], flatten, check)


@MODES
def test_odd_times_and_big_owner_numbers(scene: Scene, flatten: bool) -> None:
    layer = (
        pax("nan", {"mtime": "nan"}, b"x")
        + pax("inf", {"mtime": "1e400"}, b"x")
        + pax("neg", {"mtime": "-1e18"}, b"x")
        + pax("owner", {"uid": str(2**32 - 2), "gid": str(2**31)}, b"x")
        + raw("sym", kind=tarfile.SYMTYPE, linkname=str(scene.outside / "canary"), mtime=1)
        + END
    )

    def check(rootfs: Path) -> None:
        assert (rootfs / "owner").lstat().st_uid == 2**32 - 2
        assert (rootfs / "sym").lstat().st_mtime == 1

    contained(scene, [layer], flatten, check)


# -- sparse files --------------------------------------------------------------------------------
def sparse10(name: str, realsize: int, extents: list[tuple[int, int]], data: bytes) -> bytes:
    """A PAX GNU sparse 1.0 member: the map heads the data blocks."""
    head = f"{len(extents)}\n" + "".join(f"{o}\n{n}\n" for o, n in extents)
    body = _pad(head.encode()) + data
    records = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(realsize),
    }
    return pax("GNUSparseFile.0/" + name, records, body)


@MODES
@pytest.mark.parametrize(
    ("member", "match"),
    [
        (sparse10("s", 1000, [(5000, 512)], b"s" * 512), r"sparse extents in order within"),
        (sparse10("s", 1000, [(-5000, 512)], b"s" * 512), r"sparse extents in order within"),
        (sparse10("s", 2000, [(0, 512), (100, 512)], b"s" * 1024), r"sparse extents in order"),
        (sparse10("s", -5, [(0, 0)], b""), r"expected a size of 0 or more"),
        (pax("s", {"GNU.sparse.map": "0,zz", "GNU.sparse.size": "5"}, b"s"), r"valid tar header"),
    ],
    ids=["beyond-size", "negative-offset", "overlap", "negative-realsize", "bad-map"],
)
def test_bad_sparse_maps_refused(scene: Scene, flatten: bool, member: bytes, match: str) -> None:
    refused(scene, [member + END], flatten, match)


@MODES
def test_sparse_hole_counts_against_max_layer_size(scene: Scene, flatten: bool) -> None:
    layer = sparse10("s", 50 << 20, [(0, 512), (50 << 20, 0)], b"s" * 512) + END
    msg = refused(
        scene, [layer], flatten, r"'s': a 52428800-byte file would take the layer past "
        r"--max-layer-size", limits=UnpackLimits(max_layer_size=10 << 20),
    )  # fmt: skip
    assert "layer sha256:" in msg
    ok = sparse10("t", 8192, [(0, 512), (4096, 512)], b"a" * 512 + b"b" * 512) + END
    rootfs = contained(scene, [ok], flatten)
    assert _inside(rootfs, "t") == b"a" * 512 + b"\0" * 3584 + b"b" * 512 + b"\0" * 3584


@MODES
def test_sparse_holes_stay_holes(scene: Scene, flatten: bool) -> None:
    """Within the limit, a sparse member costs the disk its data, not its declared size."""
    big = 64 << 20
    layer = sparse10("s", big, [(0, 512), (big - 4096, 512)], b"a" * 512 + b"b" * 512) + END
    rootfs = contained(scene, [layer], flatten)
    st = (rootfs / "s").stat()
    assert st.st_size == big and st.st_blocks * 512 < 1 << 20, st
    with (rootfs / "s").open("rb") as f:
        assert f.read(1024) == b"a" * 512 + b"\0" * 512
        f.seek(big - 4096)
        assert f.read() == b"b" * 512 + b"\0" * 3584


# -- bombs ---------------------------------------------------------------------------------------
@MODES
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compression_bomb_past_max_layer_size(
    scene: Scene, flatten: bool, compression: str
) -> None:
    layer = tar([F("zeros", b"\0" * (24 << 20))])
    blob = gzip.compress(layer, 9) if compression == "gzip" else zstandard.compress(layer, 19)
    assert len(blob) < 200_000
    ref = push_blobs(scene.reg, [layer], compression=compression, blobs=[blob])
    refused(
        scene, [], flatten, r"layer sha256:[0-9a-f]{64}.*max-layer-size",
        limits=UnpackLimits(max_layer_size=8 << 20), ref=ref,
    )  # fmt: skip


@MODES
def test_many_tiny_entries_past_max_files(scene: Scene, flatten: bool) -> None:
    layer = tar([F(f"f{i}") for i in range(3000)])
    refused(
        scene, [tar([F("ok", b"1")]), layer], flatten, r"entry 1001 'f1000': more entries than "
        r"--max-files allows \(1000\)", limits=UnpackLimits(max_files=1000),
    )  # fmt: skip


@MODES
def test_deep_directories_past_max_depth(scene: Scene, flatten: bool) -> None:
    refused(
        scene, [tar([F("a/" * 200 + "f", b"x")])], flatten,
        r"expected at most 128 path components, found 201",
    )  # fmt: skip


@MODES
def test_declared_size_longer_than_the_data(scene: Scene, flatten: bool) -> None:
    head = raw("big", b"")
    head = with_field(head, 124, b"%011o\0" % (1 << 30))  # 1 GiB declared, 4 KiB given
    refused(scene, [head + b"x" * 4096], flatten, r"found it truncated in entry 1 'big'")


@MODES
@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (gnu_long("a" * 20) * 40 + raw("x", b"x") + END, r"at most 16 chained extension headers"),
        (pax("x", {"comment": "c" * (2 << 20)}, b"x") + END, r"extension header of at most"),
        (
            b"".join(
                with_field(pax("g", {f"k{i}": "v"})[:1024], 156, tarfile.XGLTYPE)
                + raw(f"x{i}", b"x")
                for i in range(100)
            )
            + END,
            r"at most 64 PAX global header records",
        ),
        (
            with_field(raw("b256", b"x" * 512), 124, b"\xff" * 12) + END,
            r"entry 1 'b256': expected a size of 0 or more, found -1",
        ),
    ],
    ids=["header-chain", "huge-pax", "global-records", "base256-negative"],
)
def test_header_bombs_refused(scene: Scene, flatten: bool, layer: bytes, match: str) -> None:
    refused(scene, [layer], flatten, match)


@MODES
@pytest.mark.timeout(120)  # a FIFO opened for reading blocks: the pull would hang
@pytest.mark.parametrize("kind", ["fifo", "symlink", "symlink-dir"])
def test_config_user_lookup_never_leaves_the_rootfs(scene: Scene, flatten: bool, kind: str) -> None:
    """The bundle's config.json resolves User in the image's /etc/passwd: a FIFO there must not
    hang the pull, a symlink to the canary's passwd must not be read (the user exists only
    there). The pull is refused, and takes back its layers and bundle."""
    (scene.outside / "passwd").write_bytes(b"canaryuser:x:4242:4242::/:/bin/sh\n")
    out = str(scene.outside)
    layer = {
        "fifo": tar(
            [D("etc/"), T("etc/passwd", tarfile.FIFOTYPE), T("etc/group", tarfile.FIFOTYPE)]
        ),
        "symlink": tar([D("etc/"), L("etc/passwd", out + "/passwd")]),
        "symlink-dir": tar([L("etc", out)]),
    }[kind]
    ref = push_blobs(scene.reg, [layer], config={"Cmd": ["/bin/sh"], "User": "canaryuser"})
    match = r"^image config User 'canaryuser': expected user 'canaryuser' in the image's /etc/passwd, found none$"
    refused(scene, [], flatten, match, ref=ref, names="image config")


# -- the CLI -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "overlay"])
def test_cli_hostile_pull_one_line_and_nothing_left(
    scene: Scene, flatten: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    from coco.cli.main import main

    out = str(scene.outside)
    ok = push_blobs(scene.reg, [tar([L("etc", out)]), tar([F("etc/canary", b"x")])])
    bad = push_blobs(scene.reg, [tar([L("etc", out)]), tar([L("s", out), F("s/canary", b"x")])])
    before = scene.snapshot()
    args = ["image", "pull", "-q", "--tls-verify=false", "--store", str(scene.store.root)]
    if flatten:
        args.append("--flatten")

    def cli(*extra: str) -> int:
        try:
            main([*args, *extra])
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    assert cli(bad, str(scene.bundle)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "entry 2 's/canary'" in err and "symlink" in err
    assert not os.path.lexists(scene.bundle) and os.listdir(scene.store.root / "tmp") == []
    assert scene.store.layers() == []
    assert cli(ok, str(scene.bundle)) == 0
    assert scene.snapshot() == before
    assert (scene.bundle / "rootfs" / "etc").is_symlink() or flatten is False


@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "overlay"])
def test_cli_bombs_past_the_limit_flags(
    scene: Scene, flatten: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    from coco.cli.main import main

    zeros = tar([F("zeros", b"\0" * (24 << 20))])
    bomb = push_blobs(scene.reg, [zeros], blobs=[gzip.compress(zeros, 9)])
    many = push_blobs(scene.reg, [tar([F("ok", b"1")]), tar([F(f"f{i}") for i in range(300)])])
    sparse = push_blobs(scene.reg, [sparse10("s", 1 << 30, [(0, 512)], b"s" * 512) + END])
    before = scene.snapshot()
    args = ["image", "pull", "-q", "--tls-verify=false", "--store", str(scene.store.root)]
    args += ["--flatten"] if flatten else []

    def cli(*extra: str) -> int:
        try:
            main([*args, *extra, str(scene.bundle)])
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    for extra, expect in [
        (["--max-layer-size", "8M", bomb], "max-layer-size"),
        (["--max-layer-size", "8M", sparse], "'s': a 1073741824-byte file"),
        (["--max-files", "100", many], "entry 101 'f100': more entries than --max-files"),
    ]:
        assert cli(*extra) == 1, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expect in err and "layer sha256:" in err, err
        assert not os.path.lexists(scene.bundle)
        assert os.listdir(scene.store.root / "tmp") == [] and scene.store.layers() == []
    assert scene.snapshot() == before
