"""GPG simple signing against the real peers: skopeo signs and we verify; we sign and skopeo
verifies. Keys are made by the real ``gpg``; images live in the real ``docker-registry``."""

from __future__ import annotations

import base64
import hashlib
import shutil
from pathlib import Path

import pytest

from coco.errors import PolicyError, SignatureError
from coco.image.signature import (
    PolicyContext,
    RegistriesD,
    Signatures,
    read_lookaside,
    sign_simple,
    signature_fetcher,
    write_lookaside,
)
from coco.image.signature.policy import Policy
from coco.image.signature.simple_signing import ATOMIC_TYPE, GpgKeyring, Payload
from coco.oci.reference import parse_docker
from tests.image.signature.conftest import skopeo, write_policy


def _registries_d(base: Path, sigdir: Path) -> Path:
    d = base / "registries.d"
    d.mkdir()
    (d / "default.yaml").write_text(
        f"default-docker:\n  lookaside: file://{sigdir}\n  lookaside-staging: file://{sigdir}\n"
    )
    return d


def _signed_by(key: Path, identity: dict | None = None) -> dict:
    req = {"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(key)}
    if identity:
        req["signedIdentity"] = identity
    return {"default": [{"type": "reject"}], "transports": {"docker": {"": [req]}}}


@pytest.fixture(scope="module")
def skopeo_signed(tmp_path_factory, open_registry, gpg_keys, oci_image, accept_all_policy):
    """The image pushed and signed by ``skopeo copy --sign-by`` into a file:// lookaside."""
    alice, _ = gpg_keys
    base = tmp_path_factory.mktemp("skopeo-signed")
    sigdir = base / "sigs"
    regd = _registries_d(base, sigdir)
    ref = f"{open_registry.host}/sig/app:v1"
    skopeo(
        "copy",
        "--policy",
        str(accept_all_policy),
        "--registries.d",
        str(regd),
        "--dest-tls-verify=false",
        "--sign-by",
        alice.fingerprint,
        f"oci:{oci_image.path}:v1",
        f"docker://{ref}",
        env={"GNUPGHOME": str(alice.home)},
    )
    raw = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{ref}").stdout.encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    assert digest == oci_image.manifest_digest
    return {"ref": ref, "digest": digest, "sigdir": sigdir, "regd": regd, "base": base}


def test_skopeo_writes_the_lookaside_layout_we_read(skopeo_signed) -> None:
    s = skopeo_signed
    hexpart = s["digest"].split(":")[1]
    expected = s["sigdir"] / f"sig/app@sha256={hexpart}"
    assert (expected / "signature-1").is_file()
    sigs = read_lookaside(f"file://{s['sigdir']}", parse_docker(s["ref"]), s["digest"])
    assert len(sigs) == 1 and sigs[0] == (expected / "signature-1").read_bytes()


def test_we_accept_skopeo_signature(skopeo_signed, gpg_keys, tmp_path) -> None:
    alice, _ = gpg_keys
    s = skopeo_signed
    for key in (alice.public, alice.public_armored):
        ctx = PolicyContext(Policy.from_file(write_policy(tmp_path / "p.json", _signed_by(key))))
        ref = parse_docker(s["ref"])
        fetch = signature_fetcher(ref, s["digest"], registries_d=RegistriesD.load(s["regd"]))
        v = ctx.evaluate(ref, s["digest"], fetch)
        assert v.accepted, v.reason
        assert alice.fingerprint in v.reason and s["ref"] in v.reason
    # by digest: matchRepoDigestOrExact accepts a signature for any tag of the repository
    by_digest = parse_docker(f"{s['ref'].rsplit(':', 1)[0]}@{s['digest']}")
    fetch = signature_fetcher(by_digest, s["digest"], registries_d=RegistriesD.load(s["regd"]))
    assert ctx.evaluate(by_digest, s["digest"], fetch).accepted


def test_payload_is_what_skopeo_wrote(skopeo_signed, gpg_keys) -> None:
    alice, _ = gpg_keys
    s = skopeo_signed
    blob = read_lookaside(f"file://{s['sigdir']}", parse_docker(s["ref"]), s["digest"])[0]
    with GpgKeyring([alice.public.read_bytes()], "t") as ring:
        payload, fpr = ring.verify(blob, "sig")
    assert fpr == alice.fingerprint
    p = Payload.parse(payload, expected_type=ATOMIC_TYPE, where="t")
    assert p.docker_reference == s["ref"] and p.manifest_digest == s["digest"]


def _evaluate(s: dict, policy: dict, tmp_path: Path, *, image: str | None = None, sigs=None):
    ctx = PolicyContext(Policy.from_file(write_policy(tmp_path / "p.json", policy)))
    ref = parse_docker(image or s["ref"])
    fetch = (
        (lambda: Signatures(simple=sigs))
        if sigs is not None
        else signature_fetcher(ref, s["digest"], registries_d=RegistriesD.load(s["regd"]))
    )
    return ctx.evaluate(ref, s["digest"], fetch)


def test_other_key_is_refused(skopeo_signed, gpg_keys, tmp_path) -> None:
    _, mallory = gpg_keys
    v = _evaluate(skopeo_signed, _signed_by(mallory.public), tmp_path)
    assert not v.accepted
    assert "(signedBy)" in v.reason and "not in the policy's keyring" in v.reason


def test_tampered_signature_is_refused(skopeo_signed, gpg_keys, tmp_path) -> None:
    alice, _ = gpg_keys
    s = skopeo_signed
    blob = bytearray(
        read_lookaside(f"file://{s['sigdir']}", parse_docker(s["ref"]), s["digest"])[0]
    )
    blob[len(blob) // 2] ^= 0x01
    v = _evaluate(s, _signed_by(alice.public), tmp_path, sigs=[bytes(blob)])
    assert not v.accepted and "no signature verified" in v.reason
    v = _evaluate(s, _signed_by(alice.public), tmp_path, sigs=[b"not a pgp message"])
    assert not v.accepted and "signature 1" in v.reason


def test_other_reference_is_refused(skopeo_signed, gpg_keys, tmp_path) -> None:
    alice, _ = gpg_keys
    s = skopeo_signed
    other_tag = s["ref"].replace(":v1", ":v2")  # same repository, so the same lookaside dir
    v = _evaluate(s, _signed_by(alice.public), tmp_path, image=other_tag)
    assert not v.accepted
    assert f"signed identity {s['ref']} does not match {other_tag}" in v.reason
    # matchRepository accepts the same signature for another tag
    v = _evaluate(
        s, _signed_by(alice.public, {"type": "matchRepository"}), tmp_path, image=other_tag
    )
    assert v.accepted, v.reason


def test_unsigned_digest_is_refused(skopeo_signed, gpg_keys, tmp_path) -> None:
    alice, _ = gpg_keys
    s = dict(skopeo_signed)
    s["digest"] = "sha256:" + "0" * 64
    v = _evaluate(s, _signed_by(alice.public), tmp_path)
    assert not v.accepted and "no signature exists" in v.reason


def test_signature_for_another_digest_is_refused(skopeo_signed, gpg_keys, tmp_path) -> None:
    alice, _ = gpg_keys
    s = skopeo_signed
    blob = read_lookaside(f"file://{s['sigdir']}", parse_docker(s["ref"]), s["digest"])[0]
    ctx = PolicyContext(
        Policy.from_file(write_policy(tmp_path / "p.json", _signed_by(alice.public)))
    )
    other = "sha256:" + "1" * 64
    v = ctx.evaluate(parse_docker(s["ref"]), other, lambda: Signatures(simple=[blob]))
    assert not v.accepted and f"is not the image's {other}" in v.reason


# ------------------------------------------------------------------ we sign, skopeo verifies


@pytest.fixture(scope="module")
def pushed_unsigned(open_registry, oci_image, accept_all_policy):
    ref = f"{open_registry.host}/sig/ours:v1"
    skopeo(
        "copy",
        "--policy",
        str(accept_all_policy),
        "--dest-tls-verify=false",
        f"oci:{oci_image.path}:v1",
        f"docker://{ref}",
    )
    return ref, oci_image.manifest_digest


def _skopeo_verify(ref: str, policy: Path, regd: Path, out: Path):
    return skopeo(
        "copy",
        "--policy",
        str(policy),
        "--registries.d",
        str(regd),
        "--src-tls-verify=false",
        f"docker://{ref}",
        f"dir:{out}",
        check=False,
    )


def test_skopeo_accepts_our_signature(pushed_unsigned, gpg_keys, tmp_path) -> None:
    alice, _ = gpg_keys
    ref, digest = pushed_unsigned
    sigdir = tmp_path / "sigs"
    regd = _registries_d(tmp_path, sigdir)
    policy = write_policy(tmp_path / "p.json", _signed_by(alice.public))

    # unsigned: skopeo refuses
    r = _skopeo_verify(ref, policy, regd, tmp_path / "o0")
    assert r.returncode != 0 and "signature" in r.stderr.lower()

    sig = sign_simple(ref, digest, alice.fingerprint, gnupghome=alice.home)
    entry = RegistriesD.load(regd).entry_for(parse_docker(ref))
    path = write_lookaside(entry.write_url, parse_docker(ref), digest, sig)
    assert path == sigdir / f"sig/ours@sha256={digest.split(':')[1]}" / "signature-1"
    r = _skopeo_verify(ref, policy, regd, tmp_path / "o1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o1" / "manifest.json").is_file()

    # skopeo with the other key refuses it
    _, mallory = gpg_keys
    p2 = write_policy(tmp_path / "p2.json", _signed_by(mallory.public))
    r = _skopeo_verify(ref, p2, regd, tmp_path / "o2")
    assert r.returncode != 0


def test_skopeo_refuses_our_tampered_signature(pushed_unsigned, gpg_keys, tmp_path) -> None:
    alice, _ = gpg_keys
    ref, digest = pushed_unsigned
    sigdir = tmp_path / "sigs"
    regd = _registries_d(tmp_path, sigdir)
    sig = bytearray(sign_simple(ref, digest, alice.fingerprint, gnupghome=alice.home))
    sig[len(sig) // 2] ^= 0x01
    write_lookaside(f"file://{sigdir}", parse_docker(ref), digest, bytes(sig))
    r = _skopeo_verify(
        ref, write_policy(tmp_path / "p.json", _signed_by(alice.public)), regd, tmp_path / "o"
    )
    assert r.returncode != 0
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_skopeo_refuses_our_signature_for_another_name(pushed_unsigned, gpg_keys, tmp_path):
    alice, _ = gpg_keys
    ref, digest = pushed_unsigned
    sigdir = tmp_path / "sigs"
    regd = _registries_d(tmp_path, sigdir)
    sig = sign_simple(ref.replace(":v1", ":v9"), digest, alice.fingerprint, gnupghome=alice.home)
    write_lookaside(f"file://{sigdir}", parse_docker(ref), digest, sig)
    r = _skopeo_verify(
        ref, write_policy(tmp_path / "p.json", _signed_by(alice.public)), regd, tmp_path / "o"
    )
    assert r.returncode != 0 and "v9" in r.stderr


def test_write_lookaside_numbers_signatures(tmp_path) -> None:
    ref = parse_docker("r.io/a/b:1")
    d = "sha256:" + "cd" * 32
    p1 = write_lookaside(f"file://{tmp_path}", ref, d, b"one")
    p2 = write_lookaside(f"file://{tmp_path}", ref, d, b"two")
    assert (p1.name, p2.name) == ("signature-1", "signature-2")
    assert read_lookaside(f"file://{tmp_path}", ref, d) == [b"one", b"two"]
    assert sorted(p.name for p in p1.parent.iterdir()) == ["signature-1", "signature-2"]
    with pytest.raises(SignatureError, match="only file://"):
        read_lookaside("https://sigs.example.com", ref, d)


def test_sign_with_unknown_key_fails_cleanly(gpg_keys) -> None:
    alice, _ = gpg_keys
    with pytest.raises(SignatureError, match="gpg made no signature"):
        sign_simple("r.io/a:1", "sha256:" + "ab" * 32, "0" * 40, gnupghome=alice.home)


def test_registries_d_parsing(tmp_path) -> None:
    d = tmp_path / "rd"
    d.mkdir()
    (d / "a.yaml").write_text(
        "default-docker:\n  sigstore: file:///def\n"
        "docker:\n  r.io/team:\n    lookaside: file:///team\n    use-sigstore-attachments: true\n"
        "  r.io/team/app:\n    sigstore-staging: file:///stage\n    sigstore: file:///app\n"
    )
    (d / "ignored.txt").write_text("not: [yaml")
    rd = RegistriesD.load(d)
    assert rd.entry_for(parse_docker("r.io/team/app:1")).lookaside == "file:///app"
    assert rd.entry_for(parse_docker("r.io/team/app:1")).write_url == "file:///stage"
    assert rd.entry_for(parse_docker("r.io/team/x")).use_sigstore_attachments
    assert rd.entry_for(parse_docker("q.io/x")).lookaside == "file:///def"
    (d / "b.yaml").write_text("docker:\n  r.io/team:\n    lookaside: file:///again\n")
    with pytest.raises(PolicyError, match="also set in"):
        RegistriesD.load(d)
    (d / "b.yaml").write_text("docker:\n  r.io/x:\n    lookasid: file:///typo\n")
    with pytest.raises(PolicyError, match="unknown field 'lookasid'"):
        RegistriesD.load(d)
    (d / "b.yaml").write_text("docker:\n  r.io/x:\n    lookaside: ftp://x\n")
    with pytest.raises(PolicyError, match="expected a file://"):
        RegistriesD.load(d)
    (d / "b.yaml").write_text(
        "docker:\n  r.io/x:\n    lookaside: file:///a\n    sigstore: file:///b\n"
    )
    with pytest.raises(PolicyError, match="legacy name"):
        RegistriesD.load(d)
    shutil.rmtree(d)
    # a missing directory configures nothing (as skopeo); a file is refused
    assert RegistriesD.load(d).entry_for(parse_docker("r.io/team/app:1")).lookaside is None
    d.write_text("")
    with pytest.raises(PolicyError, match=r"expected a registries\.d directory"):
        RegistriesD.load(d)


def test_key_paths_key_data_and_several_signatures(skopeo_signed, gpg_keys, tmp_path) -> None:
    alice, mallory = gpg_keys
    s = skopeo_signed
    good = read_lookaside(f"file://{s['sigdir']}", parse_docker(s["ref"]), s["digest"])[0]
    bad = sign_simple(s["ref"], s["digest"], mallory.fingerprint, gnupghome=mallory.home)
    both = {
        "default": [
            {
                "type": "signedBy",
                "keyType": "GPGKeys",
                "keyPaths": [str(mallory.public), str(alice.public_armored)],
            }
        ]
    }
    # mallory's key is trusted here too, so her signature (first) is enough
    v = _evaluate(s, both, tmp_path, sigs=[bad, good])
    assert v.accepted and "signature 1" in v.reason and mallory.fingerprint in v.reason
    data = {
        "default": [
            {
                "type": "signedBy",
                "keyType": "GPGKeys",
                "keyData": base64.b64encode(alice.public.read_bytes()).decode(),
            }
        ]
    }
    v = _evaluate(s, data, tmp_path, sigs=[bad, good])  # mallory's is refused, alice's is used
    assert v.accepted and "signature 2" in v.reason and alice.fingerprint in v.reason
    v = _evaluate(s, data, tmp_path, sigs=[bad])
    assert not v.accepted and "signature 1" in v.reason


def test_keyring_that_is_not_a_key_is_refused(skopeo_signed, tmp_path) -> None:
    junk = tmp_path / "junk.gpg"
    junk.write_bytes(b"this is not an OpenPGP key")
    v = _evaluate(skopeo_signed, _signed_by(junk), tmp_path)
    assert not v.accepted and "expected an OpenPGP public keyring" in v.reason
