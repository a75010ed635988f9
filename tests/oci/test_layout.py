"""OCI layouts: reading by tag, atomic writes, interop with umoci and skopeo."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from coco.errors import DigestMismatchError, OciError
from coco.oci.copy import copy_image
from coco.oci.layout import REF_NAME, OciLayout
from tests.imagekit import tar_layer, write_image, write_index


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_read_by_tag(tmp_path: Path) -> None:
    img = write_image(tmp_path / "l", [tar_layer({"etc/motd": b"hello\n"})], tag="v1")
    lay = OciLayout.open(tmp_path / "l")
    m, cfg = lay.image("v1")
    assert m.digest == img.manifest_digest
    assert cfg.diff_ids == tuple(img.diff_ids)
    assert lay.read_blob(img.layer_digests[0]) == img.layers[0]
    assert lay.tags() == ["v1"]
    with pytest.raises(OciError, match=r"l:nope: no such tag"):
        lay.resolve("nope")


def test_not_a_layout(tmp_path: Path) -> None:
    with pytest.raises(OciError, match="not an OCI layout"):
        OciLayout.open(tmp_path)


def test_retag_replaces_entry(tmp_path: Path) -> None:
    a = write_image(tmp_path / "l", [tar_layer({"a": b"1"})], tag="v1")
    b = write_image(tmp_path / "l", [tar_layer({"a": b"2"})], tag="v1")
    write_image(tmp_path / "l", [tar_layer({"a": b"3"})], tag="v2")
    idx = json.loads((tmp_path / "l" / "index.json").read_bytes())
    names = [e["annotations"][REF_NAME] for e in idx["manifests"]]
    assert sorted(names) == ["v1", "v2"]
    assert (
        OciLayout.open(tmp_path / "l").resolve("v1").digest
        == b.manifest_digest
        != a.manifest_digest
    )


def test_transaction_failure_leaves_layout_unchanged(tmp_path: Path) -> None:
    write_image(tmp_path / "l", [tar_layer({"a": b"1"})], tag="v1")
    before = snapshot(tmp_path / "l")
    lay = OciLayout.open(tmp_path / "l")

    def chunks():
        yield b"x" * 1000
        raise DigestMismatchError("boom")

    with pytest.raises(DigestMismatchError), lay.transaction() as tx:
        tx.put_bytes(b"a complete blob")
        tx.write_blob(chunks())
    assert snapshot(tmp_path / "l") == before
    assert not [n for n in os.listdir(tmp_path / "l") if n.startswith(".coco")]


def test_write_blob_checks_digest(tmp_path: Path) -> None:
    lay = OciLayout.init(tmp_path / "l")
    before = snapshot(tmp_path / "l")
    with pytest.raises(DigestMismatchError, match="digest mismatch"), lay.transaction() as tx:
        tx.write_blob([b"abc"], expected_digest="sha256:" + "0" * 64, what="layer 1")
    with (
        pytest.raises(DigestMismatchError, match="truncated: expected 10 bytes, received 3"),
        lay.transaction() as tx,
    ):
        tx.write_blob([b"abc"], expected_size=10, what="layer 1")
    assert snapshot(tmp_path / "l") == before


def test_corrupt_blob_copy_leaves_destination_unchanged(tmp_path: Path) -> None:
    img = write_image(tmp_path / "src", [tar_layer({"a": b"1" * 5000}), tar_layer({"b": b"2"})])
    blob = tmp_path / "src" / "blobs" / "sha256" / img.layer_digests[1].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    write_image(tmp_path / "dst", [tar_layer({"z": b"z"})], tag="old")
    before = snapshot(tmp_path / "dst")
    with pytest.raises(DigestMismatchError) as e:
        copy_image(f"oci:{tmp_path / 'src'}:latest", f"oci:{tmp_path / 'dst'}:latest")
    msg = str(e.value)
    assert f"layer 2/2 {img.layer_digests[1]}" in msg and "digest mismatch" in msg
    assert str(tmp_path / "src") in msg
    assert snapshot(tmp_path / "dst") == before
    # A brand-new destination directory is not left behind either.
    with pytest.raises(DigestMismatchError):
        copy_image(f"oci:{tmp_path / 'src'}:latest", f"oci:{tmp_path / 'new'}:latest")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DigestMismatchError):
        copy_image(f"oci:{tmp_path / 'src'}:latest", f"oci:{tmp_path / 'empty'}:latest")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_truncated_blob(tmp_path: Path) -> None:
    img = write_image(tmp_path / "src", [tar_layer({"a": os.urandom(3000)})], compression="none")
    blob = tmp_path / "src" / "blobs" / "sha256" / img.layer_digests[0].split(":")[1]
    blob.write_bytes(blob.read_bytes()[:100])
    with pytest.raises(DigestMismatchError, match="truncated: expected"):
        copy_image(f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}:x")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("compression", ["gzip", "none", "zstd"])
def test_umoci_unpacks_what_we_wrote(tmp_path: Path, compression: str) -> None:
    layers = [
        tar_layer({"etc/motd": b"one\n", "bin/sh": "->busybox", "var/": None}),
        tar_layer({"etc/motd": b"two\n", "etc/.wh.gone": b""}),
    ]
    write_image(tmp_path / "src", layers, tag="v1", compression=compression)
    copy_image(f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'dst'}:copied")
    if compression == "zstd":
        # umoci 0.4.7 does not know zstd layers: check the layout with skopeo instead
        out = subprocess.run(
            ["skopeo", "inspect", f"oci:{tmp_path / 'dst'}:copied"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert len(json.loads(out)["Layers"]) == 2
        return
    subprocess.run(
        [
            "umoci",
            "unpack",
            "--rootless",
            "--image",
            f"{tmp_path / 'dst'}:copied",
            str(tmp_path / "bundle"),
        ],
        check=True,
        capture_output=True,
    )
    root = tmp_path / "bundle" / "rootfs"
    assert (root / "etc" / "motd").read_bytes() == b"two\n"
    assert os.readlink(root / "bin" / "sh") == "busybox"


def test_index_platform_pick_and_all(tmp_path: Path) -> None:
    idx = write_index(
        tmp_path / "src",
        [
            ("linux", "amd64", [tar_layer({"a": b"amd"})]),
            ("linux", "arm64", [tar_layer({"a": b"arm"})]),
        ],
        tag="multi",
    )
    r = copy_image(
        f"oci:{tmp_path / 'src'}:multi",
        f"oci:{tmp_path / 'one'}:x",
        options=_opts(override_arch="arm64"),
    )
    assert r.manifest_digest == idx.images[1].manifest_digest
    r = copy_image(
        f"oci:{tmp_path / 'src'}:multi",
        f"oci:{tmp_path / 'all'}:x",
        options=_opts(all_platforms=True),
    )
    assert r.manifest_digest == idx.index_digest
    lay = OciLayout.open(tmp_path / "all")
    for im in idx.images:
        assert lay.has_blob(im.manifest_digest) and lay.has_blob(im.layer_digests[0])
    # skopeo agrees the layout holds a valid index with both images
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{tmp_path / 'all'}:x"], check=True, capture_output=True
    ).stdout
    assert raw == idx.index


def _opts(**kw):
    from coco.oci.copy import CopyOptions

    return CopyOptions(**kw)
