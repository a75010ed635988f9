"""Sealed secrets: signature, algorithm, key lookup (KBS or the sealed-secret dir), types, skip mode."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from coco.crypto.jose import b64url_encode, public_jwk
from coco.errors import CocoError
from coco.guest.cdh.errors import KmsError, SecretError
from coco.guest.cdh.kms import KmsContext
from coco.guest.cdh.kms.local import create_key
from coco.guest.cdh.secret import (
    UnsealContext,
    envelope_payload,
    keygen,
    load_signing_key,
    seal,
    unseal,
    vault_payload,
)

from .cdh_util import DictGetter

KID = "kbs:///default/sealed-secret-key/1"


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def ctx(key, tmp_path: Path) -> UnsealContext:
    getter = DictGetter(
        {
            KID: json.dumps(public_jwk(key)).encode(),
            "kbs:///one/2/trois": b"the vault secret",
        }
    )
    keys = tmp_path / "kms"
    create_key(keys, "k1")
    sealed_dir = tmp_path / "sealed-secret"
    sealed_dir.mkdir()
    return UnsealContext(getter, KmsContext(getter, str(keys)), str(sealed_dir))


def _manual_jws(header: dict, payload: dict, key: ec.EllipticCurvePrivateKey) -> str:
    """A sealed secret built here by hand (independent of coco's seal())."""
    h = b64url_encode(json.dumps(header).encode())
    p = b64url_encode(json.dumps(payload).encode())
    r, s = decode_dss_signature(key.sign(f"{h}.{p}".encode(), ec.ECDSA(hashes.SHA256())))
    return f"sealed.{h}.{p}.{b64url_encode(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def test_vault_by_hand_and_by_seal(ctx, key) -> None:
    payload = {"version": "0.1.0", "type": "vault", "name": "kbs:///one/2/trois",
               "provider": "kbs", "provider_settings": {}, "annotations": {}}  # fmt: skip
    by_hand = _manual_jws({"alg": "ES256", "kid": KID}, payload, key)
    assert unseal(by_hand, ctx) == b"the vault secret"
    ours = seal(vault_payload("kbs:///one/2/trois"), KID, key)
    assert unseal(ours.encode(), ctx) == b"the vault secret"
    header = json.loads(base64.urlsafe_b64decode(ours.split(".")[1] + "=="))
    assert header == {"alg": "ES256", "kid": KID}
    assert ctx.getter.calls == [KID, "kbs:///one/2/trois"] * 2


@pytest.mark.parametrize("wrap_type", ["A256GCM", "A256CTR"])
def test_envelope_local_kms(ctx, key, wrap_type) -> None:
    payload = envelope_payload(b"db password", "local", "k1", ctx.kms, wrap_type)
    assert payload["wrap_type"] == wrap_type
    assert unseal(seal(payload, KID, key), ctx) == b"db password"
    # the same envelope under another local key: the KMS says so
    create_key(ctx.kms.local_key_dir, "k2")
    payload["key_id"] = "k2"
    with pytest.raises(SecretError, match=r"provider 'local'.*A256GCM decryption failed"):
        unseal(seal(payload, KID, key), ctx)


def test_tampered_payload_and_signature(ctx, key) -> None:
    good = seal(vault_payload("kbs:///one/2/trois"), KID, key)
    _, h, p, s = good.split(".")
    other = b64url_encode(json.dumps(vault_payload("kbs:///other/2/x")).encode())
    with pytest.raises(SecretError, match="signature does not verify"):
        unseal(f"sealed.{h}.{other}.{s}", ctx)
    flipped = b64url_encode(
        bytes([base64.urlsafe_b64decode(s + "==")[0] ^ 1]) + base64.urlsafe_b64decode(s + "==")[1:]
    )
    with pytest.raises(SecretError, match="signature does not verify"):
        unseal(f"sealed.{h}.{p}.{flipped}", ctx)
    signed_by_other = seal(
        vault_payload("kbs:///one/2/trois"), KID, ec.generate_private_key(ec.SECP256R1())
    )
    with pytest.raises(SecretError, match="signature does not verify"):
        unseal(signed_by_other, ctx)
    assert "kbs:///other/2/x" not in ctx.getter.calls  # nothing was fetched for a forged secret


@pytest.mark.parametrize("alg", ["ES384", "HS256", "none", "RS256"])
def test_wrong_alg(ctx, key, alg) -> None:
    s = _manual_jws({"alg": alg, "kid": KID}, vault_payload("kbs:///one/2/trois"), key)
    with pytest.raises(SecretError, match=f"JWS algorithm must be ES256, found '{alg}'"):
        unseal(s, ctx)


def test_kid_file_in_dir_and_escapes(ctx, key, tmp_path: Path) -> None:
    d = Path(ctx.sealed_secret_dir)
    (d / "mykey").write_text(json.dumps(public_jwk(key)))
    assert (
        unseal(seal(vault_payload("kbs:///one/2/trois"), "mykey", key), ctx) == b"the vault secret"
    )
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(public_jwk(key)))  # a valid key, but not in the dir
    (d / "link").symlink_to(outside)
    for kid in ("../outside.json", str(outside), "link", "sub/../../outside.json"):
        with pytest.raises(SecretError, match="leads outside it"):
            unseal(seal(vault_payload("kbs:///one/2/trois"), kid, key), ctx)
    with pytest.raises(SecretError, match="cannot read"):
        unseal(seal(vault_payload("kbs:///one/2/trois"), "missing", key), ctx)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "safe"}, "unknown type 'safe'"),
        ({"version": "0.2.0"}, "expected version '0.1.0', found '0.2.0'"),
        ({"extra": 1}, "unknown field 'extra'"),
        ({"annotations": None}, "'annotations' must be a JSON object"),
        ({"provider": "aws"}, "KMS provider 'aws' is not built in"),
        ({"provider": "vault9"}, "unknown KMS provider 'vault9'"),
        ({"provider": "local"}, "cannot act as a getter"),
    ],
)
def test_bad_payloads(ctx, key, change, message) -> None:
    payload = {**vault_payload("kbs:///one/2/trois"), **change}
    with pytest.raises(SecretError, match=message):
        unseal(seal(payload, KID, key), ctx)


