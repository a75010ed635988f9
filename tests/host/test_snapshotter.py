"""coco's snapshotter behind a real containerd (1.6, the session fixture's, where it is the CRI
snapshotter): ordinary images are unpacked and run with runc; an image with encrypted layers is
pulled through CRI without any key on the host and without its plaintext reaching the host's disk;
snapshot metadata survives a restart of the snapshotter; removal and Cleanup leave nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from coco.host.pod.cri import CriClient
from tests.host.containerd_fixture import Containerd, CriImages, _busybox_layer
from tests.host.test_pod_run import coco, pod_args, write_pod
from tests.imagekit import tar_layer, write_image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _rows(ctrd: Containerd) -> list[tuple[int, str, str, int, str]]:
    assert ctrd.snapshotter is not None
    db = sqlite3.connect(ctrd.snapshotter.root / "metadata.db")
    try:
        return db.execute("SELECT id, key, parent, kind, labels FROM snapshots").fetchall()
    finally:
        db.close()


def _push(src: Path, dest: str, *extra: str) -> None:
    subprocess.run(
        ["skopeo", "copy", "-q", "--dest-tls-verify=false", *extra, f"oci:{src}:1",
         f"docker://{dest}"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


def _manifest(image: str) -> dict:
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{image}"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    return json.loads(out)


def _files_with(marker: bytes, *roots: Path) -> list[str]:
    found = []
    for root in roots:
        for top, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(top, name)
                try:
                    if not os.path.isfile(path) or os.path.islink(path):
                        continue
                    with open(path, "rb") as f:
                        if marker in f.read():
                            found.append(path)
                except OSError:
                    continue
    return found


def test_runc_pod_runs_from_an_image_the_coco_snapshotter_unpacked(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    pod = write_pod(
        tmp_path,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: snap-runc}}
        spec:
          containers: [{{name: app, image: {test_images.busybox}, command: ["/bin/echo", "from an overlay"]}}]
        """,
    )
    r = coco("pod", "run", str(pod), *pod_args(containerd, tmp_path))
    assert (r.returncode, r.stdout) == (0, "from an overlay\n"), r.stderr
    # the busybox layer was unpacked by coco's snapshotter, not containerd's own
    assert containerd.snapshotter is not None
    committed = [row for row in _rows(containerd) if row[1].startswith("k8s.io/") and row[3] == 3]
    assert committed, _rows(containerd)
    fs = [containerd.snapshotter.root / "snapshots" / str(row[0]) / "fs" for row in committed]
    assert any((d / "bin" / "busybox").is_file() for d in fs)
    # containerd sees them through the proxy plugin (List)
    listing = containerd.ctr("-n", "k8s.io", "snapshots", "--snapshotter", "coco", "ls").stdout
    assert "Committed" in listing


def test_ctr_pull_run_and_remove_leave_nothing(
    containerd: Containerd, test_images: CriImages
) -> None:
    ns = "coco-snap-test"
    image = test_images.busybox
    containerd.ctr("-n", ns, "images", "pull", "--plain-http", "--snapshotter", "coco", image)
    r = containerd.ctr(
        "-n", ns, "run", "--rm", "--snapshotter", "coco", "--fifo-dir",
        str(containerd.base / "fifo"), image, "snap-ctr", "/bin/sh", "-c", "echo ran; ls /bin/sh",
    )  # fmt: skip
    assert r.stdout.split() == ["ran", "/bin/sh"], r.stderr
    ours = [row for row in _rows(containerd) if row[1].startswith(f"{ns}/")]
    assert any(row[3] == 3 for row in ours)  # the image's layer, committed here
    # removing the image (and with it, by containerd's garbage collection, every snapshot of
    # the namespace: the container's rootfs too) removes rows and directories
    containerd.ctr("-n", ns, "images", "rm", "--sync", image)
    assert [row for row in _rows(containerd) if row[1].startswith(f"{ns}/")] == []
    assert containerd.snapshotter is not None
    dirs = {p.name for p in (containerd.snapshotter.root / "snapshots").iterdir()}
    assert dirs == {str(row[0]) for row in _rows(containerd)}
    containerd.ctr("namespaces", "rm", ns)


