"""genpolicy's guest-pull mode: image references as the rules compare them, the layers cache
without verity roots, encrypted images, and the initdata the policy travels in.

The whole pod (the shim's requests to a real agent) is in tests/integrity/test_guest_pull_policy.py.
"""

from __future__ import annotations

import base64
import gzip
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from coco.errors import GenpolicyError
from coco.integrity.agent_policy import AgentPolicy, default_rules
from coco.integrity.genpolicy import INITDATA_ANNOTATION, POLICY_ANNOTATION, generate
from tests.conftest import Registry
from tests.imagekit import tar_layer, write_image
from tests.integrity.genpolicy.helpers import Images, create_container_request, opts, pod, policy_of

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


@pytest.fixture(scope="module")
def refs() -> AgentPolicy:
    """Our rules with one probe rule: is the reference ``got`` the pod's image ``want``?"""
    text = default_rules() + "\nImageRefRequest {\n\timage_ok(input.want, input.got)\n}\n"
    return AgentPolicy(text + "\npolicy_data := {}\n", "rules + probe")


@pytest.mark.parametrize(
    ("want", "got", "ok"),
    [
        # names normalized as the guest's puller does: docker.io, library/, latest
        ("busybox", "docker.io/library/busybox:latest", True),
        ("busybox", "busybox:latest", True),
        ("library/busybox", "docker.io/library/busybox", True),
        ("index.docker.io/library/busybox:1.36", "busybox:1.36", True),
        ("myorg/app:2", "docker.io/myorg/app:2", True),
        ("myorg/app:2", "docker.io/library/app:2", False),
        ("127.0.0.1:5000/gp/app", "127.0.0.1:5000/gp/app:latest", True),
        ("127.0.0.1:5000/gp/app", "127.0.0.2:5000/gp/app:latest", False),
        ("localhost/acc/busybox:1", "localhost/acc/busybox:1", True),
        ("localhost/acc/busybox:1", "docker.io/localhost/acc/busybox:1", False),
        # a tag is the tag, and the host may not pick an image of the repository by digest
        ("busybox:1.36", "docker.io/library/busybox:1.37", False),
        ("busybox", f"docker.io/library/busybox@{D1}", False),
        ("busybox:1.36", f"busybox:1.36@{D1}", False),
        # a pinned digest must be there; the tag, if any, the pod's
        (f"reg.io:5000/app@{D1}", f"reg.io:5000/app@{D1}", True),
        (f"reg.io:5000/app@{D1}", f"reg.io:5000/app@{D2}", False),
        (f"reg.io:5000/app@{D1}", "reg.io:5000/app:latest", False),
        (f"reg.io:5000/app:1@{D1}", f"reg.io:5000/app@{D1}", True),
        (f"reg.io:5000/app:1@{D1}", f"reg.io:5000/app:1@{D1}", True),
        (f"reg.io:5000/app:1@{D1}", f"reg.io:5000/app:2@{D1}", False),
        (f"reg.io:5000/app:1@{D1}", "reg.io:5000/app:1", False),
        (f"reg.io:5000/app:1@{D1}", f"reg.io:5000/other:1@{D1}", False),
    ],
)
def test_image_reference_matching(refs: AgentPolicy, want: str, got: str, ok: bool) -> None:
    assert refs.evaluate("ImageRefRequest", {"want": want, "got": got}).allowed is ok


