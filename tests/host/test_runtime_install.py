"""``coco runtime install`` / ``uninstall`` on containerd 1.6's own default config: the handlers,
the shim configs the shim itself accepts, idempotence, and a byte-identical round trip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomlkit

from coco.host import install as inst
from coco.host.runtime import config as shim_config

CRI = "io.containerd.grpc.v1.cri"


def coco(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coco.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def default_config(tmp_path: Path) -> Path:
    if shutil.which("containerd") is None:
        pytest.skip("containerd is not installed (scripts/install-system-deps)")
    text = subprocess.run(
        ["containerd", "config", "default"], check=True, capture_output=True, text=True
    ).stdout
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def _args(cfg: Path, tmp_path: Path) -> list[str]:
    return ["--containerd-config", str(cfg), "--config-dir", str(tmp_path / "coco")]


def _install_args(cfg: Path, tmp_path: Path) -> list[str]:
    return [*_args(cfg, tmp_path), "--shim-link-dir", str(tmp_path / "bin")]


def _runtimes(cfg: Path) -> dict:
    doc = tomlkit.parse(cfg.read_text()).unwrap()
    return doc["plugins"][CRI]["containerd"]["runtimes"]


def test_install_uninstall_round_trip(default_config: Path, tmp_path: Path) -> None:
    before = default_config.read_bytes()
    net = tmp_path / "net.d"
    args = [*_install_args(default_config, tmp_path), "--restrict-oom-score-adj", "true"]
    (tmp_path / "podvm").mkdir()
    podvm = ["--podvm-image", str(tmp_path / "podvm")]
    r = coco("runtime", "install", *args, *podvm, "--cni", "--cni-conf-dir", str(net))
    assert r.returncode == 0, r.stderr
    assert "has no pod VM image" not in r.stderr
    runtimes = _runtimes(default_config)
    assert set(runtimes) == {"runc", "coco-qemu", "coco-remote", "coco-local"}
    for handler, kind in inst.HANDLERS.items():
        h = runtimes[handler]
        assert h["runtime_type"] == "io.containerd.coco.v2"
        assert h["pod_annotations"] == ["io.katacontainers.*"]
        shim = Path(h["runtime_path"])
        assert shim.is_absolute() and shim.name == "containerd-shim-coco-v2"
        assert os.access(shim, os.X_OK)
        cfg = shim_config.load(h["options"]["ConfigPath"])  # the shim's own reader accepts it
        assert cfg.kind == kind
        if kind == "qemu":
            assert cfg.sandbox["image"] == str(tmp_path / "podvm")
        assert cfg.insecure == (kind == "local")
    assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2"  # untouched
    doc = tomlkit.parse(default_config.read_text()).unwrap()
    assert doc["plugins"][CRI]["restrict_oom_score_adj"] is True
    conflist = json.loads((net / "10-coco.conflist").read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["bridge", "portmap"]
    assert conflist["plugins"][0]["ipam"]["type"] == "host-local"
    assert Path(doc["plugins"][CRI]["cni"]["bin_dir"], "bridge").exists()
    # containerd 1.6 finds the shim by name on its PATH: linked there
    link = tmp_path / "bin" / "containerd-shim-coco-v2"
    assert link.is_symlink() and link.resolve() == shim.resolve()

    # again: nothing changes, not even the bytes
    installed = default_config.read_bytes()
    r = coco("runtime", "install", *args, *podvm, "--cni", "--cni-conf-dir", str(net))
    assert r.returncode == 0, r.stderr
    assert "already installed: nothing to do" in r.stderr
    assert default_config.read_bytes() == installed

    r = coco("runtime", "uninstall", *_args(default_config, tmp_path))
    assert r.returncode == 0, r.stderr
    assert default_config.read_bytes() == before
    assert not (tmp_path / "coco").exists()
    assert not net.exists()
    assert not link.is_symlink() and not link.parent.exists()
    r = coco("runtime", "uninstall", *_args(default_config, tmp_path))
    assert r.returncode == 0 and "nothing installed" in r.stderr


def test_uninstall_after_user_edits_removes_only_ours(default_config: Path, tmp_path: Path) -> None:
    # a handler of the user's with one of our names: replaced by install, restored by uninstall
    text = default_config.read_text() + (
        f'\n[plugins."{CRI}".containerd.runtimes.coco-local]\n  runtime_type = "mine.v2"\n'
    )
    default_config.write_text(text)
    opts = inst.Options(
        containerd_config=default_config,
        config_dir=tmp_path / "coco",
        restrict_oom_score_adj=False,
        link_dir=None,
    )
    inst.install(opts)
    assert _runtimes(default_config)["coco-local"]["runtime_type"] == "io.containerd.coco.v2"
    # the user edits the config after install
    edited = default_config.read_text().replace("oom_score = 0", "oom_score = -5 # mine")
    assert edited != default_config.read_text()
    default_config.write_text(edited)
    inst.uninstall(opts)
    after = default_config.read_text()
    assert "oom_score = -5 # mine" in after
    runtimes = _runtimes(default_config)
    assert runtimes["coco-local"] == {"runtime_type": "mine.v2"}
    assert "coco-qemu" not in runtimes and "coco-remote" not in runtimes
    # the same config as before install (the user's table back, maybe not at the same place)
    expected = tomlkit.parse(text.replace("oom_score = 0", "oom_score = -5")).unwrap()
    assert tomlkit.parse(after).unwrap() == expected


def test_config_files_of_others_are_kept(default_config: Path, tmp_path: Path) -> None:
    mine = tmp_path / "coco" / "configuration-local.toml"
    mine.parent.mkdir()
    mine.write_text("[hypervisor.local]\n# the operator's own\n")
    opts = inst.Options(
        containerd_config=default_config, config_dir=tmp_path / "coco", link_dir=tmp_path / "b"
    )
    inst.install(opts)
    assert mine.read_text() == "[hypervisor.local]\n# the operator's own\n"
    inst.uninstall(opts)
    assert mine.read_text() == "[hypervisor.local]\n# the operator's own\n"
    assert not (tmp_path / "coco" / "configuration-qemu.toml").exists()


def test_missing_config_is_created_and_removed(tmp_path: Path) -> None:
    cfg = tmp_path / "etc" / "config.toml"
    cfg.parent.mkdir()
    said: list[str] = []
    opts = inst.Options(
        containerd_config=cfg,
        config_dir=tmp_path / "coco",
        restrict_oom_score_adj=False,
        link_dir=None,
        say=said.append,
    )
    inst.install(opts)
    assert any(x.startswith("coco-qemu has no pod VM image: give --podvm-image DIR") for x in said)
    doc = tomlkit.parse(cfg.read_text()).unwrap()
    assert doc["version"] == 2
    assert set(doc["plugins"][CRI]["containerd"]["runtimes"]) == set(inst.HANDLERS)
    inst.uninstall(opts)
    assert not cfg.exists()


def test_refusals_leave_nothing(tmp_path: Path) -> None:
    v1 = tmp_path / "v1.toml"
    v1.write_text('root = "/var/lib/containerd"\n[plugins.cri]\n  sandbox_image = "x"\n')
    r = coco("runtime", "install", *_install_args(v1, tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"coco: error: {v1}: expected a containerd config of version 2 (containerd 1.5 and "
        "later), found version 1 (`containerd config migrate` converts it)"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("version = 2\n[plugins\n")
    r = coco("runtime", "install", *_install_args(bad, tmp_path))
    assert r.returncode == 1
    assert r.stderr.startswith(f"coco: error: {bad}: expected a TOML file:")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "coco").exists() and not (tmp_path / "bin").exists()
    assert v1.read_text().startswith('root = "/var/lib/containerd"')


def test_runtimeclasses() -> None:
    r = coco("runtime", "runtimeclasses")
    assert r.returncode == 0
    import yaml

    docs = list(yaml.safe_load_all(r.stdout))
    assert [(d["kind"], d["metadata"]["name"], d["handler"]) for d in docs] == [
        ("RuntimeClass", h, h) for h in ("coco-qemu", "coco-remote", "coco-local")
    ]
    assert "# INSECURE" in r.stdout.split("---")[2]
