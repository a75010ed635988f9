"""tarfs index and tardev layer files against the reference vectors, GNU tar and veritysetup."""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from coco.errors import TarIndexError
from coco.integrity import tardev, tarindex
from tests.cli.run import invoke

from .conftest import VECTORS, ZERO_SALT, run_main, veritysetup

NAMES = ["t_edge", "t_gnu", "t_pax", "t_gnutar", "t_posixtar", "t_many"]


def _readme() -> dict[tuple[str, int], dict[str, str]]:
    out = {}
    for line in (VECTORS / "README.txt").read_text().splitlines():
        m = re.match(r"^(t_\w+)\.tar (\(V1[^)]*\) )?(.*)$", line)
        if not m:
            continue
        fields = dict(kv.split("=", 1) for kv in m.group(3).split())
        out[(m.group(1), 1 if m.group(2) else 2)] = fields
    return out


README = _readme()
CASES = sorted(README)  # (name, version)


def _ref(name: str, version: int) -> Path:
    return VECTORS / (f"{name}.tar.indexed" + (".v1" if version == 1 else ""))


def test_readme_lists_every_vector():
    assert {n for n, _ in CASES} == set(NAMES)
    assert {(n, v) for n, v in CASES if v == 1} == {("t_edge", 1), ("t_gnu", 1), ("t_pax", 1)}


