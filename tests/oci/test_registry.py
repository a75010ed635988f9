"""Copies to and from a real docker-registry (basic auth), checked against skopeo."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from coco.errors import AuthError, DigestMismatchError, RegistryError, UsageError
from coco.oci.auth import Credentials
from coco.oci.copy import CopyOptions, copy_image
from coco.oci.layout import OciLayout
from coco.oci.models import Manifest, parse_manifest
from tests.conftest import Registry
from tests.imagekit import tar_layer, write_image, write_index
from tests.layout_snapshot import snapshot


def opts(reg: Registry, **kw) -> CopyOptions:
    creds = Credentials(reg.user, reg.password) if reg.user else None
    base = dict(
        src_credentials=creds,
        dest_credentials=creds,
        src_tls_verify=False,
        dest_tls_verify=False,
    )
    base.update(kw)
    return CopyOptions(**base)


def skopeo(*args: str) -> bytes:
    p = subprocess.run(["skopeo", *args], capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout


def sk_creds(reg: Registry) -> list[str]:
    return ["--creds", reg.creds] if reg.user else []


def test_push_then_skopeo_reads_it_back(registry: Registry, tmp_path: Path) -> None:
    img = write_image(
        tmp_path / "src",
        [tar_layer({"etc/motd": b"hello\n"}), tar_layer({"big": os.urandom(3 << 20)})],
        tag="v1",
    )
    dst = registry.url("coco/push", "v1")
    r = copy_image(img.ref, dst, options=opts(registry))
    assert r.manifest_digest == img.manifest_digest
    assert [layer.action for layer in r.layers] == ["copied", "copied"]
    raw = skopeo("inspect", "--raw", "--tls-verify=false", *sk_creds(registry), dst)
    assert raw == img.manifest  # byte-identical manifest
    skopeo(
        "copy",
        "-q",
        "--src-tls-verify=false",
        "--src-creds",
        registry.creds,
        dst,
        f"oci:{tmp_path / 'back'}:v1",
    )
    m, cfg = OciLayout.open(tmp_path / "back").image("v1")
    assert [d.digest for d in m.layers] == img.layer_digests
    assert cfg.diff_ids == tuple(img.diff_ids)
    # Second push: every blob is already there.
    r2 = copy_image(img.ref, dst, options=opts(registry))
    assert [layer.action for layer in r2.layers] == ["skipped", "skipped"]


def test_pull_what_skopeo_pushed(registry: Registry, tmp_path: Path) -> None:
    img = write_image(tmp_path / "src", [tar_layer({"a": b"skopeo pushed me"})], tag="v1")
    dst = registry.url("coco/from-skopeo", "t")
    skopeo("copy", "-q", "--dest-tls-verify=false", "--dest-creds", registry.creds, img.ref, dst)
    r = copy_image(dst, f"oci:{tmp_path / 'out'}:t", options=opts(registry))
    assert r.manifest_digest == img.manifest_digest
    assert OciLayout.open(tmp_path / "out").read_blob(img.layer_digests[0]) == img.layers[0]
    # umoci accepts the layout we pulled into
    subprocess.run(
        [
            "umoci",
            "unpack",
            "--rootless",
            "--image",
            f"{tmp_path / 'out'}:t",
            str(tmp_path / "bundle"),
        ],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "bundle/rootfs/a").read_bytes() == b"skopeo pushed me"


def test_authfile_and_chunked_upload(registry: Registry, tmp_path: Path) -> None:
    img = write_image(tmp_path / "src", [tar_layer({"x": os.urandom(700_000)})], compression="none")
    dst = registry.url("coco/chunked", "c")
    o = CopyOptions(authfile=registry.authfile, dest_tls_verify=False, patch_size=128 * 1024)
    r = copy_image(img.ref, dst, options=o)
    assert r.manifest_digest == img.manifest_digest
    out = skopeo("inspect", "--tls-verify=false", "--authfile", str(registry.authfile), dst)
    assert json.loads(out)["Layers"] == img.layer_digests


def test_cross_repository_mount(registry: Registry, tmp_path: Path) -> None:
    img = write_image(tmp_path / "src", [tar_layer({"m": b"mount me"})])
    copy_image(img.ref, registry.url("coco/mount-a"), options=opts(registry))
    r = copy_image(
        registry.url("coco/mount-a"), registry.url("coco/mount-b"), options=opts(registry)
    )
    assert [layer.action for layer in r.layers] == ["mounted"]
    raw = skopeo(
        "inspect", "--raw", "--tls-verify=false", *sk_creds(registry), registry.url("coco/mount-b")
    )
    assert raw == img.manifest


def test_docker_media_types_and_oci_conversion_match_skopeo(
    registry: Registry, tmp_path: Path
) -> None:
    """A Docker v2s2 image round-trips unchanged; our OCI conversion equals skopeo's bytes."""
    img = write_image(
        tmp_path / "src", [tar_layer({"a": b"1"}), tar_layer({"b": b"2"})], docker=True, tag="d"
    )
    dst = registry.url("coco/docker", "d")
    copy_image(img.ref, dst, options=opts(registry))
    raw = skopeo("inspect", "--raw", "--tls-verify=false", *sk_creds(registry), dst)
    assert raw == img.manifest
    skopeo(
        "copy",
        "-q",
        "--format",
        "oci",
        "--src-tls-verify=false",
        "--src-creds",
        registry.creds,
        dst,
        f"oci:{tmp_path / 'oci'}:o",
    )
    theirs = skopeo("inspect", "--raw", f"oci:{tmp_path / 'oci'}:o")
    ours = parse_manifest(img.manifest)
    assert isinstance(ours, Manifest)
    assert ours.to_oci().raw == theirs