def test_guest_pull_policy_shape_and_pinned_digest(images: Images, tmp_path: Path) -> None:
    digest = _manifest_digest(images.app)
    pinned = images.app.rsplit(":", 1)[0] + "@" + digest
    res = generate(pod(pinned), "pod.yaml", opts(images, layers="guest-pull"))
    anno = yaml.safe_load(res.yaml)["metadata"]["annotations"]
    assert list(anno) == [INITDATA_ANNOTATION]  # the default annotation: initdata only
    _, data = policy_of(res.yaml)
    app = data["containers"][1]
    assert app["storages"] == [{
        "driver": "image_guest_pull", "driver_options": [], "source": pinned, "fstype": "overlay",
        "options": [], "mount_point": "/run/kata-containers/$(bundle-id)/rootfs", "fs_group": None,
    }]  # fmt: skip
    assert app["OCI"]["Annotations"]["io.kubernetes.cri.image-name"] == pinned
    assert app["OCI"]["Version"] == "1.0.2-dev"  # containerd 1.6's CRI
    # the image config still shapes the process (user from the layers' /etc/passwd)
    assert app["OCI"]["Process"]["Args"] == ["/usr/bin/python3", "/srv/app.py"]
    assert app["OCI"]["Process"]["User"]["UID"] == 1234
    assert res.layers_downloaded == 3  # read for passwd, no verity tree
    # the policy is found in the initdata annotation by `coco policy evaluate --policy POD.yaml`
    (tmp_path / "pod.yaml").write_text(res.yaml)
    (tmp_path / "exec.json").write_text(json.dumps({"process": {"Args": ["/bin/sh"]}}))
    r = subprocess.run(
        [sys.executable, "-m", "coco.cli.main", "policy", "evaluate", "--policy",
         str(tmp_path / "pod.yaml"), "ExecProcessRequest", str(tmp_path / "exec.json")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (r.returncode, r.stdout) == (
        1,
        "denied: ExecProcessRequest: rule exec: process.Args expected [], got /bin/sh\n",
    ), r.stderr


def test_layers_cache_shared_by_both_modes(images: Images, tmp_path: Path) -> None:
    cache = tmp_path / "cache.json"
    gp = opts(images, layers="guest-pull", layers_cache=cache)
    assert generate(pod(images.app), "pod.yaml", gp).layers_downloaded == 3
    entries = json.loads(cache.read_text())
    assert all("verity_hash" not in e for e in entries)  # upstream's guest-pull shape
    assert [e["passwd"] for e in entries if e["passwd"]] != []
    assert generate(pod(images.app), "pod.yaml", gp).layers_downloaded == 0
    # tardev needs the roots: read again, then kept even when guest pull rewrites the cache
    td = opts(images, layers_cache=cache)
    assert generate(pod(images.app), "pod.yaml", td).layers_downloaded == 3
    assert generate(pod(images.app), "pod.yaml", gp).layers_downloaded == 0
    assert all(len(e["verity_hash"]) == 64 for e in json.loads(cache.read_text()))
    assert generate(pod(images.app), "pod.yaml", td).layers_downloaded == 0


def test_initdata_base_document_and_both_annotations(images: Images, tmp_path: Path) -> None:
    base = tmp_path / "base.toml"
    base.write_text(
        'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"cdh.toml" = "[kbc]\\nname = \\"x\\"\\n"\n'
        '"policy.rego" = "package old"\n'
    )
    src = tmp_path / "pod.yaml"
    src.write_text(pod(images.app))
    r = subprocess.run(
        [sys.executable, "-m", "coco.cli.main", "policy", "generate", str(src), "--settings",
         str(images.settings), "--src-tls-verify=false", "--initdata", str(base),
         "--initdata-out", str(tmp_path / "out.toml"), "--annotation", "both"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    anno = yaml.safe_load(src.read_text())["metadata"]["annotations"]
    raw = gzip.decompress(base64.b64decode(anno[INITDATA_ANNOTATION]))
    assert raw == (tmp_path / "out.toml").read_bytes()
    doc = tomllib.loads(raw.decode())
    policy = base64.b64decode(anno[POLICY_ANNOTATION]).decode()
    assert doc["algorithm"] == "sha256"  # the base document's
    assert doc["data"] == {"cdh.toml": '[kbc]\nname = "x"\n', "policy.rego": policy}
    assert policy.startswith("# Agent policy rules of the coco project")


def test_bad_initdata_and_modes_refused_before_any_output(images: Images, tmp_path: Path) -> None:
    src = tmp_path / "pod.yaml"
    src.write_text(pod(images.app))
    before = src.read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text('version = "0.2.0"\nalgorithm = "sha256"\n[data]\n')
    base = [sys.executable, "-m", "coco.cli.main", "policy", "generate", str(src), "--settings",
            str(images.settings), "--src-tls-verify=false"]  # fmt: skip
    r = subprocess.run([*base, "--initdata", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"coco: error: initdata {bad}: version: expected '0.1.0', found '0.2.0'"
    )
    r = subprocess.run([*base, "--layers", "erofs"], capture_output=True, text=True)
    assert r.returncode == 2 and "--layers" in r.stderr and "guest-pull" in r.stderr
    assert src.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "pod.yaml"]
    with pytest.raises(GenpolicyError, match="layers: expected one of guest-pull, tardev"):
        generate(pod(images.app), "pod.yaml", opts(images, layers="erofs"))


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_encrypted_image_needs_no_key_with_guest_pull(
    images: Images, open_registry: Registry, tmp_path: Path
) -> None:
    subprocess.run(["openssl", "genrsa", "-out", str(tmp_path / "k.pem"), "2048"], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run(["openssl", "rsa", "-in", str(tmp_path / "k.pem"), "-pubout", "-out",
                    str(tmp_path / "pub.pem")], check=True, capture_output=True)  # fmt: skip
    plain = write_image(tmp_path / "plain", [tar_layer({"etc/passwd": b"web:x:7:8::/:/bin/sh\n"})],
                        config_extra={"config": {"Cmd": ["/web"], "User": "web"}})  # fmt: skip
    enc = f"{open_registry.host}/gp/encrypted:1"
    r = subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", "--encryption-key",
         f"jwe:{tmp_path / 'pub.pem'}", plain.ref, f"docker://{enc}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    # tardev must read every layer; guest pull leaves them to the guest (and its key)
    with pytest.raises(GenpolicyError, match="encrypted layer"):
        generate(pod(enc), "pod.yaml", opts(images))
    with pytest.raises(GenpolicyError) as e:
        generate(pod(enc), "pod.yaml", opts(images, layers="guest-pull"))
    assert str(e.value).endswith(
        "config.User 'web': user 'web' cannot be looked up: the image's layers are encrypted; "
        "give a numeric runAsUser (and runAsGroup) in the pod"
    )
    res = generate(
        pod(enc, securityContext={"runAsUser": 7, "runAsGroup": 8}),
        "pod.yaml",
        opts(images, layers="guest-pull"),
    )
    _, data = policy_of(res.yaml)
    user = data["containers"][1]["OCI"]["Process"]["User"]
    assert (user["UID"], user["GID"]) == (7, 8)
    assert data["containers"][1]["storages"][0]["source"] == enc
    assert res.layers_downloaded == 1  # the pause image's layer only


def _manifest_digest(ref: str) -> str:
    r = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
        capture_output=True, check=True,
    )  # fmt: skip
    import hashlib

    return "sha256:" + hashlib.sha256(r.stdout).hexdigest()


def test_storage_of_another_mode_is_refused(images: Images) -> None:
    """A host answering a guest-pull policy with a tardev layer (its own block device as the
    root) meets a check that names it, not a silence."""
    _, gp = policy_of(generate(pod(images.app), "p.yaml", opts(images, layers="guest-pull")).yaml)
    _, td = policy_of(generate(pod(images.app), "p.yaml", opts(images)).yaml)
    req = create_container_request(td, 1)
    req["storages"] = req["storages"][:1]  # as many storages as the policy has
    whys = [
        str(v) for v in AgentPolicy.from_data(gp).evaluate("CreateContainerRequest", req).violations
    ]
    layer = req["storages"][0]["mount_point"]
    assert (
        f"rule storages: storages[0] ({layer}) expected a storage the policy lists, got blk" in whys
    )
    # and the other way round: a guest pull where the policy holds the layers' roots
    req = create_container_request(td, 1)
    pull = {"driver": "image_guest_pull", "driver_options": ['image_guest_pull={"metadata":{}}'],
            "source": images.app, "fstype": "overlay", "options": [], "fs_group": None,
            "mount_point": req["OCI"]["Root"]["Path"]}  # fmt: skip
    req["storages"][-1] = pull
    whys = [
        str(v) for v in AgentPolicy.from_data(td).evaluate("CreateContainerRequest", req).violations
    ]
    assert any(w.startswith("rule storages: storages[2] (") and "no image_guest_pull storage" in w
               for w in whys), whys  # fmt: skip
