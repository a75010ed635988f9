"""genpolicy refusals: bad layers, caches and settings give one clear error and no output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coco.errors import CocoError, GenpolicyError
from coco.integrity.genpolicy import generate
from tests.conftest import Registry
from tests.imagekit import tar_layer
from tests.integrity.genpolicy.helpers import Images, opts, pod, push


def coco(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("coco")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=False)


def test_layer_not_matching_its_diff_id_is_refused(
    images: Images, open_registry: Registry, tmp_path: Path
) -> None:
    """Upstream once logged a warning and wrote a policy anyway (Contrast PR #1433)."""
    wrong = "sha256:" + "0" * 64
    ref = push(
        open_registry,
        tmp_path,
        "gp/liar",
        [tar_layer({"a": b"a"})],
        None,
        config_extra={"rootfs": {"type": "layers", "diff_ids": [wrong]}},
    )
    src = tmp_path / "pod.yaml"
    src.write_text(pod(ref))
    before = src.read_text()
    cache = tmp_path / "cache.json"
    r = coco(
        "policy", "generate", str(src), "--settings", str(images.settings),
        "--src-tls-verify=false", "--layers-cache", str(cache),
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.count("\n") == 2  # the insecure-TLS warning, then the error
    err = r.stderr.splitlines()[-1]
    assert err.startswith(f"coco: error: image {ref}: layer 0 (sha256:")
    assert f"diff_id mismatch: expected {wrong}, got sha256:" in err
    assert src.read_text() == before  # not rewritten
    assert wrong not in (cache.read_text() if cache.exists() else "")


def test_unknown_image_is_named(images: Images, open_registry: Registry) -> None:
    with pytest.raises(CocoError) as e:
        generate(pod(f"{open_registry.host}/gp/nope:1"), "pod.yaml", opts(images))
    assert f"{open_registry.host}/gp/nope" in str(e.value)
    assert "manifest" in str(e.value)


def test_bad_layers_cache_is_refused(images: Images, tmp_path: Path) -> None:
    cache = tmp_path / "cache.json"
    cache.write_text('[{"diff_id": "sha256:00", "verity_hash": "short"}]')
    with pytest.raises(GenpolicyError, match=r"layers cache .*cache.json: entry 0: expected"):
        generate(pod(images.app), "pod.yaml", opts(images, layers_cache=cache))
    cache.write_text("{not json")
    with pytest.raises(GenpolicyError, match=r"cache\.json: expected JSON, found invalid JSON"):
        generate(pod(images.app), "pod.yaml", opts(images, layers_cache=cache))


def test_bad_settings_are_refused(images: Images, tmp_path: Path) -> None:
    s = tmp_path / "settings.json"
    s.write_text(json.dumps({"pause_containr": {}}))
    with pytest.raises(GenpolicyError, match="unknown key 'pause_containr'"):
        generate(pod(images.app), "pod.yaml", opts(images, settings=s))


def test_unknown_user_name_is_refused(
    images: Images, open_registry: Registry, tmp_path: Path
) -> None:
    ref = push(open_registry, tmp_path, "gp/nouser", [tar_layer({"x": b"x"})], {"User": "ghost"})
    with pytest.raises(
        GenpolicyError,
        match=r"config.User 'ghost': expected user 'ghost' in the image's /etc/passwd, found none",
    ):
        generate(pod(ref), "pod.yaml", opts(images))


def test_generate_rewrites_in_place_by_default(images: Images, tmp_path: Path) -> None:
    src = tmp_path / "pod.yaml"
    src.write_text(pod(images.app))
    r = coco(
        "policy", "generate", str(src), "--settings", str(images.settings), "--src-tls-verify=false"
    )
    assert r.returncode == 0, r.stderr
    text = src.read_text()  # the default: the policy inside the initdata, as upstream kata
    assert "io.katacontainers.config.hypervisor.cc_init_data" in text
    assert "io.katacontainers.config.agent.policy" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pod.yaml"]


def test_authfile_for_a_registry_with_auth(registry: Registry, tmp_path: Path) -> None:
    from coco.oci.auth import parse_creds
    from coco.oci.copy import CopyOptions, copy_image
    from tests.imagekit import write_image

    refs = []
    for repo, cfg in (("gp/pause", {"Entrypoint": ["/pause"]}), ("gp/app", {"Cmd": ["/app"]})):
        img = write_image(tmp_path / repo.replace("/", "_"), [tar_layer({repo: b"x"})],
                          config_extra={"config": cfg})  # fmt: skip
        copy_image(img.ref, registry.url(repo), options=CopyOptions(
            dest_credentials=parse_creds(registry.creds), dest_tls_verify=False))  # fmt: skip
        refs.append(f"{registry.host}/{repo}:latest")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"cluster_config": {"pause_container_image": refs[0]}}))
    src = tmp_path / "pod.yaml"
    src.write_text(pod(refs[1]))
    base = ["policy", "generate", str(src), "-o", str(tmp_path / "out.yaml"),
            "--settings", str(settings), "--src-tls-verify=false"]  # fmt: skip
    (tmp_path / "empty.json").write_text('{"auths": {}}')
    r = coco(*base, "--authfile", str(tmp_path / "empty.json"))
    assert r.returncode == 1
    assert f"coco: error: docker://{refs[0]}: authentication required" in r.stderr
    assert not (tmp_path / "out.yaml").exists()
    assert registry.authfile is not None
    r = coco(*base, "--authfile", str(registry.authfile))
    assert r.returncode == 0, r.stderr
    assert "io.katacontainers.config.hypervisor.cc_init_data" in (tmp_path / "out.yaml").read_text()
