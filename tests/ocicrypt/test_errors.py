"""Bad input: wrong or missing keys, tampered and truncated layers, bad key strings.

Each is one line on stderr naming the image and the layer, exit status 1, and the destination
left exactly as it was.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from coco.oci.layout import OciLayout
from coco.oci.models import Descriptor
from tests.imagekit import BuiltImage, sha256

from .conftest import Keys, layout_manifest, skopeo, snapshot

ENC = "org.opencontainers.image.enc."


@pytest.fixture
def encrypted(tmp_path: Path, keys: Keys, plain: BuiltImage) -> Path:
    """The plain image encrypted by skopeo to the first RSA key, at ``oci:…/enc:latest``."""
    skopeo("--encryption-key", f"jwe:{keys.rsa_pub}", plain.ref, f"oci:{tmp_path}/enc:latest")
    return tmp_path / "enc"


@pytest.fixture
def dest(tmp_path: Path, plain: BuiltImage) -> tuple[Path, dict[str, bytes]]:
    """A destination layout that already holds an image, and its snapshot."""
    d = tmp_path / "dest"
    shutil.copytree(plain.path, d)
    return d, snapshot(d)


def rewrite_layer(
    layout: Path, index: int, mutate: Callable[[dict, bytes], tuple[dict, bytes]]
) -> str:
    """Replace layer ``index`` (descriptor and blob) and re-point ``latest``: an attacker who also
    fixes the manifest digests, so only the cryptography can notice."""
    lay = OciLayout.open(layout)
    _, man = layout_manifest(layout)
    layer = man["layers"][index]
    blob = lay.read_blob(layer["digest"])
    new_layer, new_blob = mutate(dict(layer), blob)
    new_layer["digest"], new_layer["size"] = sha256(new_blob), len(new_blob)
    man["layers"][index] = new_layer
    raw = json.dumps(man, separators=(",", ":")).encode()
    with lay.transaction() as tx:
        tx.put_bytes(new_blob)
        tx.put_bytes(raw)
        tx.set_tag(
            "latest",
            Descriptor("application/vnd.oci.image.manifest.v1+json", sha256(raw), len(raw)),
        )
    return new_layer["digest"]


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_wrong_key(encrypted: Path, keys: Keys, dest, coco_cli) -> None:
    d, before = dest
    r = coco_cli("--decryption-key", str(keys.rsa2), f"oci:{encrypted}:latest", f"oci:{d}:v1")
    assert r.code == 1
    line = _one_line(r.err)
    assert f"oci:{encrypted}:latest: layer 1/2 sha256:" in line
    assert "none of the keys given (RSA private key rsa2.pem) could unwrap" in line
    assert snapshot(d) == before


def test_no_key_for_the_scheme(encrypted: Path, keys: Keys, dest, coco_cli) -> None:
    d, before = dest
    r = coco_cli("--decryption-key", str(keys.cert), f"oci:{encrypted}:latest", f"oci:{d}:v1")
    assert r.code == 1
    line = _one_line(r.err)
    assert "layer 1/2" in line
    assert "it is wrapped for jwe; keys given: certificate cert.pem" in line
    assert snapshot(d) == before


def test_provider_scheme_without_provider_key(
    tmp_path: Path, keys: Keys, dest, coco_cli, encrypted: Path
) -> None:
    # An image wrapped only for a key provider, decrypted with a plain private key.
    def only_provider(layer: dict, blob: bytes) -> tuple[dict, bytes]:
        ann = dict(layer["annotations"])
        ann[ENC + "keys.provider.kms"] = ann.pop(ENC + "keys.jwe")
        layer["annotations"] = ann
        return layer, blob

    rewrite_layer(encrypted, 1, only_provider)
    d, before = dest
    r = coco_cli("--decryption-key", str(keys.rsa), f"oci:{encrypted}:latest", f"oci:{d}:v1")
    assert r.code == 1
    assert (
        "layer 2/2" in r.err
        and "it is wrapped for provider.kms; keys given: RSA private key rsa.pem" in r.err
    )
    assert snapshot(d) == before


@pytest.mark.parametrize(
    ("name", "mutate"),
    [
        ("flipped-bit", lambda b: b[:50] + bytes([b[50] ^ 0x01]) + b[51:]),
        ("truncated", lambda b: b[:-7]),
        ("extended", lambda b: b + b"\x00"),
    ],
)
def test_tampered_layer_hmac(encrypted: Path, keys: Keys, dest, coco_cli, name, mutate) -> None:
    new_digest = rewrite_layer(encrypted, 1, lambda layer, blob: (layer, mutate(blob)))
    d, before = dest
    r = coco_cli("--decryption-key", str(keys.rsa), f"oci:{encrypted}:latest", f"oci:{d}:v1")
    assert r.code == 1
    line = _one_line(r.err)
    assert f"layer 2/2 {new_digest}: HMAC mismatch" in line
    assert snapshot(d) == before


def test_tampered_hmac_annotation(encrypted: Path, keys: Keys, dest, coco_cli) -> None:
    def bad_mac(layer: dict, blob: bytes) -> tuple[dict, bytes]:
        pub = json.loads(base64.b64decode(layer["annotations"][ENC + "pubopts"]))
        pub["hmac"] = base64.b64encode(bytes(32)).decode()
        layer["annotations"] = {
            **layer["annotations"],
            ENC + "pubopts": base64.b64encode(json.dumps(pub).encode()).decode(),
        }
        return layer, blob

    rewrite_layer(encrypted, 0, bad_mac)
    d, before = dest
    r = coco_cli("--decryption-key", str(keys.rsa), f"oci:{encrypted}:latest", f"oci:{d}:v1")
    assert r.code == 1 and "layer 1/2" in r.err and "HMAC mismatch" in r.err
    assert snapshot(d) == before


def test_truncated_blob_in_source(encrypted: Path, keys: Keys, dest, coco_cli) -> None:
    """The blob on disk is shorter than its descriptor says (nobody fixed the manifest)."""
    _, man = layout_manifest(encrypted)
    layer = man["layers"][1]
    p = encrypted / "blobs" / "sha256" / layer["digest"].split(":")[1]
    p.write_bytes(p.read_bytes()[:-100])
    d, before = dest
    r = coco_cli("--decryption-key", str(keys.rsa), f"oci:{encrypted}:latest", f"oci:{d}:v1")
    assert r.code == 1
    line = _one_line(r.err)
    assert layer["digest"] in line and "truncated" in line
    assert snapshot(d) == before


def test_digest_in_private_options_must_match(keys: Keys) -> None:
    """A layer whose private options promise another plaintext digest (valid key and HMAC)."""
    from coco.errors import DecryptionError
    from coco.ocicrypt import DecryptLayers, EncryptLayers, decrypt_config, encrypt_config

    data = b"layer bytes " * 1000
    promised = Descriptor("application/vnd.oci.image.layer.v1.tar", sha256(b"other"), len(data))
    enc = EncryptLayers(encrypt_config([f"jwe:{keys.rsa_pub}"]), image="img").apply(
        0, 1, promised, iter([data])
    )
    blob = b"".join(enc.chunks)
    enc_desc = enc.descriptor(sha256(blob), len(blob))
    dec = DecryptLayers(decrypt_config([str(keys.rsa)]), image="img").apply(
        0, 1, enc_desc, iter([blob])
    )
    assert b"".join(dec.chunks) == data  # key and HMAC are fine ...
    with pytest.raises(DecryptionError) as e:  # ... but the plaintext is not the promised one
        dec.descriptor(sha256(data), len(data))
    assert str(e.value) == (
        f"img: layer 1/1 {enc_desc.digest}: decrypted layer digest mismatch: "
        f"expected {sha256(b'other')}, got {sha256(data)}"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--encryption-key", "jwe:/nonexistent.pem"],
            "--encryption-key /nonexistent.pem: file not found",
        ),
        (
            ["--encryption-key", "rsa.pub"],
            "expected jwe:PUBKEY, pkcs7:CERT or provider:NAME[:VALUE]",
        ),
        (["--encryption-key", "pgp:someone@example.com"], "the pgp scheme is not supported"),
        (
            ["--encryption-key", "jwe:{cert}"],
            "expected an RSA or EC public key (PEM, DER or JWK), found no public key",
        ),
        (["--encryption-key", "pkcs7:{rsa_pub}"], "expected an X.509 certificate"),
        (["--encryption-key", "provider:nokp:x"], "no key provider named 'nokp' configured"),
        (
            ["--decryption-key", "{rsa_pub}"],
            "expected a private key (PEM, DER or JWK) or an X.509 certificate",
        ),
        (
            ["--decryption-key", "/nonexistent.pem"],
            "--decryption-key /nonexistent.pem: file not found",
        ),
        (["--encrypt-layer", "5", "--encryption-key", "jwe:{rsa_pub}"], "--encrypt-layer 5: oci:"),
    ],
)
def test_bad_key_strings(
    tmp_path: Path, keys: Keys, plain: BuiltImage, coco_cli, monkeypatch, args, message
) -> None:
    monkeypatch.delenv("OCICRYPT_KEYPROVIDER_CONFIG", raising=False)
    fmt = {k: str(v) for k, v in vars(keys).items()}
    r = coco_cli(*[a.format(**fmt) for a in args], plain.ref, f"oci:{tmp_path}/out:latest")
    assert r.code == 1, r.err
    assert message in _one_line(r.err)
    assert not (tmp_path / "out").exists()


def test_encrypt_and_decrypt_together_is_a_usage_error(
    tmp_path: Path, keys: Keys, plain: BuiltImage, coco_cli
) -> None:
    r = coco_cli(
        "--encryption-key", f"jwe:{keys.rsa_pub}", "--decryption-key", str(keys.rsa),
        plain.ref, f"oci:{tmp_path}/out:latest",
    )  # fmt: skip
    assert r.code == 2 and "cannot be combined" in r.err
    r = coco_cli("--encrypt-layer", "0", plain.ref, f"oci:{tmp_path}/out:latest")
    assert r.code == 2 and "--encrypt-layer needs --encryption-key" in r.err
    assert not (tmp_path / "out").exists()


def test_plain_image_with_decryption_key_passes_through(
    tmp_path: Path, keys: Keys, plain: BuiltImage, coco_cli
) -> None:
    r = coco_cli("--decryption-key", str(keys.rsa), plain.ref, f"oci:{tmp_path}/out:latest")
    assert r.code == 0, r.err
    assert r.out.strip() == plain.manifest_digest


def test_encrypted_image_without_keys_is_copied_as_is(
    encrypted: Path, tmp_path: Path, coco_cli
) -> None:
    r = coco_cli(f"oci:{encrypted}:latest", f"oci:{tmp_path}/copy:latest")
    assert r.code == 0, r.err
    assert layout_manifest(tmp_path / "copy")[0] == layout_manifest(encrypted)[0]


def test_tampered_layer_leaves_registry_tag_alone(
    encrypted: Path, keys: Keys, coco_cli, registry
) -> None:
    """A failed decryption into a registry writes no manifest: the tag keeps pointing where it did."""
    import urllib.error
    import urllib.request

    target = registry.url("crypt/tamper", "v1")
    r = coco_cli(
        "--dest-tls-verify=false", "--dest-creds", registry.creds, "--decryption-key", str(keys.rsa),
        f"oci:{encrypted}:latest", target,
    )  # fmt: skip
    assert r.code == 0, r.err
    good = r.out.strip()
    rewrite_layer(encrypted, 0, lambda layer, blob: (layer, blob[:-1] + bytes([blob[-1] ^ 0x80])))
    r = coco_cli(
        "--dest-tls-verify=false", "--dest-creds", registry.creds, "--decryption-key", str(keys.rsa),
        f"oci:{encrypted}:latest", target,
    )  # fmt: skip
    assert r.code == 1 and "layer 1/2" in r.err and "HMAC mismatch" in r.err
    req = urllib.request.Request(
        f"http://{registry.host}/v2/crypt/tamper/manifests/v1",
        method="HEAD",
        headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json",
            "Authorization": "Basic " + base64.b64encode(registry.creds.encode()).decode(),
        },
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Docker-Content-Digest"] == good
