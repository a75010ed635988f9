"""The LayerTransform hook of copy_image, with a trivial transform (gzip an uncompressed layer)."""

from __future__ import annotations

import json
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from coco.errors import CocoError, DigestMismatchError
from coco.oci import mediatypes as mt
from coco.oci.copy import CopyOptions, TransformedLayer, copy_image
from coco.oci.layout import OciLayout
from coco.oci.models import Descriptor
from tests.conftest import Registry
from tests.imagekit import tar_layer, write_image
from tests.layout_snapshot import snapshot


class Gzip:
    """Gzips uncompressed layers; optionally fails at the end of the stream."""

    requires_oci = True

    def __init__(self, fail_at_end: bool = False) -> None:
        self.fail_at_end = fail_at_end
        self.calls: list[tuple[int, int, str]] = []

    def wants(self, index: int, total: int, layer: Descriptor) -> bool:
        return mt.compression(layer.media_type) == "none"

    def apply(
        self, index: int, total: int, layer: Descriptor, chunks: Iterator[bytes]
    ) -> TransformedLayer:
        self.calls.append((index, total, layer.media_type))

        def gen() -> Iterator[bytes]:
            z = zlib.compressobj(6, zlib.DEFLATED, 31)
            for c in chunks:
                yield z.compress(c)
            yield z.flush()
            if self.fail_at_end:
                raise CocoError(f"layer {index + 1}: HMAC mismatch")

        def descriptor(digest: str, size: int) -> Descriptor:
            return layer.with_(
                media_type=mt.OCI_LAYER_GZIP,
                digest=digest,
                size=size,
                annotations={"org.example.gzipped": "yes"},
            )

        return TransformedLayer(gen(), descriptor)


def test_transform_converts_docker_to_oci_and_umoci_unpacks(tmp_path: Path) -> None:
    layers = [tar_layer({"etc/a": b"plain " * 1000}), tar_layer({"etc/b": b"second"})]
    img = write_image(tmp_path / "src", layers, docker=True, compression="none", tag="v1")
    t = Gzip()
    r = copy_image(img.ref, f"oci:{tmp_path / 'dst'}:v1", transform=t)
    # wants/apply saw every layer with the OCI media type they will get
    assert sorted(t.calls) == [(0, 2, mt.OCI_LAYER), (1, 2, mt.OCI_LAYER)]
    m, cfg = OciLayout.open(tmp_path / "dst").image("v1")
    assert m.media_type == mt.OCI_MANIFEST and m.config.media_type == mt.OCI_CONFIG
    assert [d.media_type for d in m.layers] == [mt.OCI_LAYER_GZIP] * 2
    assert all(d.annotations == {"org.example.gzipped": "yes"} for d in m.layers)
    assert m.config.digest == img.config_digest  # config never transformed
    assert cfg.diff_ids == tuple(img.diff_ids)
    assert r.manifest_digest == m.digest
    lay = OciLayout.open(tmp_path / "dst")
    for d, plain in zip(m.layers, layers, strict=True):
        assert zlib.decompress(lay.read_blob(d.digest), 31) == plain
    # Go-style serialization: compact, struct order
    obj = json.loads(m.raw)
    assert list(obj) == ["schemaVersion", "mediaType", "config", "layers"]
    assert b" " not in m.raw
    subprocess.run(
        [
            "umoci",
            "unpack",
            "--rootless",
            "--image",
            f"{tmp_path / 'dst'}:v1",
            str(tmp_path / "bundle"),
        ],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "bundle/rootfs/etc/b").read_bytes() == b"second"


def test_untouched_image_keeps_its_bytes(tmp_path: Path) -> None:
    img = write_image(tmp_path / "src", [tar_layer({"a": b"1"})], docker=True, compression="gzip")
    r = copy_image(img.ref, f"oci:{tmp_path / 'dst'}", transform=Gzip())
    assert r.manifest == img.manifest  # no layer wanted: no conversion, same digest


def test_transform_failure_at_end_leaves_layout(tmp_path: Path) -> None:
    img = write_image(tmp_path / "src", [tar_layer({"a": b"x" * 50000})], compression="none")
    write_image(tmp_path / "dst", [tar_layer({"keep": b"1"})], tag="v1")
    before = snapshot(tmp_path / "dst")
    with pytest.raises(CocoError, match="HMAC mismatch"):
        copy_image(img.ref, f"oci:{tmp_path / 'dst'}:v1", transform=Gzip(fail_at_end=True))
    assert snapshot(tmp_path / "dst") == before


def test_transform_source_corrupt(tmp_path: Path) -> None:
    img = write_image(tmp_path / "src", [tar_layer({"a": b"y" * 50000})], compression="none")
    blob = tmp_path / "src/blobs/sha256" / img.layer_digests[0].split(":")[1]
    blob.write_bytes(blob.read_bytes().replace(b"yyyy", b"yyyz", 1))
    with pytest.raises(DigestMismatchError, match=r"layer 1/1 .* digest mismatch"):
        copy_image(img.ref, f"oci:{tmp_path / 'dst'}:v1", transform=Gzip())
    assert not (tmp_path / "dst").exists()


def test_transform_into_registry(registry: Registry, tmp_path: Path) -> None:
    img = write_image(tmp_path / "src", [tar_layer({"r": b"z" * 300_000})], compression="none")
    o = CopyOptions(
        dest_credentials=None,
        authfile=registry.authfile,
        dest_tls_verify=False,
        src_tls_verify=False,
        patch_size=64 * 1024,
    )
    dst = registry.url("coco/transformed", "t")
    with pytest.raises(CocoError, match="HMAC mismatch"):
        copy_image(img.ref, dst, options=o, transform=Gzip(fail_at_end=True))
    with pytest.raises(CocoError, match="404"):
        copy_image(dst, f"oci:{tmp_path / 'x'}", options=o)
    r = copy_image(img.ref, dst, options=o, transform=Gzip())
    raw = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--authfile",
            str(registry.authfile),
            dst,
        ],
        check=True,
        capture_output=True,
    ).stdout
    assert raw == r.manifest
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            "--src-tls-verify=false",
            "--authfile",
            str(registry.authfile),
            dst,
            f"oci:{tmp_path / 'back'}:t",
        ],
        check=True,
        capture_output=True,
    )
    m, cfg = OciLayout.open(tmp_path / "back").image("t")
    assert m.layers[0].media_type == mt.OCI_LAYER_GZIP and cfg.diff_ids == tuple(img.diff_ids)
