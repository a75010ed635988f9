"""Protocol models, JCS and report-data binding against upstream vectors; JOSE against jwcrypto."""

from __future__ import annotations

import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwcrypto import jwe as jw_jwe
from jwcrypto import jwk as jw_jwk
from jwcrypto import jws as jw_jws

from coco.crypto.jcs import canonicalize
from coco.crypto.jose import (
    JoseError,
    b64url_decode,
    jwe_decrypt,
    jwe_encrypt,
    private_key_jwk,
    public_jwk,
    sign_jwt,
)
from coco.protocol.client import KbsError, TeeKey
from coco.protocol.kbs import Attestation, ProtocolError, Request, TeePubKey, report_data
from coco.protocol.resource_uri import ResourceUri


def test_jcs_upstream_vector() -> None:
    out = canonicalize({"b": 1, "a": "test", "c": {"d": "e"}})
    assert out == b'{"a":"test","b":1,"c":{"d":"e"}}'
    assert hashlib.sha384(out).hexdigest() == (
        "e71ce8e70d814ba6639c3612ebee0ff1f76f650f8dbb5e47157e0f3f525cd22c"
        "4597480a186427c813ca941da78870c3"
    )


def test_jcs_rfc8785_numbers_strings_and_key_order() -> None:
    assert canonicalize([1e21, 1e-7, 0.000001, 333333333.3333333, -0.0, 4.5]) == (
        b"[1e+21,1e-7,0.000001,333333333.3333333,0,4.5]"
    )
    assert (
        canonicalize('\u20ac$\u000f\nA\'B"\\\\"/')
        == '"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"'.encode()
    )
    # UTF-16 code-unit order: U+1F600 (surrogates D83D..) sorts before U+FB33
    assert canonicalize({"\ufb33": 1, "\U0001f600": 2}).startswith('{"\U0001f600"'.encode())


def test_report_data_vector_and_unknown_pubkey_fields_dropped() -> None:
    key = TeePubKey.from_json(
        {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": "AAAA", "y": "BBBB", "kid": "z"}
    )
    assert report_data("bm9uY2U=", key).hex() == (
        "d20490d30e5f16cba693abc1ca3c31ed977d2722d0adf01a980972d16913dc38"
        "f103c1f12abf477df0523af2b12e4b43"
    )
    assert len(report_data("bm9uY2U=", key, alg="sha512")) == 64


def test_strict_messages_name_the_field() -> None:
    with pytest.raises(ProtocolError, match=r"unknown field.*bogus"):
        Request.from_json({"version": "0.4.0", "tee": "sample", "bogus": 1})
    with pytest.raises(ProtocolError, match=r"Request.tee: expected a string"):
        Request.from_json({"version": "0.4.0", "tee": 3})
    with pytest.raises(ProtocolError, match=r"missing field.*tee-evidence"):
        Attestation.from_json({"runtime-data": {}})
    with pytest.raises(ProtocolError, match="kty: expected EC or RSA"):
        TeePubKey.from_json({"kty": "oct", "alg": "x"})


def test_resource_path_rules() -> None:
    assert ResourceUri.from_path("kbs:///a/b/c.d").resource_path == "a/b/c.d"
    assert ResourceUri.from_path("/a/b/c.d") == ResourceUri("a", "b", "c.d")
    for bad in ("a/b", "a/../c", "a/./c", "a/b/.hidden", "a/b/c/d", "a//b", "a/b/c\n"):
        with pytest.raises(KbsError):
            ResourceUri.from_path(bad)


@pytest.mark.parametrize("alg", ["ec-p256", "ec-p521", "rsa-oaep-256", "rsa1_5"])
def test_jwe_decrypts_with_jwcrypto(alg: str) -> None:
    key = TeeKey.generate(alg)
    obj = jwe_encrypt(key.pubkey.to_json(), b"shhhhhhh")
    assert set(obj) == {"protected", "encrypted_key", "iv", "ciphertext", "tag"}
    hdr_text = b64url_decode(obj["protected"]).decode()
    hdr = json.loads(hdr_text)
    # The exact serialization the Rust client recomputes for the AAD.
    if alg.startswith("ec"):
        epk = hdr["epk"]
        assert hdr_text == (
            '{"alg":"ECDH-ES+A256KW","enc":"A256GCM","epk":{"crv":"'
            + epk["crv"]
            + '","kty":"EC","x":"'
            + epk["x"]
            + '","y":"'
            + epk["y"]
            + '"}}'
        )
        size = 32 if alg == "ec-p256" else 66
        assert len(b64url_decode(epk["x"])) == size and len(b64url_decode(epk["y"])) == size
        assert len(b64url_decode(obj["encrypted_key"])) == 40
    else:
        assert hdr_text == '{"alg":"' + key.pubkey.alg + '","enc":"A256GCM"}'
    assert len(b64url_decode(obj["iv"])) == 12 and len(b64url_decode(obj["tag"])) == 16
    peer_key = jw_jwk.JWK(**private_key_jwk(key.private_key))
    token = jw_jwe.JWE()
    token.allowed_algs = [key.pubkey.alg, "A256GCM"]
    token.deserialize(json.dumps(obj), key=peer_key)
    assert token.payload == b"shhhhhhh"
    assert jwe_decrypt(obj, key.private_key) == b"shhhhhhh"


def test_jwe_from_jwcrypto_decrypts_and_tamper_fails() -> None:
    key = TeeKey.generate("ec-p256")
    pub = jw_jwk.JWK(**public_jwk(key.private_key))
    e = jw_jwe.JWE(b"payload", json.dumps({"alg": "ECDH-ES+A256KW", "enc": "A256GCM"}))
    e.add_recipient(pub)
    parts = e.serialize(compact=True).split(".")
    obj = dict(zip(["protected", "encrypted_key", "iv", "ciphertext", "tag"], parts, strict=True))
    assert jwe_decrypt(obj, key.private_key) == b"payload"
    ours = jwe_encrypt(key.pubkey.to_json(), b"secret")
    ours["ciphertext"] = ours["ciphertext"][:-2] + (
        "AA" if ours["ciphertext"][-2:] != "AA" else "BA"
    )
    with pytest.raises(JoseError, match="decryption failed"):
        jwe_decrypt(ours, key.private_key)


def test_jwe_refuses_unsupported_key() -> None:
    with pytest.raises(JoseError, match="unsupported curve"):
        jwe_encrypt({"kty": "EC", "crv": "P-384", "alg": "ECDH-ES+A256KW", "x": "A", "y": "B"}, b"")
    with pytest.raises(JoseError, match="unsupported key"):
        jwe_encrypt({"kty": "RSA", "alg": "RSA-OAEP", "n": "A", "e": "AQAB"}, b"")


@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
def test_jws_verifies_with_jwcrypto(alg: str) -> None:
    if alg == "ES256":
        priv: object = ec.generate_private_key(ec.SECP256R1())
    elif alg == "RS256":
        priv = rsa.generate_private_key(65537, 2048)
    else:
        priv = ed25519.Ed25519PrivateKey.generate()
    token = sign_jwt({"role": "admin", "exp": 1}, priv, alg)  # type: ignore[arg-type]
    verifier = jw_jws.JWS()
    verifier.deserialize(token)
    verifier.verify(jw_jwk.JWK(**public_jwk(priv)))  # type: ignore[arg-type]
    assert json.loads(verifier.payload) == {"role": "admin", "exp": 1}
