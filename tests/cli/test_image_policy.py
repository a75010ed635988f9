"""``coco image pull`` / ``copy`` without ``--policy`` use skopeo's default policy files
($HOME/.config/containers/policy.json, then /etc/containers/policy.json); ``--insecure-policy``
skips them; with neither file nothing is checked (as before, and as image-rs). The machine's own
/etc/containers/policy.json is never read here: SYSTEM_POLICY points into the test's directory."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import coco.cli.image
from coco.image.service import PullService
from tests.cli.run import Result, invoke
from tests.imagekit import BuiltImage, tar_layer, write_image

REJECT = {"default": [{"type": "reject"}]}
ACCEPT = {"default": [{"type": "insecureAcceptAnything"}]}
REFUSED = "signature policy refused the image"


class Scene:
    def __init__(self, tmp: Path, img: BuiltImage) -> None:
        self.tmp, self.img = tmp, img
        self.user = tmp / "home" / ".config" / "containers" / "policy.json"
        self.system = tmp / "etc" / "containers" / "policy.json"

    def write(self, where: Path, policy: dict[str, object]) -> None:
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text(json.dumps(policy))

    def pull(self, *flags: str, bundle: str = "bundle") -> Result:
        args = ["image", "pull", "-q", "--flatten", "--store", str(self.tmp / "store"), *flags]
        return invoke([*args, self.img.ref, str(self.tmp / bundle)])

    def copy(self, *flags: str, dest: str = "copy") -> Result:
        return invoke(["image", "copy", "-q", *flags, self.img.ref, f"oci:{self.tmp / dest}:t"])


@pytest.fixture
def scene(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Scene:
    if os.geteuid() != 0:
        pytest.skip("the layer store records whiteouts as device nodes: needs root")
    img = write_image(tmp_path / "lay", [tar_layer({"etc/hello": b"hi\n"})], tag="t")
    s = Scene(tmp_path, img)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(coco.cli.image, "SYSTEM_POLICY", str(s.system))
    return s


def test_no_policy_file_checks_nothing(scene: Scene) -> None:
    assert scene.pull().exit_code == 0
    assert (scene.tmp / "bundle/rootfs/etc/hello").read_bytes() == b"hi\n"
    res = scene.copy()
    assert res.exit_code == 0 and res.stdout.strip() == scene.img.manifest_digest


def test_user_policy_is_enforced_on_pull_and_copy(scene: Scene) -> None:
    scene.write(scene.user, REJECT)
    res = scene.pull()
    assert res.exit_code == 1 and REFUSED in res.stderr and res.stderr.count("\n") == 1
    res = scene.copy()
    assert res.exit_code == 1 and REFUSED in res.stderr and res.stderr.count("\n") == 1
    assert not (scene.tmp / "bundle").exists() and not (scene.tmp / "copy").exists()


def test_system_policy_is_the_fallback_and_the_user_one_wins(scene: Scene) -> None:
    scene.write(scene.system, REJECT)
    assert REFUSED in scene.pull().stderr
    assert REFUSED in scene.copy().stderr
    scene.write(scene.user, ACCEPT)
    assert scene.pull().exit_code == 0
    assert scene.copy().exit_code == 0


def test_insecure_policy_skips_the_default_files_and_warns(scene: Scene) -> None:
    scene.write(scene.user, REJECT)
    scene.write(scene.system, REJECT)
    warning = "coco: warning: --insecure-policy: image signatures are not checked\n"
    res = scene.pull("--insecure-policy")
    assert (res.exit_code, res.stderr) == (0, warning)
    res = scene.copy("--insecure-policy")
    assert (res.exit_code, res.stderr) == (0, warning)
    res = scene.pull("--insecure-policy", "--policy", str(scene.user), bundle="b2")
    assert res.exit_code == 2 and "cannot be combined" in res.stderr


def test_a_bad_default_policy_file_is_named(scene: Scene) -> None:
    scene.user.parent.mkdir(parents=True)
    scene.user.write_bytes(b"\x00\xff not json")
    res = scene.pull()
    assert res.exit_code == 1 and res.stderr.startswith(f"coco: error: {scene.user}: expected")
    assert not (scene.tmp / "bundle").exists()


def test_missing_registries_d_is_no_configuration(scene: Scene) -> None:
    scene.write(scene.user, ACCEPT)
    missing = str(scene.tmp / "no-such-registries.d")
    assert scene.pull("--registries.d", missing).exit_code == 0
    res = scene.copy("--registries.d", missing)
    assert res.exit_code == 0, res.output
    res = scene.pull("--registries.d", missing, "--policy", str(scene.user), bundle="b2")
    assert res.exit_code == 0, res.output


@pytest.fixture
def service(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "svc.sock")
    svc = PullService(path)
    th = threading.Thread(target=svc.serve_forever, daemon=True)
    th.start()
    try:
        yield path
    finally:
        svc.shutdown()
        th.join(10)


def test_the_callers_default_policy_goes_to_the_service(scene: Scene, service: str) -> None:
    scene.write(scene.user, REJECT)
    res = scene.pull("--service", service)
    assert res.exit_code == 1 and REFUSED in res.stderr, res.output
    assert not (scene.tmp / "bundle").exists()
    res = scene.pull("--service", service, "--insecure-policy")
    assert res.exit_code == 0, res.output
