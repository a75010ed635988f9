"""``coco image pull --policy P --registries.d D`` end to end: skopeo-signed images (GPG, file://
lookaside) and cosign attachments pushed to the real registry. A refused pull writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coco.cli.main import main
from coco.image.signature import sign_sigstore
from coco.image.signature.sigstore import MANIFEST_MEDIA_TYPE
from coco.oci.registry import RegistryClient
from tests.image.signature.conftest import make_ec_key, skopeo, write_policy


def _cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="module")
def signed(tmp_path_factory, open_registry, gpg_keys, oci_image, accept_all_policy):
    alice, _ = gpg_keys
    base = tmp_path_factory.mktemp("e2e")
    regd = base / "registries.d"
    regd.mkdir()
    (regd / "sigs.yaml").write_text(
        f"docker:\n  {open_registry.host}/e2e:\n    lookaside: file://{base / 'sigs'}\n"
    )
    ref = f"{open_registry.host}/e2e/app:v1"
    stage = base / "stage.d"
    stage.mkdir()
    (stage / "s.yaml").write_text(f"default-docker:\n  lookaside-staging: file://{base / 'sigs'}\n")
    skopeo(
        "copy",
        "--policy",
        str(accept_all_policy),
        "--registries.d",
        str(stage),
        "--dest-tls-verify=false",
        "--sign-by",
        alice.fingerprint,
        f"oci:{oci_image.path}:v1",
        f"docker://{ref}",
        env={"GNUPGHOME": str(alice.home)},
    )
    return ref, regd, base


def _pull(tmp_path: Path, ref: str, policy: Path, regd: Path | None):
    store, bundle = tmp_path / "store", tmp_path / "bundle"
    args = [
        "image",
        "pull",
        "--tls-verify=false",
        "--store",
        str(store),
        "--flatten",
        "-q",
        "--policy",
        str(policy),
    ]
    if regd is not None:
        args += ["--registries.d", str(regd)]
    return _cli([*args, f"docker://{ref}", str(bundle)]), store, bundle


def _nothing_written(store: Path, bundle: Path) -> bool:
    files = [p for p in store.rglob("*") if p.is_file()] if store.exists() else []
    return not bundle.exists() and not any(p.name == "motd" for p in files)


def test_pull_accepts_skopeo_signed_image(signed, gpg_keys, oci_image, tmp_path, capsys) -> None:
    alice, _ = gpg_keys
    ref, regd, _ = signed
    policy = write_policy(
        tmp_path / "p.json",
        {"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(alice.public)}]},
    )
    rc, _store, bundle = _pull(tmp_path, ref, policy, regd)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip() == oci_image.manifest_digest
    assert (bundle / "rootfs/etc/motd").read_text() == "signed\n"


@pytest.mark.parametrize("case", ["other-key", "reject", "no-lookaside"])
def test_refused_pull_writes_nothing(signed, gpg_keys, tmp_path, capsys, case) -> None:
    alice, mallory = gpg_keys
    ref, regd, _ = signed
    key = mallory.public if case == "other-key" else alice.public
    req = (
        {"type": "reject"}
        if case == "reject"
        else {"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(key)}
    )
    policy = write_policy(tmp_path / "p.json", {"default": [req]})
    rc, store, bundle = _pull(tmp_path, ref, policy, None if case == "no-lookaside" else regd)
    _, err = capsys.readouterr()
    assert rc == 1
    assert err.count("\n") == 1 and "signature policy refused" in err
    expected = {
        "other-key": "not in the policy's keyring",
        "reject": "(reject)",
        "no-lookaside": "no signature exists",
    }[case]
    assert expected in err
    assert _nothing_written(store, bundle)


def test_pull_checks_cosign_attachment_in_registry(
    open_registry, oci_image, accept_all_policy, tmp_path, capsys
) -> None:
    ref = f"{open_registry.host}/e2e/cosigned:v1"
    skopeo(
        "copy",
        "--policy",
        str(accept_all_policy),
        "--dest-tls-verify=false",
        f"oci:{oci_image.path}:v1",
        f"docker://{ref}",
    )
    key, other = make_ec_key(b"pw"), make_ec_key()
    sm = sign_sigstore(ref, oci_image.manifest_digest, key.private_pem, passphrase=b"pw")
    with RegistryClient(open_registry.host, tls_verify=False) as c:
        for digest, blob in sm.blobs.items():
            c.upload_bytes("e2e/cosigned", blob, "sig blob", digest)
        c.put_manifest("e2e/cosigned", sm.tag, sm.manifest, MANIFEST_MEDIA_TYPE, "sig manifest")
    # the registry keeps it as an ordinary OCI manifest under the .sig tag
    raw = skopeo(
        "inspect",
        "--tls-verify=false",
        "--raw",
        f"docker://{open_registry.host}/e2e/cosigned:{sm.tag}",
    ).stdout
    assert json.loads(raw) == json.loads(sm.manifest)

    for pub, ok in ((key.public_pem, True), (other.public_pem, False)):
        (tmp_path / "k.pub").write_bytes(pub)
        policy = write_policy(
            tmp_path / "p.json",
            {
                "default": [{"type": "reject"}],
                "transports": {
                    "docker": {
                        f"{open_registry.host}/e2e/cosigned": [
                            {"type": "sigstoreSigned", "keyPath": str(tmp_path / "k.pub")}
                        ]
                    }
                },
            },
        )
        sub = tmp_path / ("ok" if ok else "bad")
        sub.mkdir()
        rc, store, bundle = _pull(sub, ref, policy, None)
        _, err = capsys.readouterr()
        if ok:
            assert rc == 0, err
            assert (bundle / "rootfs/etc/motd").exists()
        else:
            assert rc == 1 and "does not verify with the policy's key" in err
            assert _nothing_written(store, bundle)
