"""Cosign-format signatures: the ``.sig`` manifest we write, verification by our evaluator, and
the ECDSA part checked against ``openssl`` (the only independent peer for it on this machine;
Debian's skopeo has sigstore disabled). Tampering, wrong keys and wrong identities are refused."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coco.errors import SignatureError
from coco.image.signature import (
    PolicyContext,
    Signatures,
    SigstoreSignature,
    attachment_tag,
    parse_attachment,
    sign_sigstore,
    signature_fetcher,
)
from coco.image.signature.policy import Policy
from coco.image.signature.sigstore import (
    CONFIG_MEDIA_TYPE,
    LAYER_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    SIGNATURE_ANNOTATION,
    load_private_key,
)
from coco.oci.reference import parse_docker
from tests.image.signature.conftest import make_ec_key

REF = "reg.example.com/team/app:v1"
DIGEST = "sha256:" + hashlib.sha256(b"the manifest").hexdigest()


def _policy(pub_pem: bytes, tmp_path: Path, identity: dict | None = None) -> PolicyContext:
    key = tmp_path / "cosign.pub"
    key.write_bytes(pub_pem)
    req: dict = {"type": "sigstoreSigned", "keyPath": str(key)}
    if identity:
        req["signedIdentity"] = identity
    doc = {"default": [{"type": "reject"}], "transports": {"docker": {"reg.example.com": [req]}}}
    (tmp_path / "policy.json").write_text(json.dumps(doc))
    return PolicyContext(Policy.from_file(tmp_path / "policy.json"))


def _sigs(sm) -> list[SigstoreSignature]:
    return parse_attachment(sm.manifest, lambda d, _s: sm.blobs[d], "t")


def test_signature_manifest_shape() -> None:
    k = make_ec_key()
    sm = sign_sigstore(REF, DIGEST, k.private_pem, timestamp=1)
    assert sm.tag == f"sha256-{DIGEST.split(':')[1]}.sig" == attachment_tag(DIGEST)
    m = json.loads(sm.manifest)
    assert m["schemaVersion"] == 2 and m["mediaType"] == MANIFEST_MEDIA_TYPE
    assert m["config"]["mediaType"] == CONFIG_MEDIA_TYPE
    cfg = sm.blobs[m["config"]["digest"]]
    assert "sha256:" + hashlib.sha256(cfg).hexdigest() == m["config"]["digest"]
    assert len(m["layers"]) == 1
    layer = m["layers"][0]
    assert layer["mediaType"] == LAYER_MEDIA_TYPE
    payload = json.loads(sm.blobs[layer["digest"]])
    assert payload["critical"] == {
        "identity": {"docker-reference": REF},
        "image": {"docker-manifest-digest": DIGEST},
        "type": "cosign container image signature",
    }
    assert json.loads(cfg)["rootfs"]["diff_ids"] == [layer["digest"]]
    base64.b64decode(layer["annotations"][SIGNATURE_ANNOTATION], validate=True)


def test_openssl_verifies_our_signature_and_we_verify_openssls(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    k = make_ec_key()
    sm = sign_sigstore(REF, DIGEST, k.private_pem)
    layer = json.loads(sm.manifest)["layers"][0]
    (tmp_path / "pub.pem").write_bytes(k.public_pem)
    (tmp_path / "payload").write_bytes(sm.blobs[layer["digest"]])
    (tmp_path / "sig.der").write_bytes(base64.b64decode(layer["annotations"][SIGNATURE_ANNOTATION]))
    r = subprocess.run(
        [
            "openssl",
            "dgst",
            "-sha256",
            "-verify",
            str(tmp_path / "pub.pem"),
            "-signature",
            str(tmp_path / "sig.der"),
            str(tmp_path / "payload"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "Verified OK" in r.stdout, r.stdout + r.stderr

    # the other way: openssl makes the key and signs a payload, we verify it
    subprocess.run(
        [
            "openssl",
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            str(tmp_path / "k.pem"),
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            "openssl",
            "ec",
            "-in",
            str(tmp_path / "k.pem"),
            "-pubout",
            "-out",
            str(tmp_path / "k.pub"),
        ],
        check=True,
        capture_output=True,
    )
    payload = json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": REF},
                "image": {"docker-manifest-digest": DIGEST},
                "type": "cosign container image signature",
            },
            "optional": None,
        }
    ).encode()
    (tmp_path / "p2").write_bytes(payload)
    subprocess.run(
        [
            "openssl",
            "dgst",
            "-sha256",
            "-sign",
            str(tmp_path / "k.pem"),
            "-out",
            str(tmp_path / "s2"),
            str(tmp_path / "p2"),
        ],
        check=True,
        capture_output=True,
    )
    sig = SigstoreSignature(payload, base64.b64encode((tmp_path / "s2").read_bytes()).decode())
    ctx = _policy((tmp_path / "k.pub").read_bytes(), tmp_path)
    v = ctx.evaluate(parse_docker(REF), DIGEST, lambda: Signatures(sigstore=[sig]))
    assert v.accepted, v.reason
    # openssl's SEC1 ("EC PRIVATE KEY") file also signs with our code
    load_private_key((tmp_path / "k.pem").read_bytes(), None, "k.pem")


def test_accepts_good_and_refuses_tampering(tmp_path: Path) -> None:
    k = make_ec_key()
    ctx = _policy(k.public_pem, tmp_path)
    sm = sign_sigstore(REF, DIGEST, k.private_pem)
    good = _sigs(sm)[0]
    ref = parse_docker(REF)

    def ev(*sigs: SigstoreSignature, digest: str = DIGEST, image=ref):
        return ctx.evaluate(image, digest, lambda: Signatures(sigstore=list(sigs)))

    assert ev(good).accepted
    # payload changed (another digest in the same JSON) -> signature no longer verifies
    evil = good.payload.replace(DIGEST.encode(), ("sha256:" + "0" * 64).encode())
    v = ev(SigstoreSignature(evil, good.signature_b64))
    assert not v.accepted and "does not verify" in v.reason and "(sigstoreSigned)" in v.reason
    # signature bit flipped
    raw = bytearray(base64.b64decode(good.signature_b64))
    raw[-3] ^= 1
    v = ev(SigstoreSignature(good.payload, base64.b64encode(bytes(raw)).decode()))
    assert not v.accepted and "does not verify" in v.reason
    v = ev(SigstoreSignature(good.payload, "%%%"))
    assert not v.accepted and "not base64" in v.reason
    # a signature for another manifest
    v = ev(good, digest="sha256:" + "1" * 64)
    assert not v.accepted and "is not the image's" in v.reason
    # another image name: identity mismatch (default matchRepoDigestOrExact)
    v = ev(good, image=parse_docker("reg.example.com/team/app:v2"))
    assert not v.accepted and "does not match reg.example.com/team/app:v2" in v.reason
    # no signatures at all
    v = ev()
    assert not v.accepted and "no signature exists" in v.reason
    # one bad and one good: the good one suffices
    assert ev(SigstoreSignature(good.payload, "AAAA"), good).accepted


def test_wrong_key_and_wrong_key_types_are_refused(tmp_path: Path) -> None:
    k, other = make_ec_key(), make_ec_key()
    sm = sign_sigstore(REF, DIGEST, k.private_pem)
    v = _policy(other.public_pem, tmp_path).evaluate(
        parse_docker(REF), DIGEST, lambda: Signatures(sigstore=_sigs(sm))
    )
    assert not v.accepted and "does not verify with the policy's key" in v.reason

    p384 = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    v = _policy(p384, tmp_path).evaluate(
        parse_docker(REF), DIGEST, lambda: Signatures(sigstore=_sigs(sm))
    )
    assert (
        not v.accepted and "expected an ECDSA P-256 public key, found ECDSA secp384r1" in v.reason
    )
    v = _policy(b"not a key", tmp_path).evaluate(
        parse_docker(REF), DIGEST, lambda: Signatures(sigstore=_sigs(sm))
    )
    assert not v.accepted and "expected a PEM public key" in v.reason


def test_identity_rules_for_sigstore(tmp_path: Path) -> None:
    k = make_ec_key()
    sm = sign_sigstore(REF, DIGEST, k.private_pem)
    sigs = _sigs(sm)
    other_tag = parse_docker("reg.example.com/team/app:v7")
    ctx = _policy(k.public_pem, tmp_path, {"type": "matchRepository"})
    assert ctx.evaluate(other_tag, DIGEST, lambda: Signatures(sigstore=sigs)).accepted
    ctx = _policy(
        k.public_pem, tmp_path, {"type": "exactRepository", "dockerRepository": "reg.example.com/x"}
    )
    v = ctx.evaluate(other_tag, DIGEST, lambda: Signatures(sigstore=sigs))
    assert not v.accepted and "exactRepository" in v.reason


def test_encrypted_private_key_and_appending(tmp_path: Path) -> None:
    k = make_ec_key(b"pw")
    with pytest.raises(SignatureError, match="private key"):
        sign_sigstore(REF, DIGEST, k.private_pem)  # no passphrase
    with pytest.raises(SignatureError, match="right passphrase"):
        sign_sigstore(REF, DIGEST, k.private_pem, passphrase=b"wrong")
    first = sign_sigstore(REF, DIGEST, k.private_pem, passphrase=b"pw", timestamp=1)
    k2 = make_ec_key()
    second = sign_sigstore(
        REF, DIGEST, k2.private_pem, existing_manifest=first.manifest, timestamp=2
    )
    m = json.loads(second.manifest)
    assert len(m["layers"]) == 2
    blobs = {**first.blobs, **second.blobs}
    sigs = parse_attachment(second.manifest, lambda d, _s: blobs[d], "t")
    assert len(sigs) == 2
    for key in (k, k2):
        v = _policy(key.public_pem, tmp_path).evaluate(
            parse_docker(REF), DIGEST, lambda: Signatures(sigstore=sigs)
        )
        assert v.accepted, v.reason


def test_attachment_parsing_is_strict() -> None:
    k = make_ec_key()
    sm = sign_sigstore(REF, DIGEST, k.private_pem)
    m = json.loads(sm.manifest)
    layer_digest = m["layers"][0]["digest"]
    with pytest.raises(SignatureError, match="blob does not match its descriptor"):
        parse_attachment(sm.manifest, lambda d, s: sm.blobs[d] + b" ", "t")
    bad = json.loads(sm.manifest)
    bad["layers"][0]["mediaType"] = "application/octet-stream"
    with pytest.raises(SignatureError, match=r"layers\[0\]: expected mediaType"):
        parse_attachment(json.dumps(bad).encode(), lambda d, s: sm.blobs[d], "t")
    bad = json.loads(sm.manifest)
    del bad["layers"][0]["annotations"]
    with pytest.raises(SignatureError, match="missing annotation"):
        parse_attachment(json.dumps(bad).encode(), lambda d, s: sm.blobs[d], "t")
    with pytest.raises(SignatureError, match="not JSON"):
        parse_attachment(b"{", lambda d, s: b"", "t")
    assert layer_digest in sm.blobs


def test_fetcher_uses_attachment_callable(tmp_path: Path) -> None:
    k = make_ec_key()
    sm = sign_sigstore(REF, DIGEST, k.private_pem)
    asked: list[str] = []

    def fetch_attachment(tag: str):
        asked.append(tag)
        return (sm.manifest, lambda d, _s: sm.blobs[d]) if tag == sm.tag else None

    ref = parse_docker(REF)
    ctx = _policy(k.public_pem, tmp_path)
    v = ctx.evaluate(ref, DIGEST, signature_fetcher(ref, DIGEST, fetch_attachment=fetch_attachment))
    assert v.accepted and asked == [sm.tag]
    other = "sha256:" + "2" * 64
    v = ctx.evaluate(ref, other, signature_fetcher(ref, other, fetch_attachment=fetch_attachment))
    assert not v.accepted and "no signature exists" in v.reason