def test_multi_arch_all(registry: Registry, tmp_path: Path) -> None:
    idx = write_index(
        tmp_path / "src",
        [
            ("linux", "amd64", [tar_layer({"p": b"amd64"})]),
            ("linux", "arm64", [tar_layer({"p": b"arm64"})]),
        ],
        tag="m",
    )
    dst = registry.url("coco/multi", "m")
    r = copy_image(idx.ref, dst, options=opts(registry, all_platforms=True))
    assert r.manifest_digest == idx.index_digest
    assert sorted(r.instances) == sorted(i.manifest_digest for i in idx.images)
    raw = skopeo("inspect", "--raw", "--tls-verify=false", *sk_creds(registry), dst)
    assert raw == idx.index
    out = json.loads(
        skopeo(
            "inspect", "--tls-verify=false", *sk_creds(registry), "--override-arch", "arm64", dst
        )
    )
    assert out["Layers"] == idx.images[1].layer_digests
    # Without --all only the selected instance is copied, as a plain manifest.
    r = copy_image(dst, f"oci:{tmp_path / 'one'}:x", options=opts(registry, override_arch="arm64"))
    assert r.manifest_digest == idx.images[1].manifest_digest


def test_wrong_credentials(registry: Registry, tmp_path: Path) -> None:
    img = write_image(tmp_path / "src", [tar_layer({"a": b"1"})])
    dst = registry.url("coco/denied")
    bad = opts(registry, dest_credentials=Credentials("alice", "wrong"))
    with pytest.raises(AuthError) as e:
        copy_image(img.ref, dst, options=bad)
    msg = str(e.value)
    assert "credentials for user 'alice' refused" in msg and "coco/denied" in msg
    (tmp_path / "none.json").write_text('{"auths": {}}')
    with pytest.raises(AuthError, match="authentication required"):
        copy_image(
            img.ref,
            dst,
            options=CopyOptions(dest_tls_verify=False, authfile=tmp_path / "none.json"),
        )
    # nothing was tagged in the repository
    with pytest.raises(RegistryError, match="404"):
        copy_image(dst, f"oci:{tmp_path / 'x'}", options=opts(registry))


def test_missing_tag_404(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError) as e:
        copy_image(
            registry.url("coco/nothing", "nope"),
            f"oci:{tmp_path / 'out'}:x",
            options=opts(registry),
        )
    msg = str(e.value)
    assert "docker://" in msg and "coco/nothing:nope" in msg
    assert "404" in msg and ("MANIFEST_UNKNOWN" in msg or "NAME_UNKNOWN" in msg)
    assert not (tmp_path / "out").exists()


def test_tls_verify_required_for_plain_http(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="tls-verify=false"):
        copy_image(
            registry.url("coco/push", "v1"),
            f"oci:{tmp_path / 'o'}",
            options=opts(registry, src_tls_verify=True),
        )


def test_corrupt_blob_in_registry(
    registry: Registry, open_registry: Registry, tmp_path: Path
) -> None:
    img = write_image(
        tmp_path / "src", [tar_layer({"a": b"ok"}), tar_layer({"b": os.urandom(9000)})]
    )
    src = registry.url("coco/corrupt", "c")
    copy_image(img.ref, src, options=opts(registry))
    f = registry.blob_file(img.layer_digests[1])
    good = f.read_bytes()
    try:
        f.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        write_image(tmp_path / "dst", [tar_layer({"keep": b"me"})], tag="c")
        before = snapshot(tmp_path / "dst")
        with pytest.raises(DigestMismatchError) as e:
            copy_image(src, f"oci:{tmp_path / 'dst'}:c", options=opts(registry))
        msg = str(e.value)
        assert "coco/corrupt:c" in msg and f"layer 2/2 {img.layer_digests[1]}" in msg
        assert "digest mismatch" in msg
        assert snapshot(tmp_path / "dst") == before
        # into another registry (no mount possible): the tag is not created
        other = open_registry.url("coco/corrupt-dst", "c")
        o = opts(registry, dest_credentials=None)
        with pytest.raises(DigestMismatchError, match="digest mismatch"):
            copy_image(src, other, options=o)
        with pytest.raises(RegistryError, match="404"):
            copy_image(other, f"oci:{tmp_path / 'never'}", options=opts(open_registry))
        assert not (tmp_path / "never").exists()
    finally:
        f.write_bytes(good)


def test_push_and_pull_by_digest(registry: Registry, tmp_path: Path) -> None:
    img = write_image(tmp_path / "src", [tar_layer({"d": b"by digest"})])
    base = f"docker://{registry.host}/coco/bydigest"
    r = copy_image(img.ref, f"{base}@{img.manifest_digest}", options=opts(registry))
    assert r.manifest_digest == img.manifest_digest
    r = copy_image(
        f"{base}@{img.manifest_digest}", f"oci:{tmp_path / 'out'}", options=opts(registry)
    )
    entries = OciLayout.open(tmp_path / "out").index().manifests
    assert [e.digest for e in entries] == [img.manifest_digest]
    assert entries[0].annotations == {}  # no tag given: an untagged entry
    other = write_image(tmp_path / "other", [tar_layer({"d": b"something else"})])
    with pytest.raises(UsageError, match="not the one named"):
        copy_image(other.ref, f"{base}@{img.manifest_digest}", options=opts(registry))
