"""config.json generation, and a real ``runc run`` of a bundle built from the store."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from coco.errors import BundleError
from coco.image import LayerStore, create_bundle, remove_bundle, runtime_config

from ._util import D, F, L, diff_id, tar

PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n"
GROUP = b"root:x:0:\nappgrp:x:1001:\nwheel:x:10:app,root\naudio:x:29:app\n"


def _rootfs(tmp_path: Path, passwd: bytes = PASSWD, group: bytes = GROUP) -> Path:
    r = tmp_path / "rootfs"
    (r / "etc").mkdir(parents=True)
    (r / "etc/passwd").write_bytes(passwd)
    (r / "etc/group").write_bytes(group)
    return r


def test_process_from_image_config(tmp_path: Path) -> None:
    cfg = {
        "Entrypoint": ["/bin/app", "--flag"],
        "Cmd": ["arg"],
        "Env": ["A=1"],
        "WorkingDir": "/srv",
        "User": "app",
        "Labels": {"x": "y"},
    }
    spec = runtime_config({"config": cfg, "rootfs": {}}, rootfs=_rootfs(tmp_path))
    p = spec["process"]
    assert p["args"] == ["/bin/app", "--flag", "arg"]
    assert p["env"][0].startswith("PATH=") and p["env"][1:] == ["A=1"]
    assert p["cwd"] == "/srv" and p["terminal"] is False
    assert p["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [10, 29]}
    assert spec["root"]["path"] == "rootfs"
    assert {m["destination"] for m in spec["mounts"]} >= {"/proc", "/dev", "/sys"}
    assert spec["annotations"] == {"x": "y"}


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("", {"uid": 0, "gid": 0}),
        ("1000", {"uid": 1000, "gid": 1001}),
        ("4242", {"uid": 4242, "gid": 0}),
        ("4242:7", {"uid": 4242, "gid": 7}),
        ("app:wheel", {"uid": 1000, "gid": 10}),
        ("root:audio", {"uid": 0, "gid": 29}),
    ],
)
def test_user_forms(tmp_path: Path, user: str, expected: dict) -> None:
    spec = runtime_config({"Cmd": ["x"], "User": user}, rootfs=_rootfs(tmp_path))
    got = dict(spec["process"]["user"])
    got.pop("additionalGids", None)
    assert got == expected


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"Cmd": ["x"], "User": "nobody"}, "user 'nobody'"),
        ({"Cmd": ["x"], "User": "app:nogroup"}, "group 'nogroup'"),
        ({}, "Entrypoint"),
        ({"Cmd": "sh -c x"}, "Cmd: expected a list"),
        ({"Cmd": ["x"], "Env": "A=1"}, "Env: expected a list"),
        ({"Cmd": ["x"], "WorkingDir": "relative"}, "WorkingDir"),
    ],
)
def test_bad_configs(tmp_path: Path, cfg: dict, match: str) -> None:
    with pytest.raises(BundleError, match=match):
        runtime_config(cfg, rootfs=_rootfs(tmp_path))


def test_passwd_symlink_not_followed(tmp_path: Path) -> None:
    r = tmp_path / "rootfs"
    (r / "etc").mkdir(parents=True)
    host = tmp_path / "host-passwd"
    host.write_text("app:x:4444:4444::/:/bin/sh\n")
    (r / "etc/passwd").symlink_to(host)
    with pytest.raises(BundleError, match="user 'app'"):
        runtime_config({"Cmd": ["x"], "User": "app"}, rootfs=r)


@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "overlay"])
def test_runc_runs_bundle(store: LayerStore, tmp_path: Path, flatten: bool) -> None:
    runc = shutil.which("runc")
    busybox = shutil.which("busybox") or "/bin/busybox"
    if runc is None or not Path(busybox).exists():
        pytest.skip("runc and busybox-static are needed")
    layer = tar(
        [
            D("bin/"),
            F("bin/busybox", Path(busybox).read_bytes(), mode=0o755),
            L("bin/sh", "busybox"),
            D("etc/"),
            F("etc/passwd", PASSWD),
            F("etc/group", GROUP),
            D("tmp/", mode=0o1777),
        ]
    )
    top = tar([D("etc/"), F("etc/motd", b"from the top layer\n")])
    for data in (layer, top):
        store.add_layer(diff_id(data), io.BytesIO(data))
    cfg = {"config": {"Entrypoint": ["/bin/busybox"], "Cmd": ["echo", "hello"]}, "rootfs": {}}
    b = create_bundle(
        store,
        [diff_id(layer), diff_id(top)],
        tmp_path / "bundle",
        image_config=cfg,
        flatten=flatten,
    )
    assert json.loads((b.path / "config.json").read_text())["process"]["args"] == [
        "/bin/busybox",
        "echo",
        "hello",
    ]
    cid = f"coco-test-{tmp_path.name[-20:]}-{int(flatten)}"
    state = tmp_path / "runc-state"
    proc = subprocess.run(
        [runc, "--root", str(state), "run", "--bundle", str(b.path), cid],
        capture_output=True,
        timeout=60,
        check=False,
    )
    subprocess.run([runc, "--root", str(state), "delete", "-f", cid], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"hello\n"
    remove_bundle(store, b.path)
    assert not b.path.exists()
