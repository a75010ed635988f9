"""Signing options of ``coco image copy`` (skopeo's names): ``--sign-by FINGERPRINT`` (GPG simple
signing into the registries.d lookaside-staging of the destination), ``--sign-by-sigstore-private-key
KEY`` (a cosign-format ``sha256-HEX.sig`` attachment pushed next to the image), and
``--sign-passphrase-file`` / ``--registries.d`` for both. Keys are checked before the copy starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from coco.cli._args import Parser, Usage, path
from coco.errors import SignatureError
from coco.oci.reference import DockerReference, ImageReference

if TYPE_CHECKING:
    from collections.abc import Callable

    from coco.oci.copy import CopyOptions

    CopySigner = Callable[[ImageReference, Any, CopyOptions], None]


def add_arguments(p: Parser) -> None:
    """Add the signing options to ``coco image copy``."""
    p.add_argument(
        "--sign-by",
        metavar="FINGERPRINT",
        help="Sign the copied manifest with this GPG key (simple signing; GNUPGHOME keyring), "
        "into the destination's registries.d lookaside-staging.",
    )
    p.add_argument(
        "--sign-by-sigstore-private-key",
        type=path(dir_okay=False),
        metavar="KEY",
        help="Sign with this ECDSA P-256 PEM private key (cosign format, pushed as "
        "sha256-<hex>.sig in the destination repository).",
    )
    p.add_argument(
        "--sign-passphrase-file",
        type=path(dir_okay=False),
        metavar="FILE",
        help="Passphrase of the signing key (first line of the file).",
    )
    p.add_argument(
        "--registries.d",
        dest="registries_d",
        type=path(file_okay=False),
        metavar="DIRECTORY",
        help="registries.d directory giving the lookaside-staging for --sign-by (default "
        "/etc/containers/registries.d) and the lookaside of the source's signatures for the "
        "policy.",
    )


def signer(values: dict[str, Any], dst: ImageReference) -> CopySigner | None:
    """The signer the parsed copy options (by dest) ask for, keys checked now, or None; it is
    called with the destination, the CopyResult and the CopyOptions once the image is written."""
    fpr = values.get("sign_by")
    key = values.get("sign_by_sigstore_private_key")
    pfile: Path | None = values.get("sign_passphrase_file")
    if not fpr and not key:  # --registries.d alone serves the source's signature policy
        if pfile:
            raise Usage("--sign-passphrase-file needs --sign-by or --sign-by-sigstore-private-key")
        return None
    if not isinstance(dst, DockerReference):
        raise Usage(f"signing needs a docker:// destination, found {dst}")
    from coco.image.signature import RegistriesD, sign_sigstore, sign_simple, write_lookaside
    from coco.image.signature.policy import canonical
    from coco.image.signature.sigstore import load_private_key
    from coco.image.signature.simple_signing import check_secret_key

    passphrase: bytes | None = None
    if pfile is not None:
        try:
            lines = pfile.read_bytes().splitlines()
        except OSError as e:
            raise SignatureError(f"--sign-passphrase-file {pfile}: {e.strerror}") from None
        passphrase = lines[0] if lines else b""
    write_url: str | None = None
    if fpr:
        regd = values.get("registries_d") or Path("/etc/containers/registries.d")
        write_url = RegistriesD.load(regd).entry_for(dst).write_url
        if write_url is None:
            raise SignatureError(
                f"--sign-by: registries.d {regd} gives no lookaside-staging or lookaside for {dst}"
            )
        check_secret_key(fpr)
    pem = b""
    if key:
        try:
            pem = Path(key).read_bytes()
        except OSError as e:
            raise SignatureError(f"--sign-by-sigstore-private-key {key}: {e.strerror}") from None
        load_private_key(pem, passphrase, f"--sign-by-sigstore-private-key {key}")

    def sign(dst_ref: ImageReference, result: Any, options: Any) -> None:
        assert isinstance(dst_ref, DockerReference)
        identity = canonical(dst_ref)
        digest = result.manifest_digest
        if fpr and write_url:
            sig = sign_simple(identity, digest, fpr, passphrase_file=pfile)
            write_lookaside(write_url, dst_ref, digest, sig)
        if key:
            _push_sigstore(dst_ref, identity, digest, pem, passphrase, options, sign_sigstore)

    return sign


def _push_sigstore(dst, identity, digest, pem, passphrase, options, sign_sigstore) -> None:
    from coco.errors import RegistryError
    from coco.image.signature.sigstore import MANIFEST_MEDIA_TYPE, attachment_tag

    access = options.access("dest")
    tag = attachment_tag(digest)
    what = f"{dst.name}:{tag}"
    with access.client(dst) as client:
        try:
            existing, _ = client.get_manifest(dst.repository, tag, what)
        except RegistryError as e:
            if "registry answered 404" not in str(e):
                raise
            existing = None
        sm = sign_sigstore(identity, digest, pem, passphrase=passphrase, existing_manifest=existing)
        for d, blob in sm.blobs.items():
            if not client.blob_exists(dst.repository, d, what, push=True):
                client.upload_bytes(dst.repository, blob, f"{what}: {d}", d)
        client.put_manifest(dst.repository, sm.tag, sm.manifest, MANIFEST_MEDIA_TYPE, what)