@pytest.mark.parametrize(("name", "version"), CASES)
def test_append_index_is_byte_exact(tmp_path, name, version):
    tar = tmp_path / "x.tar"
    shutil.copyfile(VECTORS / f"{name}.tar", tar)
    stats = tarindex.append_index(tar, version=version)
    assert tar.read_bytes() == _ref(name, version).read_bytes()
    assert stats.tar_size == (VECTORS / f"{name}.tar").stat().st_size
    assert tar.stat().st_size == int(README[(name, version)]["indexed_size"])


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
@pytest.mark.parametrize(("name", "version"), CASES)
def test_convert_layer_file(tmp_path, name, version, compression):
    raw = (VECTORS / f"{name}.tar").read_bytes()
    layer = tmp_path / "layer"
    if compression == "gzip":
        layer.write_bytes(gzip.compress(raw))
    elif compression == "zstd":
        layer.write_bytes(zstandard.ZstdCompressor().compress(raw))
    else:
        layer.write_bytes(raw)
    out = tmp_path / "out"
    res = tardev.convert(layer, out, version=version)
    want_root = README[(name, version)]["verity_root"]
    assert res.root_hash.hex() == want_root
    assert res.compression == compression
    indexed = _ref(name, version).read_bytes()
    blob = out.read_bytes()
    n = len(indexed) // 4096
    assert blob[: len(indexed)] == indexed
    # the tree is what veritysetup writes for the genpolicy parameters
    ref_tree = tmp_path / "tree"
    r = veritysetup(
        "format",
        "--no-superblock",
        "--format=1",
        "--hash=sha256",
        f"--salt={ZERO_SALT}",
        _ref(name, version),
        ref_tree,
    )
    assert r.returncode == 0, r.stderr
    assert want_root in r.stdout
    tree = ref_tree.read_bytes()
    assert blob[len(indexed) : len(indexed) + len(tree)] == tree
    trailer = blob[len(indexed) + len(tree) :]
    assert len(trailer) == 4096
    assert trailer[3584:3600] == (4096).to_bytes(4, "little") * 2 + n.to_bytes(8, "little")
    assert trailer.count(0) == 4096 - trailer[3584:3600].count(0) * 0 - sum(
        1 for b in trailer[3584:3600] if b
    )
    # and veritysetup verifies the whole layer file the way the guest maps it
    r = veritysetup(
        "verify",
        "--data-block-size=4096",
        "--hash-block-size=4096",
        f"--data-blocks={n}",
        f"--hash-offset={n * 4096}",
        "--no-superblock",
        f"--salt={ZERO_SALT}",
        out,
        out,
        want_root,
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", ["t_gnu", "t_pax"])
def test_index_only(tmp_path, name):
    out = tmp_path / "idx"
    res = invoke(["tardev", "convert", str(VECTORS / f"{name}.tar"), str(out), "--index-only"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == README[(name, 2)]["verity_root"]
    assert out.read_bytes() == _ref(name, 2).read_bytes()


def test_cli_v1(tmp_path):
    out = tmp_path / "idx"
    res = invoke(
        [
            "tardev",
            "convert",
            str(VECTORS / "t_edge.tar"),
            str(out),
            "--index-only",
            "--tarindex-version=1",
        ],
    )
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == _ref("t_edge", 1).read_bytes()


def _gnu_tar_files(tar: Path, dest: Path) -> dict[str, bytes]:
    dest.mkdir()
    subprocess.run(
        ["tar", "-xf", str(tar), "-C", str(dest), "--no-same-owner"],
        check=True,
        capture_output=True,
    )
    return {
        "/" + str(p.relative_to(dest)): p.read_bytes()
        for p in dest.rglob("*")
        if p.is_file() and not p.is_symlink() and ".wh." not in p.name
    }


@pytest.mark.parametrize("name", ["t_many", "t_gnutar", "t_posixtar"])
def test_inspect_agrees_with_gnu_tar(tmp_path, name):
    out = tmp_path / "layer"
    tardev.convert(VECTORS / f"{name}.tar", out)
    info = tardev.inspect(out)
    assert info.layer_file and info.tree_ok
    assert info.root_hash.hex() == README[(name, 2)]["verity_root"]
    blob = out.read_bytes()
    ours = {e.path: blob[e.offset : e.offset + e.size] for e in info.entries if e.kind == "-"}
    theirs = _gnu_tar_files(VECTORS / f"{name}.tar", tmp_path / "x")
    assert ours == theirs
    links = {e.path: e.target for e in info.entries if e.kind == "l"}
    for path, target in links.items():
        assert (tmp_path / "x" / path.lstrip("/")).readlink().as_posix() == target


def test_inspect_cli_json_and_text(tmp_path):
    out = tmp_path / "layer"
    tardev.convert(VECTORS / "t_gnu.tar", out)
    res = invoke(["tardev", "inspect", str(out), "--format=json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["kind"] == "layer" and doc["tree_matches"] is True
    by_path = {e["path"]: e for e in doc["entries"]}
    assert by_path["/bin/busybox"]["ino"] == by_path["/bin/hard"]["ino"]  # one shared inode
    assert by_path["/bin/busybox"]["mode"] == "100755"  # setuid dropped
    assert by_path["/deleted"]["type"] == "c" and by_path["/bin/old"]["type"] == "c"
    assert by_path["/opq"]["opaque"] is True
    assert by_path["/dev/null"]["offset"] == (1 << 32) | 3
    assert by_path["/big"]["uid"] == 3000000
    res = invoke(["tardev", "inspect", str(VECTORS / "t_gnu.tar.indexed")])
    assert res.exit_code == 0, res.output
    assert "indexed tar" in res.output and README[("t_gnu", 2)]["verity_root"] in res.output
    assert re.search(r" /bin/sh -> busybox$", res.output, re.M)


# --- hostile and odd input: one clear line, no output, no temporary left behind ---------------


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"hello") -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def _bad_inputs() -> dict[str, tuple[bytes, str]]:
    good = _tar([_file("a"), _file("b", b"x" * 3000)])
    bad_sum = bytearray(good)
    bad_sum[0] ^= 1
    contiguous = tarfile.TarInfo("c")
    contiguous.type = tarfile.CONTTYPE
    bad_mode = bytearray(_tar([_file("m")]))
    bad_mode[100:108] = b"zzzzzzz\0"
    bad_mode[148:156] = b"        "
    bad_mode[148:156] = f"{sum(bad_mode[:512]):06o}\0 ".encode()
    pax = bytearray(_tar([_file("p" * 120)], fmt=tarfile.PAX_FORMAT))
    pax[512:514] = b"99"  # record length that overruns
    return {
        "truncated data": (good[:1000], "truncated"),
        "truncated header": (good[: 512 + 512 + 100], "truncated"),
        "bad checksum": (bytes(bad_sum), "checksum mismatch"),
        "contiguous file": (_tar([(contiguous, b"")]), "type b'7'"),
        "bad mode": (bytes(bad_mode), "mode: expected an octal number"),
        "bad gzip": (gzip.compress(good)[:-20], "cannot decompress"),
        "bad zstd": (zstandard.ZstdCompressor().compress(good)[:-9], "cannot decompress"),
        "dangling long name": (_tar([_file("n" * 200)])[:1024] + bytes(1024), "never comes"),
        "bad pax": (bytes(pax), "PAX record"),
    }


@pytest.mark.parametrize("case", sorted(_bad_inputs()))
def test_bad_layers_fail_cleanly(tmp_path, case):
    data, message = _bad_inputs()[case]
    src = tmp_path / "in" / "layer"
    src.parent.mkdir()
    src.write_bytes(data)
    outdir = tmp_path / "out"
    outdir.mkdir()
    code, err = run_main(["tardev", "convert", str(src), str(outdir / "layer.img")])
    assert code == 1
    assert err.startswith("coco: error: ") and err.count("\n") == 1, err
    assert message in err
    assert str(src) in err
    assert list(outdir.iterdir()) == []
    if case == "bad checksum":  # GNU tar refuses it too
        assert subprocess.run(["tar", "-tf", str(src)], capture_output=True).returncode != 0


def test_existing_output_is_kept_on_failure(tmp_path):
    out = tmp_path / "out"
    out.write_bytes(b"previous")
    src = tmp_path / "bad.tar"
    src.write_bytes(b"\x01" * 600)
    with pytest.raises(TarIndexError):
        tardev.convert(src, out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar", "out"]


def test_index_semantics_on_a_fresh_tar(tmp_path):
    """Overwrites, whiteouts, '..' and hardlinks, read back through inspect."""
    d = tarfile.TarInfo("d")
    d.type = tarfile.DIRTYPE
    d.mode = 0o7755
    link = tarfile.TarInfo("d/hl")
    link.type = tarfile.LNKTYPE
    link.linkname = "d/../f"
    wh = _file("d/.wh.gone", b"")
    data = _tar(
        [
            _file("f", b"one"),
            (d, None),
            _file("d/gone"),
            wh,
            (link, None),
            _file("f", b"two!"),
            _file("../escape"),
        ]
    )
    src = tmp_path / "l.tar"
    src.write_bytes(data)
    out = tmp_path / "o"
    tardev.convert(src, out)
    info = tardev.inspect(out)
    by = {e.path: e for e in info.entries}
    assert set(by) == {"/", "/d", "/d/gone", "/d/hl", "/f"}
    assert by["/d"].mode == 0o040755
    assert by["/d/gone"].kind == "c"
    blob = out.read_bytes()
    assert blob[by["/f"].offset : by["/f"].offset + by["/f"].size] == b"two!"
    # the hardlink shares the inode of "f"; the later "f" entry rewrites that inode in place,
    # so both names show the new content (as with the reference tarindex)
    assert by["/d/hl"].ino == by["/f"].ino
    assert blob[by["/d/hl"].offset : by["/d/hl"].offset + by["/d/hl"].size] == b"two!"


@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar"])
def test_gnu_tar_archives_read_back_as_gnu_tar_extracts_them(tmp_path, fmt):
    """Archives written by GNU tar (long names, a long symlink, hardlinks) as tarfs sees them."""
    src = tmp_path / "src"
    deep = src / "d" / ("x" * 60) / ("y" * 60) if fmt != "ustar" else src / "d" / "x"
    deep.mkdir(parents=True)
    (deep / "file").write_bytes(b"payload" * 100)
    (src / "d" / "hard").hardlink_to(deep / "file")
    (src / "d" / "short").symlink_to("x")
    if fmt != "ustar":
        (src / "d" / "long").symlink_to("/" + "t" * 150)
    (src / "empty").mkdir()
    tar = tmp_path / "a.tar"
    subprocess.run(["tar", f"--format={fmt}", "-cf", str(tar), "-C", str(src), "."], check=True)
    out = tmp_path / "layer"
    tardev.convert(tar, out)
    info = tardev.inspect(out)
    assert info.tree_ok
    blob = out.read_bytes()
    ours = {e.path: blob[e.offset : e.offset + e.size] for e in info.entries if e.kind == "-"}
    assert ours == _gnu_tar_files(tar, tmp_path / "x")
    by = {e.path: e for e in info.entries}
    assert by["/d/hard"].ino == by[f"/{deep.relative_to(src)}/file"].ino
    assert by["/d/short"].target == "x"
    if fmt != "ustar":
        assert by["/d/long"].target == "/" + "t" * 150
    assert by["/empty"].kind == "d" and by["/empty"].size == 0


def test_inspect_prints_a_veritysetup_command_that_works(tmp_path):
    out = tmp_path / "layer"
    tardev.convert(VECTORS / "t_pax.tar", out)
    res = invoke(["tardev", "inspect", str(out)])
    line = next(x for x in res.output.splitlines() if x.startswith("Check with: veritysetup "))
    args = line.split()[3:]
    assert veritysetup(*args).returncode == 0
    args[-1] = "00" * 32
    assert veritysetup(*args).returncode != 0


def test_pax_global_header_is_skipped(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "made by a test"}
    ) as tf:
        info, data = _file("only")
        tf.addfile(info, io.BytesIO(data))
    src = tmp_path / "g.tar"
    src.write_bytes(buf.getvalue())
    assert buf.getvalue()[156:157] == b"g"
    tardev.convert(src, tmp_path / "out")
    paths = [e.path for e in tardev.inspect(tmp_path / "out").entries]
    assert paths == ["/", "/only"]


def test_gnu_sparse_member_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "holes", "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    tar = tmp_path / "s.tar"
    subprocess.run(
        ["tar", "--sparse", "--format=gnu", "-cf", str(tar), "-C", str(src), "holes"], check=True
    )
    with pytest.raises(TarIndexError, match=r"'holes' at offset 0: type b'S' is an entry type"):
        tardev.convert(tar, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tar", "src"]


def test_pax_size_that_disagrees_with_the_header_is_refused(tmp_path):
    info, data = _file("f", b"x" * 10)
    info.pax_headers = {"size": "20"}
    raw = _tar([(info, data)], fmt=tarfile.PAX_FORMAT)
    src = tmp_path / "p.tar"
    src.write_bytes(raw)
    with pytest.raises(TarIndexError, match="PAX size 20 disagrees with the header size 10"):
        tardev.convert(src, tmp_path / "out")


def test_layer_root_hash(tmp_path):
    layer = tmp_path / "l.tar.gz"
    layer.write_bytes(gzip.compress((VECTORS / "t_many.tar").read_bytes()))
    assert tardev.layer_root_hash(layer).hex() == README[("t_many", 2)]["verity_root"]
    assert (
        tardev.layer_root_hash(VECTORS / "t_pax.tar", version=1).hex()
        == (README[("t_pax", 1)]["verity_root"])
    )


def test_hardlink_below_itself_is_refused(tmp_path):
    """The reference would loop forever on this tree; we stop with an error."""
    link = tarfile.TarInfo("a/b")
    link.type = tarfile.LNKTYPE
    link.linkname = "a"
    src = tmp_path / "cycle.tar"
    src.write_bytes(_tar([_file("a"), (link, None)]))
    with pytest.raises(TarIndexError, match="the parent of b'b' is a regular file"):
        tardev.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