def test_encrypted_image_pulls_through_cri_without_a_key_or_plaintext_on_the_host(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    registry = test_images.busybox.split("/")[0]
    secret = b"COCO-PLAINTEXT-MARKER-7f3a9c"
    key = tmp_path / "key.pem"
    pub = tmp_path / "pub.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
                   check=True, capture_output=True)  # fmt: skip
    key.unlink()  # only the owner (the KBS) would hold it: nothing on this host can decrypt
    enc = f"{registry}/coco-test/snap-encrypted:1"
    write_image(
        tmp_path / "enc", [_busybox_layer(), tar_layer({"etc/app-secret": secret})], tag="1"
    )
    _push(tmp_path / "enc", enc, "--encryption-key", f"jwe:{pub}")
    layers = _manifest(enc)["layers"]
    assert all(layer["mediaType"].endswith("+encrypted") for layer in layers)
    # the control: the same kind of image in plaintext does land on disk, where the grep looks
    plain_secret = b"COCO-PLAIN-CONTROL-MARKER-51e0"
    plain = f"{registry}/coco-test/snap-plain:1"
    write_image(tmp_path / "plain", [tar_layer({"etc/plain": plain_secret})], tag="1")
    _push(tmp_path / "plain", plain)

    with CriClient(containerd.endpoint) as client:
        ref = client.pull_image(enc, None, None)
        assert ref.startswith("sha256:")
        assert client.image_status(enc) is not None
        client.pull_image(plain, None, None)
    assert containerd.snapshotter is not None
    roots = (containerd.snapshotter.root, containerd.root)
    assert _files_with(plain_secret, *roots) != []
    assert _files_with(secret, *roots) == []
    # no layer blob of the encrypted image was even fetched
    content = set(containerd.ctr("-n", "k8s.io", "content", "ls", "-q").stdout.split())
    assert {layer["digest"] for layer in layers} & content == set()
    skipped = [json.loads(row[4]) for row in _rows(containerd)]
    assert any(
        labels.get("containerd.io/snapshot/coco.guest-pull") == "true"
        and labels.get("containerd.io/snapshot/cri.image-ref") == enc
        for labels in skipped
    )
    log = containerd.snapshotter.log.read_text()
    assert f"of {enc}: pulled in the guest, unpack on the host skipped" in log


def test_snapshots_survive_a_snapshotter_restart(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    with CriClient(containerd.endpoint) as client:
        client.pull_image(test_images.busybox, None, None)
    assert containerd.snapshotter is not None
    before = containerd.ctr("-n", "k8s.io", "snapshots", "--snapshotter", "coco", "ls").stdout
    rows = _rows(containerd)
    containerd.snapshotter.stop()
    containerd.snapshotter.start()
    # containerd noticed the old one go and reconnects with a backoff (grpc-go's, from 1 s):
    # until then it answers "unavailable", as it would to a kubelet, which retries too
    deadline = time.monotonic() + 30
    while True:
        r = containerd.ctr("-n", "k8s.io", "snapshots", "--snapshotter", "coco", "ls", check=False)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.returncode == 0, r.stderr
    after = r.stdout
    assert after == before
    assert _rows(containerd) == rows
    pod = write_pod(
        tmp_path,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: snap-restart}}
        spec:
          containers: [{{name: app, image: {test_images.busybox}, command: ["/bin/echo", "still here"]}}]
        """,
    )
    r = coco("pod", "run", str(pod), *pod_args(containerd, tmp_path))
    assert (r.returncode, r.stdout) == (0, "still here\n"), r.stderr


def test_runtime_install_makes_it_the_cri_snapshotter_and_uninstall_takes_it_back(
    tmp_path: Path,
) -> None:
    import tomllib

    if subprocess.run(["which", "containerd"], capture_output=True).returncode != 0:
        pytest.skip("containerd is not installed")
    cfg = tmp_path / "config.toml"
    default = subprocess.run(
        ["containerd", "config", "default"], check=True, capture_output=True, text=True
    ).stdout
    cfg.write_text(default)
    common = ["--containerd-config", str(cfg), "--config-dir", str(tmp_path / "coco")]
    sock = "/run/coco-test/snap.sock"
    r = coco("runtime", "install", *common, "--no-shim-link", "--snapshotter", sock)
    assert r.returncode == 0, r.stderr
    doc = tomllib.loads(cfg.read_text())
    assert doc["proxy_plugins"]["coco"] == {"type": "snapshot", "address": sock}
    ctrd = doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert (ctrd["snapshotter"], ctrd["disable_snapshot_annotations"]) == ("coco", False)
    # containerd itself accepts the result
    dump = subprocess.run(
        ["containerd", "--config", str(cfg), "config", "dump"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert 'snapshotter = "coco"' in dump and f'address = "{sock}"' in dump

    # changed since install: only coco's entries go, the values they replaced come back
    cfg.write_text(cfg.read_text() + "\n# a note of the admin\n")
    r = coco("runtime", "uninstall", *common)
    assert r.returncode == 0, r.stderr
    doc = tomllib.loads(cfg.read_text())
    assert "coco" not in doc.get("proxy_plugins", {})
    ctrd = doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    old = tomllib.loads(default)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert ctrd["snapshotter"] == old["snapshotter"] == "overlayfs"
    assert ctrd["disable_snapshot_annotations"] is old["disable_snapshot_annotations"] is True
    assert "# a note of the admin" in cfg.read_text()
