"""``coco image copy`` against Debian's skopeo: each decrypts what the other encrypted.

In both directions the decrypted layer digests must equal the plain image's, through an OCI layout
and through a real docker-registry on loopback.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.conftest import Registry
from tests.imagekit import BuiltImage, tar_layer, write_image

from .conftest import Keys, layer_digests, layout_manifest, skopeo

ENC = "org.opencontainers.image.enc."


def _enc_layers(path: Path, tag: str = "latest") -> list[dict]:
    return layout_manifest(path, tag)[1]["layers"]


@pytest.mark.parametrize(
    ("recipients", "dec_keys"),
    [
        (["jwe:{rsa_pub}"], [["{rsa}"]]),
        (["jwe:{ec_pub}"], [["{ec}"]]),
        (["jwe:{rsa_pub}", "jwe:{ec_pub}"], [["{rsa}"], ["{ec}"]]),
        (["pkcs7:{cert}"], [["{rsa}", "{cert}"], ["{rsa}"]]),
    ],
    ids=["jwe-rsa", "jwe-ec", "jwe-two-recipients", "pkcs7"],
)
def test_skopeo_encrypts_coco_decrypts(
    tmp_path: Path, keys: Keys, plain: BuiltImage, coco_cli, recipients, dec_keys
) -> None:
    fmt = {k: str(v) for k, v in vars(keys).items()}
    args = [a for r in recipients for a in ("--encryption-key", r.format(**fmt))]
    skopeo(*args, plain.ref, f"oci:{tmp_path}/enc:latest")
    enc = _enc_layers(tmp_path / "enc")
    assert all(m["mediaType"].endswith("+encrypted") for m in enc)
    for i, keyset in enumerate(dec_keys):
        dargs = [a for k in keyset for a in ("--decryption-key", k.format(**fmt))]
        r = coco_cli(*dargs, f"oci:{tmp_path}/enc:latest", f"oci:{tmp_path}/dec{i}:latest")
        assert r.code == 0, r.err
        assert layer_digests(tmp_path / f"dec{i}") == plain.layer_digests
        # skopeo's encrypted manifest decrypts to a manifest byte-identical to the plain one.
        assert layout_manifest(tmp_path / f"dec{i}")[0] == plain.manifest_digest
        assert r.out.strip() == plain.manifest_digest


@pytest.mark.parametrize(
    ("recipients", "dec_keys"),
    [
        (["jwe:{rsa_pub}"], [["{rsa}"]]),
        (["jwe:{ec_pub}"], [["{ec}"]]),
        (["jwe:{rsa_pub}", "jwe:{ec_pub}", "jwe:{rsa2_pub}"], [["{rsa}"], ["{ec}"], ["{rsa2}"]]),
        (["pkcs7:{cert}"], [["{rsa}", "{cert}"]]),
        (["jwe:{ec_pub}", "pkcs7:{cert}"], [["{ec}"], ["{rsa}", "{cert}"]]),
    ],
    ids=["jwe-rsa", "jwe-ec", "jwe-three-recipients", "pkcs7", "jwe-and-pkcs7"],
)
def test_coco_encrypts_skopeo_decrypts(
    tmp_path: Path, keys: Keys, plain: BuiltImage, coco_cli, recipients, dec_keys
) -> None:
    fmt = {k: str(v) for k, v in vars(keys).items()}
    args = [a for r in recipients for a in ("--encryption-key", r.format(**fmt))]
    r = coco_cli(*args, plain.ref, f"oci:{tmp_path}/enc:latest")
    assert r.code == 0, r.err
    enc = _enc_layers(tmp_path / "enc")
    assert [m["mediaType"] for m in enc] == [
        "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
    ] * 2
    assert not set(layer_digests(tmp_path / "enc")) & set(plain.layer_digests)
    for m in enc:
        pub = json.loads(base64.b64decode(m["annotations"][ENC + "pubopts"]))
        assert list(pub) == ["cipher", "hmac", "cipheroptions"]
        assert pub["cipher"] == "AES_256_CTR_HMAC_SHA256" and pub["cipheroptions"] == {}
        schemes = {k[len(ENC + "keys.") :] for k in m["annotations"] if k.startswith(ENC + "keys.")}
        assert schemes == {r.split(":")[0] for r in recipients}
    for i, keyset in enumerate(dec_keys):
        dargs = [a for k in keyset for a in ("--decryption-key", k.format(**fmt))]
        skopeo(*dargs, f"oci:{tmp_path}/enc:latest", f"oci:{tmp_path}/dec{i}:latest")
        assert layer_digests(tmp_path / f"dec{i}") == plain.layer_digests
        assert layout_manifest(tmp_path / f"dec{i}")[0] == plain.manifest_digest


def test_jwe_serializations(tmp_path: Path, keys: Keys, plain: BuiltImage, coco_cli) -> None:
    """One recipient: flattened JSON with alg+enc protected; several: the general form."""
    coco_cli("--encryption-key", f"jwe:{keys.rsa_pub}", plain.ref, f"oci:{tmp_path}/one:latest")
    coco_cli(
        "--encryption-key", f"jwe:{keys.rsa_pub}", "--encryption-key", f"jwe:{keys.ec_pub}",
        plain.ref, f"oci:{tmp_path}/two:latest",
    )  # fmt: skip

    def jwe_of(name: str) -> dict:
        ann = _enc_layers(tmp_path / name)[0]["annotations"][ENC + "keys.jwe"]
        return json.loads(base64.b64decode(ann))

    def b64url(s: str) -> dict:
        return json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))

    one = jwe_of("one")
    assert list(one) == ["protected", "encrypted_key", "iv", "ciphertext", "tag"]
    assert b64url(one["protected"]) == {"alg": "RSA-OAEP", "enc": "A256GCM"}
    coco_cli("--encryption-key", f"jwe:{keys.ec_pub}", plain.ref, f"oci:{tmp_path}/ec:latest")
    ec = jwe_of("ec")
    assert list(ec) == ["protected", "encrypted_key", "iv", "ciphertext", "tag"]
    hdr = b64url(ec["protected"])
    assert list(hdr) == ["alg", "enc", "epk"] and hdr["alg"] == "ECDH-ES+A256KW"
    assert hdr["epk"]["crv"] == "P-256"
    two = jwe_of("two")
    assert b64url(two["protected"]) == {"enc": "A256GCM"}
    assert [r["header"]["alg"] for r in two["recipients"]] == ["RSA-OAEP", "ECDH-ES+A256KW"]
    assert "epk" in two["recipients"][1]["header"]


def test_encrypt_layer_selection(tmp_path: Path, keys: Keys, plain: BuiltImage, coco_cli) -> None:
    r = coco_cli(
        "--encryption-key", f"jwe:{keys.rsa_pub}", "--encrypt-layer", "-1",
        plain.ref, f"oci:{tmp_path}/enc:latest",
    )  # fmt: skip
    assert r.code == 0, r.err
    enc = _enc_layers(tmp_path / "enc")
    assert enc[0]["digest"] == plain.layer_digests[0]
    assert "annotations" not in enc[0]
    assert enc[1]["mediaType"].endswith("+encrypted")
    # skopeo decrypts the partly encrypted image; coco too.
    skopeo(
        "--decryption-key", str(keys.rsa), f"oci:{tmp_path}/enc:latest", f"oci:{tmp_path}/d1:latest"
    )
    assert layer_digests(tmp_path / "d1") == plain.layer_digests
    r = coco_cli(
        "--decryption-key", str(keys.rsa), f"oci:{tmp_path}/enc:latest", f"oci:{tmp_path}/d2:latest"
    )
    assert r.code == 0, r.err
    assert layer_digests(tmp_path / "d2") == plain.layer_digests


def test_skopeo_selects_coco_decrypts(
    tmp_path: Path, keys: Keys, plain: BuiltImage, coco_cli
) -> None:
    skopeo(
        "--encryption-key", f"jwe:{keys.rsa_pub}", "--encrypt-layer", "0",
        plain.ref, f"oci:{tmp_path}/enc:latest",
    )  # fmt: skip
    enc = _enc_layers(tmp_path / "enc")
    assert enc[0]["mediaType"].endswith("+encrypted") and enc[1]["digest"] == plain.layer_digests[1]
    r = coco_cli(
        "--decryption-key", str(keys.rsa), f"oci:{tmp_path}/enc:latest", f"oci:{tmp_path}/d:latest"
    )
    assert r.code == 0, r.err
    assert layer_digests(tmp_path / "d") == plain.layer_digests


def test_password_protected_key(tmp_path: Path, keys: Keys, plain: BuiltImage, coco_cli) -> None:
    skopeo("--encryption-key", f"jwe:{keys.rsa_pub}", plain.ref, f"oci:{tmp_path}/enc:latest")
    pwfile = tmp_path / "pw"
    pwfile.write_text(keys.password + "\n")
    for i, spec in enumerate([keys.password, f"pass={keys.password}", f"file={pwfile}"]):
        r = coco_cli(
            "--decryption-key", f"{keys.rsa_enc}:{spec}",
            f"oci:{tmp_path}/enc:latest", f"oci:{tmp_path}/d{i}:latest",
        )  # fmt: skip
        assert r.code == 0, r.err
        assert layer_digests(tmp_path / f"d{i}") == plain.layer_digests
    r = coco_cli(
        "--decryption-key",
        f"{keys.rsa_enc}:nope",
        f"oci:{tmp_path}/enc:latest",
        f"oci:{tmp_path}/x",
    )
    assert r.code == 1
    assert "wrong password" in r.err and str(keys.rsa_enc) in r.err
    r = coco_cli(
        "--decryption-key", str(keys.rsa_enc), f"oci:{tmp_path}/enc:latest", f"oci:{tmp_path}/x"
    )
    assert r.code == 1 and "is encrypted: give FILE:PASSWORD" in r.err
    assert not (tmp_path / "x").exists()


def test_through_registry(
    tmp_path: Path, keys: Keys, plain: BuiltImage, coco_cli, registry: Registry
) -> None:
    """skopeo -> registry -> coco, and coco -> registry -> skopeo, with basic auth."""
    creds = registry.creds
    skopeo(
        "--dest-tls-verify=false", "--dest-creds", creds, "--encryption-key", f"jwe:{keys.ec_pub}",
        plain.ref, registry.url("crypt/by-skopeo", "v1"),
    )  # fmt: skip
    r = coco_cli(
        "--src-tls-verify=false", "--src-creds", creds, "--decryption-key", str(keys.ec),
        registry.url("crypt/by-skopeo", "v1"), f"oci:{tmp_path}/d1:latest",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert layer_digests(tmp_path / "d1") == plain.layer_digests

    r = coco_cli(
        "--dest-tls-verify=false", "--dest-creds", creds,
        "--encryption-key", f"jwe:{keys.rsa_pub}", "--encryption-key", f"pkcs7:{keys.cert}",
        plain.ref, registry.url("crypt/by-coco", "v1"),
    )  # fmt: skip
    assert r.code == 0, r.err
    skopeo(
        "--src-tls-verify=false", "--src-creds", creds, "--decryption-key", str(keys.rsa),
        registry.url("crypt/by-coco", "v1"), f"oci:{tmp_path}/d2:latest",
    )  # fmt: skip
    assert layer_digests(tmp_path / "d2") == plain.layer_digests
    # registry -> registry decryption by coco.
    r = coco_cli(
        "--src-tls-verify=false", "--src-creds", creds, "--dest-tls-verify=false",
        "--dest-creds", creds, "--decryption-key", str(keys.rsa), "--decryption-key", str(keys.cert),
        registry.url("crypt/by-coco", "v1"), registry.url("crypt/plain-again", "v1"),
    )  # fmt: skip
    assert r.code == 0, r.err
    assert r.out.strip() == plain.manifest_digest


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_other_compressions(tmp_path: Path, keys: Keys, coco_cli, compression) -> None:
    img = write_image(
        tmp_path / "plain", [tar_layer({"a": b"A" * 5000})], tag="v1", compression=compression
    )
    r = coco_cli("--encryption-key", f"jwe:{keys.rsa_pub}", img.ref, f"oci:{tmp_path}/enc:latest")
    assert r.code == 0, r.err
    suffix = {"zstd": "tar+zstd+encrypted", "none": "tar+encrypted"}[compression]
    assert _enc_layers(tmp_path / "enc")[0]["mediaType"].endswith(suffix)
    skopeo(
        "--decryption-key", str(keys.rsa), f"oci:{tmp_path}/enc:latest", f"oci:{tmp_path}/d:latest"
    )
    assert layer_digests(tmp_path / "d") == img.layer_digests


def test_docker_image_is_converted_to_oci(
    tmp_path: Path, keys: Keys, coco_cli, open_registry
) -> None:
    """Encrypting a Docker schema 2 image yields OCI media types, as skopeo does (skopeo reads the
    Docker image from a registry: its oci: transport refuses Docker manifests)."""
    img = write_image(tmp_path / "plain", [tar_layer({"a": b"x"})], tag="v1", docker=True)
    src = open_registry.url("crypt/docker", "v1")
    r = coco_cli("--dest-tls-verify=false", img.ref, src)
    assert r.code == 0, r.err
    assert r.out.strip() == img.manifest_digest
    skopeo(
        "--src-tls-verify=false", "--encryption-key", f"jwe:{keys.rsa_pub}", src,
        f"oci:{tmp_path}/by-skopeo:latest",
    )  # fmt: skip
    r = coco_cli(
        "--src-tls-verify=false", "--encryption-key", f"jwe:{keys.rsa_pub}", src,
        f"oci:{tmp_path}/enc:latest",
    )  # fmt: skip
    assert r.code == 0, r.err
    _, ours = layout_manifest(tmp_path / "enc")
    _, theirs = layout_manifest(tmp_path / "by-skopeo")
    assert ours["mediaType"] == theirs["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert ours["config"] == theirs["config"]
    assert ours["layers"][0]["mediaType"] == theirs["layers"][0]["mediaType"]
    skopeo(
        "--decryption-key", str(keys.rsa), f"oci:{tmp_path}/enc:latest", f"oci:{tmp_path}/d:latest"
    )
    assert layer_digests(tmp_path / "d") == img.layer_digests
