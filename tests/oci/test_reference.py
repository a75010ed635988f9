"""Parsing of oci: and docker:// references and auth files."""

from __future__ import annotations

import base64
import json

import pytest

from coco.errors import AuthError, UsageError
from coco.oci.auth import AuthFile, parse_creds
from coco.oci.reference import DockerReference, LayoutReference, parse_reference

D = "sha256:" + "0f" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("oci:/tmp/x", LayoutReference("/tmp/x", None)),
        ("oci:/tmp/x:v1.0", LayoutReference("/tmp/x", "v1.0")),
        ("oci:rel/dir:latest", LayoutReference("rel/dir", "latest")),
        ("docker://127.0.0.1:5000/a/b:1", DockerReference("127.0.0.1:5000", "a/b", "1")),
        ("docker://localhost/app", DockerReference("localhost", "app")),
        (f"docker://reg.io/app@{D}", DockerReference("reg.io", "app", None, D)),
        ("docker://busybox", DockerReference("docker.io", "library/busybox")),
        ("docker://user/app:2", DockerReference("docker.io", "user/app", "2")),
        ("docker://[::1]:5000/app:3", DockerReference("[::1]:5000", "app", "3")),
    ],
)
def test_parse(text: str, expected: object) -> None:
    assert parse_reference(text) == expected


def test_docker_reference_defaults() -> None:
    r = parse_reference("docker://reg.io:443/ns/app")
    assert isinstance(r, DockerReference)
    assert r.reference == "latest" and str(r) == "docker://reg.io:443/ns/app:latest"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("oci:", "the path is empty"),
        ("oci:/x:", "empty tag"),
        ("dir:/x", "unsupported transport 'dir'"),
        ("/plain/path", "expected oci:PATH"),
        ("docker://reg.io/App:1", "invalid repository name 'App'"),
        ("docker://reg.io/app:bad/tag", "invalid repository name"),
        ("docker://reg.io/app:t@" + D, "both a tag and a digest"),
        ("docker://reg.io/app@sha256:123", "digest"),
        ("docker://reg.io/app:" + "x" * 200, "invalid tag"),
    ],
)
def test_parse_errors(text: str, fragment: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_reference(text)
    assert fragment in str(e.value)


def _authfile(tmp_path, auths: dict) -> AuthFile:
    p = tmp_path / "auth.json"
    p.write_text(json.dumps({"auths": auths}))
    return AuthFile.load(p)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_authfile_most_specific_key_wins(tmp_path) -> None:
    af = _authfile(
        tmp_path,
        {
            "reg.io": {"auth": b64("host:h")},
            "reg.io/team": {"auth": b64("team:t")},
            "https://index.docker.io/v1/": {"auth": b64("hub:pw\n")},
        },
    )
    assert af.lookup("reg.io", "team/app").username == "team"
    assert af.lookup("reg.io", "other/app").username == "host"
    hub = af.lookup("docker.io", "library/busybox")
    assert hub is not None and hub.password == "pw"
    assert af.lookup("elsewhere.io", "app") is None


def test_authfile_errors(tmp_path) -> None:
    with pytest.raises(AuthError, match="not found"):
        AuthFile.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(AuthError, match=r"bad\.json: expected JSON, found invalid JSON"):
        AuthFile.load(tmp_path / "bad.json")
    with pytest.raises(AuthError, match="expected 'user:password'"):
        _authfile(tmp_path, {"r.io": {"auth": b64("nocolon")}})
    with pytest.raises(AuthError, match="expected base64"):
        _authfile(tmp_path, {"r.io": {"auth": "!!!"}})


def test_parse_creds() -> None:
    c = parse_creds("bob:pa:ss")
    assert (c.username, c.password) == ("bob", "pa:ss")
    assert "pa:ss" not in repr(c)
    with pytest.raises(UsageError):
        parse_creds(":x")