def test_envelope_with_kbs_is_refused(ctx, key) -> None:
    payload = envelope_payload(b"x", "local", "k1", ctx.kms)
    payload["provider"] = "KBS"  # case-insensitive lookup; kbs is not a decrypter upstream either
    with pytest.raises(SecretError, match="'kbs' cannot act as a decrypter"):
        unseal(seal(payload, KID, key), ctx)


def test_malformed_strings(ctx) -> None:
    for text, message in [
        ("plain", "starting with 'sealed.'"),
        ("sealed.a.b", "found 2 dot-separated part"),
        ("sealed.!!.b.c", "base64url"),
        (b"sealed.\xff", "ASCII"),
        ("sealed." + b64url_encode(b"{}") + ".e30.AA", "'alg' and 'kid'"),
    ]:
        with pytest.raises(SecretError, match=message):
            unseal(text, ctx)


def test_refused_key_resource_reaches_the_caller(ctx, key) -> None:
    s = seal(vault_payload("kbs:///one/2/trois"), "kbs:///default/sealed-secret-key/2", key)
    with pytest.raises(CocoError, match="refused by the test KBS"):
        unseal(s, ctx)


def test_skip_mode(ctx, key, caplog) -> None:
    legacy = (
        "sealed.fakejwsheader."
        + b64url_encode(json.dumps(vault_payload("kbs:///one/2/trois")).encode())
        + ".fakesignature"
    )
    with pytest.raises(SecretError):
        unseal(legacy, ctx)  # verification on: refused
    insecure = UnsealContext(
        ctx.getter, ctx.kms, ctx.sealed_secret_dir, insecure_skip_verification=True
    )
    import coco.guest.cdh.secret as secret_mod

    secret_mod._warned_skip = False
    with caplog.at_level(logging.WARNING):
        assert unseal(legacy, insecure) == b"the vault secret"
    assert "WITHOUT checking their signature" in caplog.text
    with pytest.raises(SecretError, match="expected 4 dot-separated sections"):
        unseal("sealed.a.b", insecure)


def test_keygen_files(tmp_path: Path, ctx) -> None:
    priv, pub = keygen(KID, tmp_path / "keys")
    assert priv.name == "kbs____default_sealed-secret-key_1-private.json"
    assert priv.stat().st_mode & 0o077 == 0
    key = load_signing_key(priv)
    ctx.getter.resources[KID] = pub.read_bytes()
    assert unseal(seal(vault_payload("kbs:///one/2/trois"), KID, key), ctx) == b"the vault secret"
    with pytest.raises(SecretError, match="already exists"):
        keygen(KID, tmp_path / "keys")
    with pytest.raises(SecretError, match="expected a private EC P-256 JWK"):
        load_signing_key(pub)


def test_local_kms_key_ids(tmp_path: Path) -> None:
    from coco.guest.cdh.kms import new_decryptor

    dec = new_decryptor("Local", {}, KmsContext(None, str(tmp_path)))
    for bad in ("../x", "/etc/passwd", "a/b", ".."):
        with pytest.raises(KmsError, match="expected a key id"):
            dec.decrypt(b"x" * 32, bad, {"iv": "AAAAAAAAAAAAAAAA"})
