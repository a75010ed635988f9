"""Registries that misbehave (500, truncated bodies, non-JSON or unknown manifests): one clear
error naming the image and the layer, and nothing written."""

from __future__ import annotations

import hashlib
import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from coco.errors import DigestMismatchError, ManifestError, RegistryError
from coco.oci.copy import CopyOptions, copy_image
from coco.oci.registry import Challenge
from tests.imagekit import image_blobs, tar_layer
from tests.oci.fakeregistry import reply, serve

OCI = "application/vnd.oci.image.manifest.v1+json"
INSECURE = CopyOptions(src_tls_verify=False, dest_tls_verify=False)


def scripted(
    manifest: bytes,
    blobs: dict[str, bytes],
    *,
    media_type: str,
    truncate: str | None = None,
    fail_blob: str | None = None,
):
    def routes(h: BaseHTTPRequestHandler) -> None:
        path = h.path
        if path == "/v2/":
            reply(h, 200, b"{}")
        elif "/manifests/" in path:
            assert "application/vnd.oci.image.manifest.v1+json" in h.headers.get("Accept", "")
            reply(h, 200, manifest, {"Content-Type": media_type})
        elif "/blobs/" in path:
            digest = path.rsplit("/", 1)[1]
            if digest == fail_blob:
                body = json.dumps({"errors": [{"code": "UNKNOWN", "message": "disk on fire"}]})
                reply(h, 500, body.encode(), {"Content-Type": "application/json"})
            elif digest == truncate:
                data = blobs[digest]
                reply(h, 200, data[: len(data) // 2], content_length=len(data))
            elif digest in blobs:
                reply(h, 200, blobs[digest])
            else:
                reply(h, 404, b"")
        else:
            reply(h, 404, b"")

    return serve(routes)


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _image():
    manifest, config, layers, _ = image_blobs(
        [tar_layer({"a": b"1" * 100_000}), tar_layer({"b": b"2" * 200_000})], compression="none"
    )
    blobs = {sha(config): config, **{sha(b): b for b in layers}}
    return manifest, config, layers, blobs


def test_500_on_a_layer(tmp_path: Path) -> None:
    manifest, _, layers, blobs = _image()
    with (
        scripted(
            manifest,
            blobs,
            media_type="application/vnd.oci.image.manifest.v1+json",
            fail_blob=sha(layers[1]),
        ) as host,
        pytest.raises(RegistryError) as e,
    ):
        copy_image(f"docker://{host}/x/y:1", f"oci:{tmp_path / 'out'}:1", options=INSECURE)
    msg = str(e.value)
    assert f"docker://{host}/x/y:1: layer 2/2 {sha(layers[1])}" in msg
    assert "500 UNKNOWN: disk on fire" in msg
    assert not (tmp_path / "out").exists()


def test_truncated_stream(tmp_path: Path) -> None:
    manifest, _, layers, blobs = _image()
    with (
        scripted(
            manifest,
            blobs,
            media_type="application/vnd.oci.image.manifest.v1+json",
            truncate=sha(layers[0]),
        ) as host,
        pytest.raises(DigestMismatchError) as e,
    ):
        copy_image(f"docker://{host}/x/y:1", f"oci:{tmp_path / 'out'}:1", options=INSECURE)
    msg = str(e.value)
    assert f"layer 1/2 {sha(layers[0])}" in msg and "truncated" in msg
    assert not (tmp_path / "out").exists()


def test_manifest_not_json(tmp_path: Path) -> None:
    with (
        scripted(b"<html>gateway timeout</html>", {}, media_type="text/html") as host,
        pytest.raises(ManifestError) as e,
    ):
        copy_image(f"docker://{host}/x/y:1", f"oci:{tmp_path / 'out'}", options=INSECURE)
    assert f"docker://{host}/x/y:1: manifest: not valid JSON" in str(e.value)
    assert "<html>" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_unknown_layer_media_type(tmp_path: Path) -> None:
    manifest, _, _, blobs = _image()
    odd = manifest.replace(b"application/vnd.oci.image.layer.v1.tar", b"application/x-foo", 1)
    with (
        scripted(odd, blobs, media_type=OCI) as host,
        pytest.raises(ManifestError, match=r"layers\[0\]: unknown layer media type"),
    ):
        copy_image(f"docker://{host}/x/y:1", f"oci:{tmp_path / 'out'}", options=INSECURE)


def test_manifest_by_digest_is_verified(tmp_path: Path) -> None:
    manifest, _, _, blobs = _image()
    wrong = "sha256:" + "1" * 64
    with (
        scripted(manifest, blobs, media_type=OCI) as host,
        pytest.raises(DigestMismatchError, match="manifest digest mismatch"),
    ):
        copy_image(f"docker://{host}/x/y@{wrong}", f"oci:{tmp_path / 'out'}", options=INSECURE)


def test_unreachable_registry(tmp_path: Path) -> None:
    from tests.conftest import free_port

    port = free_port()
    with pytest.raises(RegistryError, match=f"cannot connect to 127.0.0.1:{port}"):
        copy_image(f"docker://127.0.0.1:{port}/a:1", f"oci:{tmp_path / 'o'}", options=INSECURE)


def test_challenge_parsing() -> None:
    c = Challenge.parse('Bearer realm="https://auth.io/token",service="reg.io",scope="a:b:pull"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.io/token", "service": "reg.io", "scope": "a:b:pull"}
    assert Challenge.parse('Basic realm="r"').scheme == "basic"
