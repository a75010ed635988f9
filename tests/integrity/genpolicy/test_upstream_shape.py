"""Our policy_data for the upstream sample pod has upstream's structure and values.

The sample pod ``pod-one-container.yaml`` is regenerated with its images replaced by local ones
carrying the same image configs (busybox and pause cannot be pulled here). Everything that does
not depend on the image bytes (layer ids and root hashes) or on Azure-only settings must come out
as upstream's genpolicy wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from coco.integrity.genpolicy import POLICY_ANNOTATION, generate
from tests.conftest import Registry
from tests.imagekit import tar_layer
from tests.integrity.genpolicy.helpers import Images, opts, policy_of, push

VECTORS = Path("/work/shared/vectors/genpolicy")
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def test_sample_pod_matches_upstream_policy_data(
    images: Images, open_registry: Registry, tmp_path: Path
) -> None:
    upstream = json.loads((VECTORS / "pod-one-container.policy_data.json").read_text())
    busybox = push(open_registry, tmp_path, "gp/busybox", [tar_layer({"bin/busybox": b"bb"})],
                   {"Env": [PATH], "Cmd": ["sh"]})  # fmt: skip
    pause = push(open_registry, tmp_path, "gp/pause65535", [tar_layer({"pause": b"p"})],
                 {"Entrypoint": ["/pause"], "User": "65535:65535", "Env": [PATH]})  # fmt: skip
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"cluster_config": {"pause_container_image": pause}}))
    doc = yaml.safe_load((VECTORS / "pod-one-container.yaml").read_text())
    del doc["metadata"]["annotations"][POLICY_ANNOTATION]
    original_image = doc["spec"]["containers"][0]["image"]
    doc["spec"]["containers"][0]["image"] = busybox
    _, ours = policy_of(
        generate(yaml.safe_dump(doc), "pod.yaml", opts(images, settings=settings)).yaml
    )

    assert list(ours) == list(upstream)  # containers, common, sandbox, request_defaults
    assert ours["sandbox"] == upstream["sandbox"]
    azure = {"virtio_blk_storage_classes", "smb_storage_classes"}
    assert {k: v for k, v in upstream["common"].items() if k not in azure} == ours["common"]
    assert set(ours["request_defaults"]) == set(upstream["request_defaults"])
    assert len(ours["containers"]) == len(upstream["containers"]) == 2
    for o, u in zip(ours["containers"], upstream["containers"], strict=True):
        assert list(o) == list(u)
        assert list(o["OCI"]) == list(u["OCI"])
        assert o["OCI"]["Version"] == u["OCI"]["Version"]
        assert o["OCI"]["Root"] == u["OCI"]["Root"]
        assert o["OCI"]["Linux"] == u["OCI"]["Linux"]
        assert o["sandbox_pidns"] == u["sandbox_pidns"]
        assert o["exec_commands"] == u["exec_commands"]
        op, up = o["OCI"]["Process"], u["OCI"]["Process"]
        assert list(op) == list(up)
        for k in ("Terminal", "Args", "Env", "Cwd", "Capabilities", "NoNewPrivileges"):
            assert op[k] == up[k], k
        assert (op["User"]["UID"], op["User"]["GID"]) == (up["User"]["UID"], up["User"]["GID"])
        ua = dict(u["OCI"]["Annotations"])
        if "io.kubernetes.cri.image-name" in ua:
            assert ua["io.kubernetes.cri.image-name"] == original_image
            ua["io.kubernetes.cri.image-name"] = busybox
        assert o["OCI"]["Annotations"] == ua
        azure_mounts = {"/var/run/secrets/azure/tokens"}
        assert o["OCI"]["Mounts"] == [
            m for m in u["OCI"]["Mounts"] if m["destination"] not in azure_mounts
        ]
        shape = [(s["driver"], s["fstype"], s["mount_point"]) for s in o["storages"]]
        assert shape[-1] == ("overlayfs", "fuse3.kata-overlay", "$(cpath)/$(bundle-id)")
        assert all(s[:2] == ("blk", "tar") for s in shape[:-1])
