"""``coco image copy --sign-by`` (GPG, verified by skopeo) and ``--sign-by-sigstore-private-key``
(cosign attachment, verified by ``coco image pull``); bad keys refuse before anything is copied."""

from __future__ import annotations

import json
from pathlib import Path

from coco.cli.main import main
from coco.image.signature.sigstore import attachment_tag
from tests.image.signature.conftest import make_ec_key, skopeo, write_policy


def _cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _signed_by(key: Path) -> dict:
    return {"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(key)}]}


def _regd(tmp_path: Path) -> Path:
    d = tmp_path / "registries.d"
    d.mkdir()
    sigs = tmp_path / "sigs"
    (d / "x.yaml").write_text(
        f"default-docker:\n  lookaside: file://{sigs}\n  lookaside-staging: file://{sigs}\n"
    )
    return d


def test_copy_sign_by_verifies_in_skopeo(
    open_registry, oci_image, gpg_keys, tmp_path, monkeypatch, capsys
) -> None:
    alice, mallory = gpg_keys
    monkeypatch.setenv("GNUPGHOME", str(alice.home))
    regd = _regd(tmp_path)
    dst = f"docker://{open_registry.host}/cs/app:v1"
    rc = _cli(
        [
            "image",
            "copy",
            "-q",
            "--dest-tls-verify=false",
            "--sign-by",
            alice.fingerprint,
            "--registries.d",
            str(regd),
            f"oci:{oci_image.path}:v1",
            dst,
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip() == oci_image.manifest_digest
    for key, ok in ((alice.public, True), (mallory.public, False)):
        r = skopeo(
            "copy",
            "--policy",
            str(write_policy(tmp_path / "p.json", _signed_by(key))),
            "--registries.d",
            str(regd),
            "--src-tls-verify=false",
            dst,
            f"dir:{tmp_path / ('ok' if ok else 'bad')}",
            check=False,
        )
        assert (r.returncode == 0) is ok, r.stderr


def test_copy_sign_refuses_before_copying(
    open_registry, oci_image, gpg_keys, tmp_path, monkeypatch, capsys
) -> None:
    alice, _ = gpg_keys
    monkeypatch.setenv("GNUPGHOME", str(alice.home))
    regd = _regd(tmp_path)
    dst = f"docker://{open_registry.host}/cs/never:v1"
    base = ["image", "copy", "-q", "--dest-tls-verify=false"]
    src = f"oci:{oci_image.path}:v1"
    assert _cli([*base, "--sign-by", "0" * 40, "--registries.d", str(regd), src, dst]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected a secret key" in err
    empty = tmp_path / "empty.d"
    empty.mkdir()
    assert (
        _cli([*base, "--sign-by", alice.fingerprint, "--registries.d", str(empty), src, dst]) == 1
    )
    assert "gives no lookaside-staging" in capsys.readouterr().err
    key = make_ec_key(b"right")
    (tmp_path / "k.pem").write_bytes(key.private_pem)
    (tmp_path / "pw").write_text("wrong\n")
    rc = _cli(
        [
            *base,
            "--sign-by-sigstore-private-key",
            str(tmp_path / "k.pem"),
            "--sign-passphrase-file",
            str(tmp_path / "pw"),
            src,
            dst,
        ]
    )
    assert rc == 1 and "right passphrase" in capsys.readouterr().err
    assert _cli([*base, "--sign-by", alice.fingerprint, src, f"oci:{tmp_path / 'o'}:x"]) == 2
    # nothing reached the registry
    r = skopeo("inspect", "--tls-verify=false", "--raw", dst, check=False)
    assert r.returncode != 0


def test_copy_sigstore_then_pull(open_registry, oci_image, tmp_path, capsys) -> None:
    k1, k2, other = make_ec_key(b"pw"), make_ec_key(), make_ec_key()
    (tmp_path / "k1.pem").write_bytes(k1.private_pem)
    (tmp_path / "k2.pem").write_bytes(k2.private_pem)
    (tmp_path / "pw").write_text("pw\n")
    ref = f"{open_registry.host}/cs/cosigned:v1"
    base = ["image", "copy", "-q", "--dest-tls-verify=false"]
    src = f"oci:{oci_image.path}:v1"
    assert (
        _cli(
            [
                *base,
                "--sign-by-sigstore-private-key",
                str(tmp_path / "k1.pem"),
                "--sign-passphrase-file",
                str(tmp_path / "pw"),
                src,
                f"docker://{ref}",
            ]
        )
        == 0
    )
    assert (
        _cli(
            [
                *base,
                "--sign-by-sigstore-private-key",
                str(tmp_path / "k2.pem"),
                src,
                f"docker://{ref}",
            ]
        )
        == 0
    )
    capsys.readouterr()
    raw = skopeo(
        "inspect",
        "--tls-verify=false",
        "--raw",
        f"docker://{open_registry.host}/cs/cosigned:{attachment_tag(oci_image.manifest_digest)}",
    ).stdout
    assert len(json.loads(raw)["layers"]) == 2  # the second copy appended its signature

    for n, (pub, ok) in enumerate(
        ((k1.public_pem, True), (k2.public_pem, True), (other.public_pem, False))
    ):
        (tmp_path / f"p{n}.pub").write_bytes(pub)
        policy = write_policy(
            tmp_path / f"p{n}.json",
            {"default": [{"type": "sigstoreSigned", "keyPath": str(tmp_path / f"p{n}.pub")}]},
        )
        rc = _cli(
            [
                "image",
                "pull",
                "-q",
                "--tls-verify=false",
                "--flatten",
                "--store",
                str(tmp_path / f"s{n}"),
                "--policy",
                str(policy),
                f"docker://{ref}",
                str(tmp_path / f"b{n}"),
            ]
        )
        err = capsys.readouterr().err
        assert (rc == 0) is ok, err
        assert (tmp_path / f"b{n}").exists() is ok
