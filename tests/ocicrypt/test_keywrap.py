"""Key wrappers and key strings in isolation: openssl's CMS, malformed envelopes, JWK files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from jwcrypto import jwk

from coco.ocicrypt import decrypt_config, encrypt_config
from coco.ocicrypt.config import KeyConfigError
from coco.ocicrypt.keywrap import KeyUnwrapError
from coco.ocicrypt.keywrap import jwe as jwe_wrap
from coco.ocicrypt.keywrap import pkcs7 as pkcs7_wrap
from coco.ocicrypt.keywrap.keyprovider import KeyProvider

from .conftest import Keys, openssl


def _priv(path: Path):
    return load_pem_private_key(path.read_bytes(), None)


@pytest.mark.parametrize("cipher", ["-aes-128-cbc", "-aes-256-cbc"])
def test_pkcs7_unwraps_openssl_cms(tmp_path: Path, keys: Keys, cipher: str) -> None:
    msg = b'{"symkey":"...","digest":"sha256:00"}'
    (tmp_path / "m").write_bytes(msg)
    der = openssl(
        "cms", "-encrypt", "-binary", "-outform", "DER", cipher, "-in", str(tmp_path / "m"),
        "-recip", str(keys.cert),
    )  # fmt: skip
    cert = x509.load_pem_x509_certificate(keys.cert.read_bytes())
    assert pkcs7_wrap.unwrap([_priv(keys.rsa)], [cert], der) == msg
    assert pkcs7_wrap.unwrap([_priv(keys.rsa)], [], der) == msg


def test_pkcs7_structure_as_openssl_reads_it(keys: Keys) -> None:
    cert = x509.load_pem_x509_certificate(keys.cert.read_bytes())
    der = pkcs7_wrap.wrap([cert], b"secret options")
    text = openssl("asn1parse", "-inform", "DER", input=der).decode()
    for want in ("pkcs7-envelopedData", "rsaEncryption", "pkcs7-data", "aes-128-gcm", "coco-test"):
        assert want in text
    assert pkcs7_wrap.unwrap([_priv(keys.rsa)], [cert], der) == b"secret options"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:-40], "malformed PKCS#7 envelope"),
        (lambda d: d + b"\x00", "trailing bytes"),
        (lambda d: b"\x31" + d[1:], "ContentInfo: expected tag 0x30"),
    ],
)
def test_pkcs7_malformed(keys: Keys, mutate, message: str) -> None:
    cert = x509.load_pem_x509_certificate(keys.cert.read_bytes())
    der = pkcs7_wrap.wrap([cert], b"x")
    with pytest.raises(KeyUnwrapError, match=message):
        pkcs7_wrap.unwrap([_priv(keys.rsa)], [cert], mutate(der))


def test_pkcs7_wrong_key(keys: Keys) -> None:
    cert = x509.load_pem_x509_certificate(keys.cert.read_bytes())
    der = pkcs7_wrap.wrap([cert], b"x")
    with pytest.raises(KeyUnwrapError, match="none of the 1 RSA private key"):
        pkcs7_wrap.unwrap([_priv(keys.rsa2)], [], der)


def test_jwe_refuses_unknown_members(keys: Keys) -> None:
    pub = _priv(keys.rsa).public_key()
    blob = json.loads(jwe_wrap.wrap([pub], b"x"))
    blob["surprise"] = 1
    with pytest.raises(KeyUnwrapError, match="unknown JWE member 'surprise'"):
        jwe_wrap.unwrap([_priv(keys.rsa)], json.dumps(blob).encode())
    with pytest.raises(KeyUnwrapError, match="not a JWE"):
        jwe_wrap.unwrap([_priv(keys.rsa)], b"\xff")


def test_jwk_key_files(tmp_path: Path, keys: Keys) -> None:
    k = jwk.JWK.generate(kty="EC", crv="P-384")
    (tmp_path / "pub.jwk").write_text(k.export_public())
    (tmp_path / "priv.jwk").write_text(k.export_private())
    enc = encrypt_config([f"jwe:{tmp_path / 'pub.jwk'}"])
    dec = decrypt_config([str(tmp_path / "priv.jwk")])
    assert jwe_wrap.unwrap(dec.private_keys, jwe_wrap.wrap(enc.jwe, b"opts")) == b"opts"
    with pytest.raises(KeyConfigError, match="a private JWK; give the public key"):
        encrypt_config([f"jwe:{tmp_path / 'priv.jwk'}"])


def test_password_from_fd(keys: Keys) -> None:
    r, w = os.pipe()
    os.write(w, keys.password.encode() + b"\n")
    os.close(w)
    try:
        dec = decrypt_config([f"{keys.rsa_enc}:fd={r}"])
    finally:
        os.close(r)
    assert dec.describe() == "RSA private key rsa-enc.pem"


def test_provider_strings() -> None:
    kps = {"p": KeyProvider("p", cmd_path="/bin/true")}
    enc = encrypt_config(["provider:p", "provider:p:a:b:c"], kps)
    assert enc.providers == {"p": (b"Enabled", b"a:b:c")}
    dec = decrypt_config(["provider:p:x"], kps)
    assert dec.providers == {"p": (b"x",)} and dec.describe() == "provider:p"
    with pytest.raises(KeyConfigError, match="expected provider:NAME"):
        encrypt_config(["provider::x"], kps)
