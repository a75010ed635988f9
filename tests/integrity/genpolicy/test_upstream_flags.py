"""``coco policy generate`` with upstream genpolicy's command line: short flags, stdin/stdout."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from coco.integrity.agent_policy import default_rules
from tests.conftest import Registry
from tests.integrity.genpolicy.helpers import Images, pod, policy_of


def _coco(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("coco")
    return subprocess.run(
        [str(exe), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=cwd,
        input=stdin,
        env={**os.environ, "COCO_DEBUG": "0"},
    )


def _config_map(tmp_path: Path) -> Path:
    meta = {"name": "cfg", "namespace": "shop"}
    doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"COLOR": "blue"}}
    cm = tmp_path / "cm.yaml"
    cm.write_text(yaml.safe_dump(doc))
    return cm


def test_short_flags_as_upstream(images: Images, tmp_path: Path) -> None:
    """-y FILE -u -c CONFIG -p RULES -j SETTINGS -r: the YAML is annotated in place, the policy
    printed, the layer cache kept in ./layers-cache.json, the ConfigMap's value used."""
    src = tmp_path / "pod.yaml"
    env = [{"name": "COLOR", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "COLOR"}}}]
    src.write_text(pod(images.app, env=env))
    rules = tmp_path / "rules.rego"
    rules.write_text(default_rules())
    args = ["policy", "generate", "-y", str(src), "-u", "-c", str(_config_map(tmp_path))]
    args += ["-p", str(rules), "-j", str(images.settings), "--src-tls-verify=false"]
    r = _coco(*args, "-r", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text, data = policy_of(src.read_text())
    assert r.stdout == text
    assert "COLOR=blue" in data["containers"][1]["OCI"]["Process"]["Env"]
    cache = json.loads((tmp_path / "layers-cache.json").read_text())
    diff_ids = {"sha256:" + hashlib.sha256(layer).hexdigest() for layer in images.app_layers}
    assert {e["diff_id"] for e in cache} >= diff_ids
    r = _coco(*args, "-b", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert base64.b64decode(r.stdout) == policy_of(src.read_text())[0].encode()


def test_stdin_to_stdout(images: Images, tmp_path: Path) -> None:
    """No -y (or ``-y -``): the YAML is read from stdin and the annotated YAML printed."""
    text = pod(images.app)
    for extra in ([], ["-y", "-"], ["-"]):
        r = _coco(
            "policy", "generate", *extra, "-j", str(images.settings), "--src-tls-verify=false",
            cwd=tmp_path, stdin=text,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        _, data = policy_of(r.stdout)
        assert data["containers"][1]["OCI"]["Process"]["Args"][0] == "/usr/bin/python3"
    assert list(tmp_path.iterdir()) == []  # nothing written beside


def test_unreachable_pause_image_names_settings(
    images: Images, open_registry: Registry, tmp_path: Path
) -> None:
    settings = tmp_path / "s.json"
    missing = f"{open_registry.host}/gp/no-pause:1"
    settings.write_text(json.dumps({"cluster_config": {"pause_container_image": missing}}))
    src = tmp_path / "pod.yaml"
    src.write_text(before := pod(images.app))
    r = _coco(
        "policy", "generate", "-y", str(src), "-j", str(settings), "--src-tls-verify=false",
        cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()[-1]
    assert missing in err and "--settings can name another" in err, err
    assert src.read_text() == before
