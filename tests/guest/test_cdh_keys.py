"""UnWrapKey: AnnotationPackets as coco_keyprovider writes them (spec §9), answered as ocicrypt-rs
expects (spec §3.2), through the hub and through coco.ocicrypt's in-process key provider."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from coco.errors import CocoError
from coco.guest.cdh.annotation_packet import AnnotationPacket, wrap_key
from coco.guest.cdh.config import CdhConfig, KbcConfig
from coco.guest.cdh.errors import UnwrapKeyError
from coco.guest.cdh.hub import Hub
from coco.guest.cdh.kms import KmsContext, new_encryptor
from coco.guest.cdh.kms.local import create_key
from coco.ocicrypt.keywrap import KeyUnwrapError
from coco.ocicrypt.keywrap.keyprovider import KeyProvider, register_native

from .cdh_util import DictGetter

# spec §6.3: the offline_fs_kbc example KEK and kid; §9.2: the README example's iv
KEK = base64.b64decode("REXwTCcCFObQdE9ZfL0a/iZtucCwBIo36/L0aL5l7UA=")
KID = "kbs:///default/key/key_id1"
IV = base64.b64decode("4ezLbeMQdEkY/iuF")
# spec §6.4: the sample KBC's hard-coded KEK (coco_keyprovider sample=true: iv 12 zero bytes)
SAMPLE_KEK = bytes(
    [217, 155, 119, 5, 176, 186, 122, 22, 130, 149, 179, 163, 54, 114, 112, 176,
     221, 155, 55, 27, 245, 20, 202, 139, 155, 167, 240, 163, 55, 17, 218, 234]
)  # fmt: skip
OPTS = (
    b'{"symkey":"' + base64.b64encode(bytes(range(32))) + b'","digest":"sha256:'
    + b"ab" * 32 + b'","cipheroptions":{"nonce":"' + base64.b64encode(bytes(16)) + b'"}}'
)  # fmt: skip


def _request(annotation: bytes) -> bytes:
    """The keyunwrap input as ocicrypt-rs sends it (spec §3.2)."""
    return json.dumps(
        {
            "op": "keyunwrap",
            "keywrapparams": {"ec": None, "optsdata": None},
            "keyunwrapparams": {
                "dc": {"Parameters": {"attestation-agent": [base64.b64encode(b"x").decode()]}},
                "annotation": base64.b64encode(annotation).decode(),
            },
        }
    ).encode()


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    getter = DictGetter({KID: KEK, "kbs:///default/test-key/1": SAMPLE_KEK})
    create_key(tmp_path / "kms", "k1")
    cfg = CdhConfig(KbcConfig("offline_fs_kbc"))
    return Hub(cfg, getter, local_key_dir=str(tmp_path / "kms"), sealed_secret_dir=str(tmp_path))


def test_coco_keyprovider_v1_packet(hub: Hub) -> None:
    wrapped = AESGCM(KEK).encrypt(IV, OPTS, None)  # made here, not by the code under test
    ann = (
        b'{"kid":"kbs:///default/key/key_id1","wrapped_data":"' + base64.b64encode(wrapped)
        + b'","iv":"4ezLbeMQdEkY/iuF","wrap_type":"A256GCM"}'
    )  # fmt: skip
    answer = hub.unwrap_key(_request(ann))
    # byte for byte what CDH answers: optsdata as a JSON array of byte values, no spaces
    assert (
        answer == b'{"keyunwrapresults":{"optsdata":[' + ",".join(map(str, OPTS)).encode() + b"]}}"
    )
    assert hub.getter.calls == [KID]


def test_sample_packet_and_ctr(hub: Hub) -> None:
    ann = json.dumps({"kid": "kbs:///default/test-key/1",
                      "wrapped_data": base64.b64encode(AESGCM(SAMPLE_KEK).encrypt(bytes(12), OPTS, None)).decode(),
                      "iv": base64.b64encode(bytes(12)).decode(), "wrap_type": "A256GCM"}).encode()  # fmt: skip
    assert json.loads(hub.unwrap_key(_request(ann)))["keyunwrapresults"]["optsdata"] == list(OPTS)
    iv16 = bytes(range(16))
    enc = Cipher(algorithms.AES(KEK), modes.CTR(iv16)).encryptor()
    ctr = enc.update(OPTS) + enc.finalize()
    v2 = json.dumps({"version": "0.1.0", "kid": KID, "wrapped_data": base64.b64encode(ctr).decode(),
                     "provider": "kbs", "iv": base64.b64encode(iv16).decode(), "wrap_type": "A256CTR",
                     "provider_settings": {}, "annotations": {}}).encode()  # fmt: skip
    assert json.loads(hub.unwrap_key(_request(v2)))["keyunwrapresults"]["optsdata"] == list(OPTS)


def test_packet_with_a_kms_provider(hub: Hub) -> None:
    wrapped, annotations = new_encryptor("local", {}, hub.kms).encrypt(OPTS, "k1")
    packet = AnnotationPacket("k1", wrapped, provider="local", annotations=annotations)
    assert b'"provider":"local"' in packet.to_json()
    assert json.loads(hub.unwrap_key(_request(packet.to_json())))["keyunwrapresults"][
        "optsdata"
    ] == list(OPTS)
    assert hub.getter.calls == []  # the KMS, not the KBS


def test_round_trip_through_ocicrypt_key_provider(hub: Hub) -> None:
    packet = wrap_key(OPTS, KID, KEK)
    assert list(json.loads(packet.to_json())) == ["kid", "wrapped_data", "iv", "wrap_type"]
    kp = KeyProvider("attestation-agent", handler=hub.keyprovider)
    assert kp.unwrap([b"kbs:///default/key/key_id1"], packet.to_json()) == OPTS
    native = KeyProvider("attestation-agent", extra={"native": "attestation-agent"})
    with pytest.raises(
        KeyUnwrapError, match="native provider 'attestation-agent' is not available"
    ):
        native.unwrap([b"x"], packet.to_json())
    register_native("attestation-agent", hub.keyprovider)
    try:
        assert native.unwrap([b"x"], packet.to_json()) == OPTS
    finally:
        register_native("attestation-agent", None)
    with pytest.raises(CocoError, match=r"keyprovider attestation-agent: WrapKey: .*not supported"):
        kp.wrap([b"x"], OPTS)
    # a wrong KEK: the provider's error reaches ocicrypt's caller as an unwrap failure
    hub.getter.resources[KID] = bytes(32)
    with pytest.raises(KeyUnwrapError, match="A256GCM decryption failed"):
        kp.unwrap([b"x"], packet.to_json())


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"kid": KID, "wrapped_data": "!!", "iv": "AAAA", "wrap_type": "A256GCM"}, "wrapped_data: not standard base64"),
        ({"kid": "default/key/1", "wrapped_data": "", "iv": "", "wrap_type": "A256GCM"}, "expected kbs:///"),
        ({"kid": KID, "wrapped_data": "", "iv": "", "wrap_type": "A128KW"}, "wrap_type 'A128KW' is not supported"),
        ({"kid": KID, "wrapped_data": ""}, "needs 'iv' and 'wrap_type'"),
        ({"kid": KID, "wrapped_data": "", "iv": "", "wrap_type": "A256GCM"}, "12-byte iv"),
        ({"kid": KID, "wrapped_data": "", "version": "0.2.0", "iv": "", "wrap_type": "A256GCM"}, "expected version '0.1.0'"),
        ({"kid": KID, "wrapped_data": "", "colour": "red"}, "unknown field 'colour'"),
        ({"kid": KID, "wrapped_data": "", "provider": "aliyun"}, "'aliyun' is not built in"),
    ],
)  # fmt: skip
def test_bad_packets(hub: Hub, doc, message) -> None:
    with pytest.raises(UnwrapKeyError, match=message):
        hub.unwrap_key(_request(json.dumps(doc).encode()))


def test_bad_requests(hub: Hub) -> None:
    for req, message in [
        (b"{", "UnwrapKey Parse request failed: not JSON"),
        (b'{"op":"keywrap"}', "expected op 'keyunwrap'"),
        (b'{"op":"keyunwrap","keyunwrapparams":{}}', "expected keyunwrapparams.annotation"),
        (b"[" * 5000, "UnwrapKey Parse request failed"),
    ]:
        with pytest.raises(UnwrapKeyError, match=message):
            hub.unwrap_key(req)


def test_missing_kek_is_the_kbs_answer(hub: Hub) -> None:
    packet = wrap_key(OPTS, "kbs:///default/key/absent", KEK)
    with pytest.raises(CocoError, match="kbs:///default/key/absent: refused by the test KBS"):
        hub.unwrap_key(_request(packet.to_json()))


def test_get_resource_checks_the_uri(hub: Hub) -> None:
    assert hub.get_resource("kbs://kbs.example:8080/default/key/key_id1") == KEK
    assert hub.getter.calls[-1] == KID  # the address is dropped: the KBS URL is configuration
    with pytest.raises(CocoError, match="3 path segments"):
        hub.get_resource("kbs:///a/b")
    with pytest.raises(CocoError, match="only the kbs:// scheme"):
        hub.get_resource("file:///etc/passwd")


def test_kms_context_without_getter() -> None:
    from coco.guest.cdh.errors import KmsError
    from coco.guest.cdh.kms import new_getter

    with pytest.raises(KmsError, match="no KBS client"):
        new_getter("kbs", {}, KmsContext(None))
