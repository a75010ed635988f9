"""Test helpers: push images to the test registry; build the agent requests a pod would cause.

``create_container_request`` plays containerd + the Kata runtime: from a container of a
generated ``policy_data`` it builds the concrete CreateContainerRequest the host would send for
it (placeholders filled with run-time values: sandbox id, bundle path, layer storages).
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from coco.integrity.genpolicy import INITDATA_ANNOTATION, POLICY_ANNOTATION, Options
from coco.oci.copy import CopyOptions, copy_image
from coco.oci.transport import Access
from tests.conftest import Registry
from tests.imagekit import tar_layer, write_image

SANDBOX_ID = "4bbf2a6b6b510a279cd17b2bfc8b64d39c11ebb55f855ba78a0034c4fe394246"
CONTAINER_ID = "9f0e7c5c1a7b4c6f8d2e3a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d"
POD_UID = "3a371de8-72b3-4bf8-9b5d-9dbb91e59fe3"
CPATH = "/run/kata-containers/shared/containers"
LAYERS = "/run/kata-containers/sandbox/layers/"


def push(
    registry: Any,
    tmp: Path,
    repo: str,
    layers: list[bytes],
    config: dict[str, Any] | None = None,
    compression: str = "gzip",
    config_extra: dict[str, Any] | None = None,
) -> str:
    """Write an image and copy it into the registry; return ``host/repo:latest``."""
    extra = dict(config_extra or {})
    if config:
        extra["config"] = config
    img = write_image(
        tmp / repo.replace("/", "_"), layers, config_extra=extra or None, compression=compression
    )
    copy_image(img.ref, registry.url(repo), options=CopyOptions(dest_tls_verify=False))
    return f"{registry.host}/{repo}:latest"


def _fill(s: str, cid: str, sandbox_name: str, namespace: str) -> str:
    out = (
        s.replace("$(sfprefix)", f"{CPATH}/{cid}-0123456789abcdef-")
        .replace("$(cpath)", CPATH)
        .replace("$(bundle-id)", cid)
        .replace("$(sandbox-id)", SANDBOX_ID)
        .replace("$(sandbox-name)", sandbox_name)
        .replace("$(sandbox-namespace)", namespace)
    )
    if s.startswith(("^", "$(sfprefix)")) and out.endswith("$"):
        out = out.removeprefix("^")[:-1].replace("\\", "")
    return out


def create_container_request(
    pd: dict[str, Any], index: int, *, sandbox_name: str | None = None
) -> dict[str, Any]:
    p = copy.deepcopy(pd["containers"][index])
    oci = p["OCI"]
    anno = oci["Annotations"]
    sandbox_name = sandbox_name or anno["io.kubernetes.cri.sandbox-name"]
    namespace = anno["io.kubernetes.cri.sandbox-namespace"]
    pause = anno["io.kubernetes.cri.container-type"] == "sandbox"
    cid = SANDBOX_ID if pause else CONTAINER_ID
    annotations = {
        "io.katacontainers.pkg.oci.bundle_path": f"/run/containerd/io.containerd.runtime.v2.task/k8s.io/{cid}",
        "io.kubernetes.cri.sandbox-id": SANDBOX_ID,
        "io.kubernetes.cri.sandbox-name": sandbox_name,
        "io.kubernetes.cri.sandbox-namespace": namespace,
        "io.kubernetes.cri.sandbox-uid": POD_UID,
        "io.kubernetes.cri.container-type": anno["io.kubernetes.cri.container-type"],
        "io.katacontainers.pkg.oci.container_type": anno[
            "io.katacontainers.pkg.oci.container_type"
        ],
    }
    if pause:
        annotations["io.kubernetes.cri.sandbox-log-directory"] = (
            f"/var/log/pods/{namespace}_{sandbox_name}_{POD_UID}"
        )
        annotations["nerdctl/network-namespace"] = (
            "/var/run/netns/cni-04edf9ab-d968-fa0f-1c47-2707af676350"
        )
    else:
        annotations["io.kubernetes.cri.container-name"] = anno["io.kubernetes.cri.container-name"]
        annotations["io.kubernetes.cri.image-name"] = anno["io.kubernetes.cri.image-name"]
    caps = {}
    for k, v in oci["Process"]["Capabilities"].items():
        if v == ["$(default_caps)"]:
            v = pd["common"]["default_caps"]
        elif v == ["$(privileged_caps)"]:
            v = pd["common"]["privileged_caps"]
        caps[k] = list(v)
    env = []
    for e in oci["Process"]["Env"]:
        e = (
            e.replace("$(host-name)", sandbox_name)
            .replace("$(pod-ip)", "10.244.0.7")
            .replace("$(node-name)", "node-1")
        )
        env.append(e.replace("$(sandbox-name)", sandbox_name))
    process = dict(oci["Process"])
    process.update(
        Capabilities=caps,
        Env=env,
        Args=[
            a.replace("$(sandbox-name)", sandbox_name).replace("$$", "$") for a in process["Args"]
        ],
        ApparmorProfile="",
        ConsoleSize=None,
        OOMScoreAdj=-998,
        Rlimits=[],
        SelinuxLabel="",
    )
    mounts = [
        {
            "destination": m["destination"],
            "source": _fill(m["source"], cid, sandbox_name, namespace),
            "type_": m["type_"],
            "options": m["options"],
        }
        for m in oci["Mounts"]
    ]
    overlay = next(s for s in p["storages"] if s["driver"] == "overlayfs")
    ids = overlay["options"][0].split(":")
    hashes = overlay["options"][1].split(":")
    storages = []
    for i, (lid, h) in enumerate(zip(ids, hashes, strict=True)):
        storages.append(
            {
                "driver": "blk",
                "driver_options": [],
                "source": f"0001:00:0{i + 1}.0",
                "fstype": "tar",
                "options": [
                    "ro",
                    "io.katacontainers.fs-opt.block_device=file",
                    "io.katacontainers.fs-opt.is-layer",
                    f"io.katacontainers.fs-opt.root-hash={h}",
                ],
                "mount_point": LAYERS + lid,
                "fs_group": None,
            }
        )
    layer_opts = [
        "io.katacontainers.fs-opt.layer="
        + base64.b64encode(
            f"{lid},tar,ro,io.katacontainers.fs-opt.block_device=file,io.katacontainers.fs-opt.is-layer,"
            f"io.katacontainers.fs-opt.root-hash={h}".encode()
        ).decode()
        for lid, h in zip(ids, hashes, strict=True)
    ]
    storages.append(
        {
            "driver": "overlayfs",
            "driver_options": [],
            "source": "none",
            "fstype": "fuse3.kata-overlay",
            "options": [
                "io.katacontainers.fs-opt.layer-src-prefix=/var/lib/containerd/io.containerd.snapshotter.v1.tardev/layers",
                *layer_opts,
                "io.katacontainers.fs-opt.overlay-rw",
                "lowerdir=" + ":".join(ids),
            ],
            "mount_point": f"{CPATH}/{cid}",
            "fs_group": None,
        }
    )
    for s in p["storages"]:
        if s["driver"] not in ("blk", "overlayfs"):
            s = dict(s)
            s["mount_point"] = _fill(s["mount_point"], cid, sandbox_name, namespace)
            storages.append(s)
    return {
        "container_id": cid,
        "exec_id": cid,
        "OCI": {
            "Version": oci["Version"],
            "Annotations": annotations,
            "Hooks": None,
            "Hostname": sandbox_name if pause else "",
            "Linux": dict(
                oci["Linux"], Seccomp=None, CgroupsPath="/kubepods/x", Devices=[], Resources={}
            ),
            "Mounts": mounts,
            "Process": process,
            "Root": {"Path": f"{CPATH}/{cid}", "Readonly": oci["Root"]["Readonly"]},
            "Solaris": None,
            "Windows": None,
        },
        "devices": [],
        "sandbox_pidns": p["sandbox_pidns"],
        "shared_mounts": [],
        "storages": storages,
        "string_user": None,
    }


def chain_layer_ids(diff_ids: list[str]) -> list[str]:
    """Layer ids (bottom first) computed here, independently of the generator."""
    out, chain = [], None
    for d in diff_ids:
        chain = (
            d if chain is None else "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
        )
        out.append(hashlib.sha256(chain.encode()).hexdigest())
    return out


def is_hex64(s: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{64}", s) is not None


PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1234:4321:app:/home/app:/bin/sh\n"


class Images:
    """The test images, pushed once per module: a pause image, an app image, a zstd one."""

    def __init__(self, registry: Registry, tmp: Path) -> None:
        self.pause_layers = [tar_layer({"pause": b"\x7fELF pause binary"})]
        self.pause = push(
            registry,
            tmp,
            "gp/pause",
            self.pause_layers,
            {"Entrypoint": ["/pause"], "User": "65535:65535"},
        )
        self.app_layers = [
            tar_layer({"etc/passwd": PASSWD, "bin/sh": b"#!shell"}),
            tar_layer({"srv/app.py": b"print('hi')\n" * 100}),
        ]
        self.app = push(
            registry,
            tmp,
            "gp/app",
            self.app_layers,
            {
                "Entrypoint": ["/usr/bin/python3"],
                "Cmd": ["/srv/app.py"],
                "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
                "WorkingDir": "/srv",
                "User": "app",
            },
        )
        self.zstd = push(
            registry,
            tmp,
            "gp/zstd",
            [tar_layer({"z": b"zstd layer"})],
            {"Cmd": ["/z"]},
            compression="zstd",
        )
        self.settings = tmp / "settings.json"
        self.settings.write_text(
            json.dumps({"cluster_config": {"pause_container_image": self.pause}})
        )
        self.tmp = tmp


def pod(image: str, **container: Any) -> str:
    c = {"name": "app", "image": image, **container}
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"runtimeClassName": "kata-cc", "containers": [c]},
        }
    )


def opts(images: Images, **kw: Any) -> Options:
    """Options for the tests of the tardev mode (``layers="guest-pull"`` for the other)."""
    kw.setdefault("settings", images.settings)
    kw.setdefault("layers", "tardev")
    return Options(access=Access(tls_verify=False), **kw)


def policy_of(doc_yaml: str) -> tuple[str, dict[str, Any]]:
    """(policy text, policy_data) of the pod: from the initdata annotation, read independently
    of the generator (base64, gzip, TOML), or else the legacy policy annotation."""
    anno = yaml.safe_load(doc_yaml)["metadata"]["annotations"]
    if INITDATA_ANNOTATION in anno:
        doc = tomllib.loads(gzip.decompress(base64.b64decode(anno[INITDATA_ANNOTATION])).decode())
        text = doc["data"]["policy.rego"]
    else:
        text = base64.b64decode(anno[POLICY_ANNOTATION]).decode()
    data = json.loads(text.split("\npolicy_data := ", 1)[1])
    return text, data
