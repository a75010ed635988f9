"""``coco image inspect`` prints what ``skopeo inspect`` prints for the same image, key by key."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Registry
from tests.imagekit import tar_layer, write_image, write_index
from tests.oci.test_cli import coco

# Keys a newer skopeo prints that Debian's 1.9.3 does not; checked against the manifest instead.
NEWER_KEYS = {"LayersData"}


def _skopeo(*args: str) -> dict:
    p = subprocess.run(["skopeo", "inspect", *args], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _push(src: str, dst: str, reg: Registry, *extra: str) -> None:
    """Push with coco (skopeo cannot read Docker media types out of an OCI layout)."""
    p = coco("image", "copy", "-q", *extra, "--dest-tls-verify=false", "--authfile",
             str(reg.authfile), src, dst)  # fmt: skip
    assert p.returncode == 0, p.stderr


def _compare(reg: Registry, ref: str, *extra: str) -> dict:
    auth = ["--authfile", str(reg.authfile), "--tls-verify=false", *extra]
    theirs = _skopeo(*auth, ref)
    p = coco("image", "inspect", *auth, ref)
    assert p.returncode == 0, p.stderr
    ours = json.loads(p.stdout)
    for key, value in theirs.items():
        assert ours.get(key, "<missing>") == value, key
    assert set(ours) - set(theirs) <= NEWER_KEYS
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", *auth, ref], capture_output=True, check=True
    ).stdout
    manifest = json.loads(raw)
    if "manifests" in manifest:  # an index: LayersData is the chosen instance's layers
        assert len(ours["LayersData"]) == len(theirs["Layers"])
    else:
        assert ours["LayersData"] == [
            {"MIMEType": d["mediaType"], "Digest": d["digest"], "Size": d["size"],
             "Annotations": d.get("annotations")}
            for d in manifest["layers"]
        ]  # fmt: skip
    return ours


@pytest.mark.parametrize("docker", [False, True], ids=["oci", "docker-v2s2"])
def test_inspect_matches_skopeo(registry: Registry, tmp_path: Path, docker: bool) -> None:
    config = {
        "config": {
            "Env": ["PATH=/usr/bin", "A=<b>&c"],
            "Labels": {"z.last": "1", "a.first": "x & y", "org.opencontainers.image.title": "t"},
        },
        "created": "2024-02-03T04:05:06.123456789Z",
        "docker_version": "24.0.7",
        "author": "someone",
    }
    img = write_image(
        tmp_path / "src",
        [tar_layer({"etc/motd": b"hi\n"}), tar_layer({"b": b"2" * 5000})],
        tag="v1",
        docker=docker,
        config_extra=config,
    )
    repo = f"inspect/{'docker' if docker else 'oci'}"
    for tag in ("v1", "v2", "latest"):
        _push(img.ref, registry.url(repo, tag), registry)
    ours = _compare(registry, registry.url(repo, "v1"))
    assert ours["Name"] == f"{registry.host}/{repo}"  # no transport, no tag
    assert sorted(ours["RepoTags"]) == ["latest", "v1", "v2"]
    assert ours["DockerVersion"] == "24.0.7"
    assert list(ours["Labels"]) == sorted(ours["Labels"])
    ours = _compare(registry, registry.url(repo, "v1"), "--no-tags")
    assert ours["RepoTags"] == []


def test_inspect_index_matches_skopeo(registry: Registry, tmp_path: Path) -> None:
    idx = write_index(
        tmp_path / "src",
        [
            ("linux", "amd64", [tar_layer({"p": b"amd"})]),
            ("linux", "arm64", [tar_layer({"p": b"arm"}), tar_layer({"q": b"2"})]),
        ],
        tag="m",
    )
    dst = registry.url("inspect/multi", "m")
    _push(idx.ref, dst, registry, "--all")
    ours = _compare(registry, dst, "--override-arch", "amd64")
    assert ours["Digest"] == idx.index_digest  # the digest of what the reference names
    ours = _compare(registry, dst, "--override-arch", "arm64")
    assert ours["Architecture"] == "arm64" and len(ours["Layers"]) == 2


def test_inspect_layout_matches_skopeo(tmp_path: Path) -> None:
    img = write_image(tmp_path / "src", [tar_layer({"a": b"1"})], tag="v1")
    theirs = _skopeo(img.ref)
    p = coco("image", "inspect", img.ref)
    assert p.returncode == 0, p.stderr
    ours = json.loads(p.stdout)
    assert "Name" not in ours and ours["RepoTags"] == []
    assert {k: ours[k] for k in theirs} == theirs


def test_terminal_gets_a_layer_table(tmp_path: Path) -> None:
    """On a terminal: a summary and one row a layer (no JSON); --json keeps the JSON there."""
    import os
    import pty
    import sys

    img = write_image(tmp_path / "src", [tar_layer({"a": b"1"}), tar_layer({"b": b"2"})], tag="t")

    def on_tty(*args: str) -> str:
        main, child = pty.openpty()
        env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}
        p = subprocess.run(
            [sys.executable, "-m", "coco.cli.main", "image", "inspect", *args, img.ref],
            stdout=child, stderr=subprocess.PIPE, env=env, timeout=60, check=False,
        )  # fmt: skip
        os.close(child)
        out = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        os.close(main)
        assert p.returncode == 0, p.stderr
        return out.decode()

    text = on_tty()
    assert "Layers (2)" in text and "linux/amd64" in text
    for i, digest in enumerate(img.layer_digests, 1):
        row = next(line for line in text.splitlines() if digest[:19] in line)
        assert row.split()[0] == str(i) and row.split()[-1] == "tar+gzip", row
    assert not text.lstrip().startswith("{")
    assert json.loads(on_tty("--json"))["Layers"] == img.layer_digests
