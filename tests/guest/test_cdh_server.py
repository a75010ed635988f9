"""``coco cdh serve`` as a process (offline_fs_kbc from a JSON file), called over ttRPC by coco.rpc's
client, by the ``coco cdh`` command-line clients and by ``coco image pull`` through the
``attestation-agent`` keyprovider's ``ttrpc`` form; errors keep upstream's texts and the server
keeps serving after each."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coco.cli.main import main
from coco.crypto.jose import public_jwk
from coco.guest.cdh.annotation_packet import wrap_key
from coco.guest.cdh.secret import seal, vault_payload
from coco.rpc import Code, RpcError, Stub, SyncClient
from coco.rpc.protos import confidential_data_hub_pb2 as pb
from coco.rpc.protos import keyprovider_pb2 as kpb
from coco.rpc.services import GET_RESOURCE, KEY_PROVIDER, SEALED_SECRET, SECURE_MOUNT

from .test_cdh_pull import KID, Encrypted, encrypted  # noqa: F401 (the fixture)

SECRET_KID = "kbs:///default/sealed-secret-key/1"


@dataclass
class Served:
    socket: str
    work: Path
    signing_key: ec.EllipticCurvePrivateKey
    proc: subprocess.Popen[bytes]


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"coco cdh serve did not start: {log.read_text()}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, encrypted: Encrypted) -> Iterator[Served]:  # noqa: F811
    d = tmp_path_factory.mktemp("cdh-serve")
    key = ec.generate_private_key(ec.SECP256R1())
    resources = {
        "default/key/key_id1": encrypted.kek,
        "default/sealed-secret-key/1": json.dumps(public_jwk(key)).encode(),
        "default/app/password": b"s3cr3t",
    }
    (d / "resources.json").write_text(
        json.dumps({k: base64.b64encode(v).decode() for k, v in resources.items()})
    )
    sock = d / "cdh.sock"
    (d / "cdh.toml").write_text(
        f'socket = "unix://{sock}"\n[kbc]\nname = "offline_fs_kbc"\n'
        f'[image]\nwork_dir = "{d / "work"}"\n'
        f'[[image.registry_config.registry]]\nlocation = "{encrypted.registry.host}"\ninsecure = true\n'
    )
    env = {**os.environ, "OFFLINE_FS_KBC_EXTRA_FILE_PATH": str(d / "resources.json")}
    log = d / "serve.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coco.cli.main", "cdh", "serve", "--config", str(d / "cdh.toml"),
             "--ocicrypt-config", str(d / "ocicrypt_config.json")],
            env=env, stdout=logf, stderr=logf,
        )  # fmt: skip
    try:
        _wait_for(sock, proc, log)
        yield Served(f"unix://{sock}", d / "work", key, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        from coco.image.bundle import remove_bundle
        from coco.image.store import LayerStore

        if (d / "work/store").exists():
            store = LayerStore(d / "work/store")
            for b in list(store.bundles()):
                remove_bundle(store, b)
    assert proc.returncode == 0, log.read_text()
    assert not sock.exists()  # removed on SIGTERM


def test_services(served: Served) -> None:
    with SyncClient(served.socket) as c:
        res = Stub(c, GET_RESOURCE).GetResource(
            pb.GetResourceRequest(ResourcePath="kbs:///default/app/password")
        )
        assert res.Resource == b"s3cr3t"
        with pytest.raises(RpcError) as e:
            Stub(c, GET_RESOURCE).GetResource(
                pb.GetResourceRequest(ResourcePath="kbs:///default/app/absent")
            )
        assert e.value.code == Code.INTERNAL and e.value.message.startswith("[CDH] [ERROR]: ")
        assert "default/app/absent" in e.value.message
        secret = seal(vault_payload("kbs:///default/app/password"), SECRET_KID, served.signing_key)
        out = Stub(c, SEALED_SECRET).UnsealSecret(pb.UnsealSecretInput(secret=secret.encode()))
        assert out.plaintext == b"s3cr3t"
        forged = seal(
            vault_payload("kbs:///default/app/password"),
            SECRET_KID,
            ec.generate_private_key(ec.SECP256R1()),
        )
        with pytest.raises(
            RpcError, match=r"\[CDH\] \[ERROR\]: sealed secret .*signature does not verify"
        ):
            Stub(c, SEALED_SECRET).UnsealSecret(pb.UnsealSecretInput(secret=forged.encode()))
        # UnWrapKey: the answer is the int-array JSON; WrapKey is declared but not implemented
        packet = wrap_key(b'{"symkey":"x"}', KID, served_kek(served))
        req = {"op": "keyunwrap", "keywrapparams": {"ec": None, "optsdata": None},
               "keyunwrapparams": {"dc": None, "annotation": base64.b64encode(packet.to_json()).decode()}}  # fmt: skip
        kp = Stub(c, KEY_PROVIDER)
        answer = kp.UnWrapKey(
            kpb.KeyProviderKeyWrapProtocolInput(
                KeyProviderKeyWrapProtocolInput=json.dumps(req).encode()
            )
        )
        assert json.loads(answer.KeyProviderKeyWrapProtocolOutput) == {
            "keyunwrapresults": {"optsdata": list(b'{"symkey":"x"}')}
        }
        with pytest.raises(RpcError) as e:
            kp.UnWrapKey(kpb.KeyProviderKeyWrapProtocolInput(KeyProviderKeyWrapProtocolInput=b"{"))
        assert e.value.code == Code.INTERNAL and e.value.message.startswith(
            "[ERROR] UnwrapKey Parse request failed"
        )
        with pytest.raises(RpcError) as e:
            kp.WrapKey(kpb.KeyProviderKeyWrapProtocolInput(KeyProviderKeyWrapProtocolInput=b"{}"))
        assert (e.value.code, e.value.message) == (
            Code.NOT_FOUND,
            "/keyprovider.KeyProviderService/WrapKey is not supported",
        )
        # SecureMount: checked, then refused here for want of device mapper (the real one runs in a VM)
        with pytest.raises(RpcError, match=r"\[CDH\] \[ERROR\]: .*device mapper is not available"):
            Stub(c, SECURE_MOUNT).SecureMount(pb.SecureMountRequest(
                volume_type="block-device", options={"devicePath": "/dev/vdb", "sourceType": "empty",
                                                     "encryptionType": "luks2"}, mount_point="/mnt/x"))  # fmt: skip
        with pytest.raises(RpcError, match="unknown volume type"):
            Stub(c, SECURE_MOUNT).SecureMount(
                pb.SecureMountRequest(volume_type="nfs", mount_point="/mnt/x")
            )
        # still serving
        assert (
            Stub(c, GET_RESOURCE)
            .GetResource(pb.GetResourceRequest(ResourcePath="kbs:///default/app/password"))
            .Resource
            == b"s3cr3t"
        )
    assert json.loads((served.work.parent / "ocicrypt_config.json").read_text()) == {
        "key-providers": {"attestation-agent": {"ttrpc": served.socket}}
    }


def served_kek(served: Served) -> bytes:
    with SyncClient(served.socket) as c:
        return Stub(c, GET_RESOURCE).GetResource(pb.GetResourceRequest(ResourcePath=KID)).Resource


def _cli(capsysbinary, *args: str) -> tuple[int, bytes, bytes]:
    capsysbinary.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsysbinary.readouterr()
    return code, out.out, out.err


def test_cli_clients(served: Served, encrypted: Encrypted, tmp_path: Path, capsysbinary) -> None:  # noqa: F811
    s = ["--socket", served.socket]
    assert _cli(capsysbinary, "cdh", "get-resource", "kbs:///default/app/password", *s)[:2] == (
        0,
        b"s3cr3t",
    )
    code, _, err = _cli(capsysbinary, "cdh", "get-resource", "kbs:///default/app", *s)
    assert (
        code == 1
        and b"[CDH] [ERROR]:" in err
        and b"3 path segments" in err
        and err.count(b"\n") == 1
    )
    secret = seal(vault_payload("kbs:///default/app/password"), SECRET_KID, served.signing_key)
    assert _cli(capsysbinary, "cdh", "unseal", secret, *s)[:2] == (0, b"s3cr3t")
    bundle = tmp_path / "bundle"
    code, out, err = _cli(capsysbinary, "cdh", "pull-image", encrypted.image, str(bundle), *s)
    assert code == 0, err
    assert out.decode().strip() == encrypted.manifest_digest
    assert (bundle / "rootfs/etc/motd").read_bytes() == encrypted.motd
    code, _, err = _cli(
        capsysbinary,
        "cdh",
        "pull-image",
        encrypted.registry.host + "/cdh/absent:v1",
        str(tmp_path / "b2"),
        *s,
    )
    assert code == 1 and b"[CDH] [ERROR]: PullImage" in err
    assert not (tmp_path / "b2").exists()


def test_keygen_and_seal_cli(tmp_path: Path, capsysbinary, served: Served) -> None:
    code, out, _ = _cli(capsysbinary, "cdh", "keygen", "--kid", "k1", "--output-dir", str(tmp_path))
    assert code == 0
    priv, pub = out.decode().split()
    code, out, err = _cli(capsysbinary, "cdh", "seal", "vault", "--signing-kid", SECRET_KID,
                          "--signing-jwk-path", priv, "--name", "kbs:///default/app/password")  # fmt: skip
    assert code == 0, err
    # signed by the new key, not by the one the KBS holds for SECRET_KID: the hub refuses it
    code, _, err = _cli(
        capsysbinary, "cdh", "unseal", out.decode().strip(), "--socket", served.socket
    )
    assert code == 1 and b"signature does not verify" in err
    code, _, err = _cli(
        capsysbinary,
        "cdh",
        "seal",
        "vault",
        "--signing-kid",
        "x",
        "--signing-jwk-path",
        pub,
        "--name",
        "kbs:///a/b/c",
    )
    assert code == 1 and b"expected a private EC P-256 JWK" in err


def test_image_pull_through_the_hub_keyprovider(
    served: Served,
    encrypted: Encrypted,  # noqa: F811
    tmp_path: Path,
    monkeypatch,
    capsysbinary,
) -> None:
    cfg = tmp_path / "ocicrypt.json"
    cfg.write_text(json.dumps({"key-providers": {"attestation-agent": {"ttrpc": served.socket}}}))
    monkeypatch.setenv("OCICRYPT_KEYPROVIDER_CONFIG", str(cfg))
    code, _, err = _cli(
        capsysbinary, "image", "pull", "-q", "--flatten", "--tls-verify=false", "--store", str(tmp_path / "store"),
        "--decryption-key", f"provider:attestation-agent:{KID}",
        f"docker://{encrypted.image}", str(tmp_path / "bundle"),
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "bundle/rootfs/etc/motd").read_bytes() == encrypted.motd
