"""Strict parsing of manifests, indexes, descriptors and configs; Go-compatible serialization."""

from __future__ import annotations

import json

import pytest

from coco.crypto.digest import Digest
from coco.errors import ManifestError
from coco.oci import mediatypes as mt
from coco.oci.models import Descriptor, ImageConfig, Index, Manifest, go_json, parse_manifest
from tests.imagekit import image_blobs, tar_layer

D = "sha256:" + "ab" * 32


def manifest(**over: object) -> dict:
    m = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": D, "size": 10},
        "layers": [{"mediaType": mt.OCI_LAYER_GZIP, "digest": D, "size": 5}],
    }
    m.update(over)
    return m


def test_parses_and_keeps_raw_bytes() -> None:
    raw = json.dumps(manifest(), indent=3).encode()
    m = parse_manifest(raw)
    assert isinstance(m, Manifest)
    assert m.raw == raw
    assert m.layers[0].size == 5 and m.config.media_type == mt.OCI_CONFIG


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        (
            manifest(layers=[{"mediaType": "application/x-foo", "digest": D, "size": 1}]),
            "unknown layer media type 'application/x-foo'",
        ),
        (manifest(mediaType="application/vnd.example+json"), "unsupported manifest media type"),
        (
            manifest(config={"mediaType": mt.OCI_CONFIG, "digest": "sha256:xyz", "size": 1}),
            "config: digest: expected",
        ),
        (
            manifest(config={"mediaType": mt.OCI_CONFIG, "digest": "md5:" + "a" * 32, "size": 1}),
            "unsupported digest algorithm 'md5'",
        ),
        (
            manifest(layers=[{"mediaType": mt.OCI_LAYER, "digest": D, "size": -1}]),
            "size must be >= 0",
        ),
        (
            manifest(layers=[{"mediaType": mt.OCI_LAYER, "digest": D, "size": "1"}]),
            "layers[0].size: expected an integer, found a string",
        ),
        (
            manifest(layers=[{"mediaType": mt.OCI_LAYER, "digest": D, "size": 1, "extra": 1}]),
            "layers[0]: unknown field 'extra'",
        ),
        (manifest(bogus=True), "unknown field 'bogus'"),
        (manifest(schemaVersion=1), "schemaVersion: expected 2, found 1"),
        (
            {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "layers": []},
            "missing field 'config'",
        ),
        (manifest(annotations={"a": 1}), "annotations.a: expected a string, found an integer"),
    ],
)
def test_refuses_bad_manifests(doc: dict, fragment: str) -> None:
    with pytest.raises(ManifestError) as e:
        parse_manifest(json.dumps(doc).encode(), where="docker://r/x:1: manifest")
    assert fragment in str(e.value)
    assert str(e.value).startswith("docker://r/x:1: manifest")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("raw", [b"<html>oops</html>", b"", b"\xff\xfe", b"[1,2]", b'{"a":'])
def test_refuses_non_json(raw: bytes) -> None:
    with pytest.raises(ManifestError, match=r"manifest: (not valid JSON|expected a JSON object)"):
        parse_manifest(raw, mt.OCI_MANIFEST)


def test_media_type_served_differs_from_document() -> None:
    raw = json.dumps(manifest()).encode()
    with pytest.raises(ManifestError, match="media type mismatch"):
        parse_manifest(raw, mt.DOCKER_MANIFEST)


def test_index_and_platform_selection() -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [
            {
                "mediaType": mt.OCI_MANIFEST,
                "digest": D,
                "size": 1,
                "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"},
            },
            {
                "mediaType": mt.OCI_MANIFEST,
                "digest": "sha256:" + "cd" * 32,
                "size": 2,
                "platform": {"architecture": "amd64", "os": "linux"},
            },
        ],
    }
    idx = parse_manifest(json.dumps(doc).encode())
    assert isinstance(idx, Index)
    assert idx.select("linux", "arm64").digest == D
    assert idx.select("linux", "amd64").size == 2
    with pytest.raises(ManifestError, match=r"no image for platform linux/s390x \(available: "):
        idx.select("linux", "s390x")
    doc["manifests"][0]["platform"]["bad"] = 1
    with pytest.raises(ManifestError, match="platform: unknown field 'bad'"):
        parse_manifest(json.dumps(doc).encode())


def test_index_refuses_layer_entries() -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [{"mediaType": mt.OCI_LAYER, "digest": D, "size": 1}],
    }
    with pytest.raises(ManifestError, match=r"manifests\[0\]: unsupported media type"):
        parse_manifest(json.dumps(doc).encode())


def test_config_strict() -> None:
    _, cfg, _, diff_ids = image_blobs([tar_layer({"a": b"1"})])
    c = ImageConfig.parse(cfg)
    assert c.diff_ids == tuple(diff_ids) and c.os == "linux"
    bad = json.loads(cfg)
    bad["rootfs"]["type"] = "tarballs"
    with pytest.raises(ManifestError, match=r"rootfs\.type: expected 'layers'"):
        ImageConfig.parse(json.dumps(bad).encode())
    bad = json.loads(cfg)
    bad["rootfs"]["diff_ids"] = ["sha256:short"]
    with pytest.raises(ManifestError, match=r"rootfs.diff_ids\[0\]"):
        ImageConfig.parse(json.dumps(bad).encode())


def test_digest_parse() -> None:
    assert str(Digest.parse(D)) == D
    for bad in ["sha256:" + "AB" * 32, "sha256:" + "a" * 63, "sha256", "", "sha512:" + "a" * 64]:
        with pytest.raises(ManifestError):
            Digest.parse(bad)


def test_go_json_escaping_and_order() -> None:
    d = Descriptor(mt.OCI_LAYER, D, 3, annotations={"z": "<&>", "a": "\u2028\n"})
    assert go_json(d.to_json()) == (
        b'{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"'
        + D.encode()
        + b'","size":3,"annotations":{"a":"\\u2028\\n","z":"\\u003c\\u0026\\u003e"}}'
    )
    assert list(d.to_json(docker=True))[:3] == ["mediaType", "size", "digest"]


def test_index_variant_preference_and_single_unnamed_entry() -> None:
    def entry(digest_byte: str, variant: str) -> dict:
        return {
            "mediaType": mt.OCI_MANIFEST,
            "digest": "sha256:" + digest_byte * 64,
            "size": 1,
            "platform": {"architecture": "arm64", "os": "linux", "variant": variant},
        }

    idx = parse_manifest(
        json.dumps({"schemaVersion": 2, "manifests": [entry("1", "v9"), entry("2", "v8")]}).encode()
    )
    assert isinstance(idx, Index)
    assert idx.select("linux", "arm64").digest == "sha256:" + "2" * 64
    assert idx.select("linux", "arm64", "v9").digest == "sha256:" + "1" * 64
    single = parse_manifest(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [{"mediaType": mt.OCI_MANIFEST, "digest": D, "size": 1}],
            }
        ).encode()
    )
    assert isinstance(single, Index) and single.select().digest == D
