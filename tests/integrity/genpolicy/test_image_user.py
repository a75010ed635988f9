"""The generated policy and the bundle the guest pulls agree on the container's user.

Both resolve the image config's ``User`` with coco.oci.user: the bundle against the rootfs, the
policy against the passwd and group files read out of the layers. A group name (``app:app``) was
refused by genpolicy while the puller resolved it, so no policy could be made for such an image.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coco.image.pull import PullOptions, pull_image
from coco.integrity.agent_policy import AgentPolicy
from coco.integrity.genpolicy import generate
from coco.oci.transport import Access
from tests.conftest import Registry
from tests.imagekit import tar_layer
from tests.integrity.genpolicy.helpers import (
    Images,
    create_container_request,
    opts,
    pod,
    policy_of,
    push,
)

PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1234:4321:app:/home/app:/bin/sh\n"
GROUP = b"root:x:0:\nusers:x:4321:\napp:x:2345:\nextra:x:3456:app\n"


@pytest.mark.parametrize(
    "user", ["app:app", "app", "1234:app", "app:77", "1234"], ids=lambda u: u.replace(":", "-")
)
@pytest.mark.parametrize("layers", ["guest-pull", "tardev"])
def test_policy_allows_the_pulled_process_user(
    images: Images, open_registry: Registry, tmp_path: Path, user: str, layers: str
) -> None:
    repo = f"gp/user-{layers}-{user.replace(':', '-')}"
    ref = push(
        open_registry,
        tmp_path,
        repo,
        [tar_layer({"etc/passwd": PASSWD, "etc/group": GROUP}), tar_layer({"bin/app": b"app"})],
        {"User": user, "Cmd": ["/bin/app"]},
    )
    res = pull_image(
        f"docker://{ref}",
        tmp_path / "bundle",
        tmp_path / "store",
        PullOptions(access=Access(tls_verify=False), flatten=True),
    )
    pulled = json.loads((res.bundle.path / "config.json").read_text())["process"]["user"]
    _, data = policy_of(generate(pod(ref), "pod.yaml", opts(images, layers=layers)).yaml)
    policy_user = data["containers"][1]["OCI"]["Process"]["User"]
    assert (policy_user["UID"], policy_user["GID"]) == (pulled["uid"], pulled["gid"])
    if user == "app:app":
        assert (pulled["uid"], pulled["gid"]) == (1234, 2345)  # the group named, not passwd's
    if layers == "tardev":  # the tests' request builder makes the tardev storages
        req = create_container_request(data, 1)
        req["OCI"]["Process"]["User"].update(UID=pulled["uid"], GID=pulled["gid"])
        assert AgentPolicy.from_data(data).evaluate("CreateContainerRequest", req).allowed
        req["OCI"]["Process"]["User"]["UID"] = 0  # and the check is real
        assert not AgentPolicy.from_data(data).evaluate("CreateContainerRequest", req).allowed
