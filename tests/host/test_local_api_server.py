"""The API server of a ``coco-local`` pod: a container reaches its own pod's ``127.0.0.1:8006``.

The local sandbox runs ``coco api-server serve`` in the pod's network namespace (from CNI) with
the agent, so its containers get a 200 from ``/info``; two pods at once each have their own (a
shared host port would make the second sandbox fail)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.host.containerd_fixture import Containerd, CriImages, _busybox_layer
from tests.host.test_pod_local import _args, _initdata, _nothing_left
from tests.host.test_pod_run import coco, write_pod
from tests.imagekit import tar_layer, write_image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROBE = (
    "wget -q -O- http://127.0.0.1:8006/info && echo && readlink /proc/self/ns/net && "
    "ip -o -4 addr show eth0"
)


def _image(tmp_path: Path, registry: str) -> str:
    """busybox with wget, readlink and ip (the session busybox image has no wget)."""
    image = f"{registry}/coco-test/busybox-wget:1"
    tools = {f"bin/{a}": "->busybox" for a in ("wget", "readlink")}
    write_image(tmp_path / "img", [_busybox_layer(), tar_layer(tools, mode=0o755)], tag="1")
    subprocess.run(
        ["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{tmp_path / 'img'}:1",
         f"docker://{image}"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return image


def _pod(tmp_path: Path, name: str, image: str, registry: str, command: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return write_pod(
        d,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata:
          name: {name}
          annotations:
            io.katacontainers.config.hypervisor.cc_init_data: {_initdata(registry, deny="")}
        spec:
          runtimeClassName: coco-local
          terminationGracePeriodSeconds: 1
          containers:
          - name: app
            image: {image}
            command: ["/bin/sh", "-c", {json.dumps(command)}]
        """,
    )


def test_a_container_of_a_local_pod_reaches_its_own_api_server(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    registry = test_images.busybox.split("/")[0]
    image = _image(tmp_path, registry)
    ep = ["--runtime-endpoint", containerd.endpoint]
    first = _pod(tmp_path, "api-a", image, registry, "echo up; exec sleep 600")
    r = coco("pod", "run", "-d", str(first), *_args(containerd, tmp_path / "api-a"), timeout=400)
    assert r.returncode == 0, r.stderr
    try:
        # a second pod while the first runs: its own API server, in its own network namespace
        second = _pod(tmp_path, "api-b", image, registry, PROBE)
        r = coco("pod", "run", str(second), *_args(containerd, tmp_path / "api-b"), timeout=400)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert json.loads(lines[0])["feature"] == "resource"
        assert lines[1].startswith("net:[") and lines[1] != os.readlink("/proc/self/ns/net")
        assert " 10.250." in lines[2]  # the address the test CNI plugin gave the pod

        r = coco("pod", "exec", "api-a", *ep, "--", "/bin/sh", "-c", PROBE)
        assert r.returncode == 0, r.stderr
        here = r.stdout.splitlines()
        assert json.loads(here[0])["feature"] == "resource"
        assert here[1] not in (lines[1], os.readlink("/proc/self/ns/net"))
    finally:
        d = coco("pod", "delete", "api-a", "--grace-period", "1", *ep)
    assert d.returncode == 0, d.stderr
    _nothing_left(containerd, tmp_path / "api-a")
