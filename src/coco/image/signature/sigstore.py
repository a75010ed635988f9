"""Cosign-format ("sigstore") image signatures with a fixed ECDSA P-256 key pair.

What we follow (the published cosign / containers-image "sigstore attachments" format):

- The signatures of manifest ``sha256:HEX`` live in the same repository as an OCI image manifest
  tagged ``sha256-HEX.sig``.
- That manifest has config media type ``application/vnd.oci.image.config.v1+json`` and one layer
  per signature with media type ``application/vnd.dev.cosign.simplesigning.v1+json``; the layer
  blob is the payload (simple-signing JSON with ``critical.type`` = ``cosign container image
  signature``), and the layer annotation ``dev.cosignproject.cosign/signature`` is the standard
  base64 of an ASN.1 DER ECDSA signature over SHA-256 of the payload.
- Adding a signature appends a layer to the existing ``.sig`` manifest and rewrites its config
  (``rootfs.diff_ids`` lists the payload digests).

Keys are PEM: a SubjectPublicKeyInfo public key for verification; a PKCS#8 or SEC1 private key
(optionally encrypted with a passphrase) for signing. Only the P-256 curve is accepted. Keyless
(Fulcio/Rekor) signatures are not supported. Transport-agnostic: this module returns bytes and
where they go, and takes a callable to read blobs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coco.errors import SignatureError
from coco.image.signature.simple_signing import COSIGN_TYPE, Payload

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
_MAX_LAYERS = 256
_MAX_PAYLOAD = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SigstoreSignature:
    """One cosign signature: the payload bytes and the base64 signature from the annotation."""

    payload: bytes
    signature_b64: str


@dataclass(frozen=True, slots=True)
class SignatureManifest:
    """What to push: ``blobs`` (digest -> bytes, config and payload layers) and then
    ``manifest`` (media type :data:`MANIFEST_MEDIA_TYPE`) under ``tag`` in the image's repo."""

    tag: str
    manifest: bytes
    blobs: dict[str, bytes]

    @property
    def manifest_digest(self) -> str:
        return _sha256(self.manifest)


def attachment_tag(manifest_digest: str) -> str:
    """``sha256:HEX`` -> ``sha256-HEX.sig``."""
    alg, sep, hexpart = manifest_digest.partition(":")
    if not sep or alg not in ("sha256", "sha512") or not hexpart:
        raise SignatureError(f"expected a sha256:<hex> manifest digest, found {manifest_digest!r}")
    return f"{alg}-{hexpart}.sig"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def load_public_key(pem: bytes, where: str) -> ec.EllipticCurvePublicKey:
    """A PEM ECDSA P-256 public key, or a :class:`SignatureError` saying what was found."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise SignatureError(f"{where}: expected a PEM public key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise SignatureError(f"{where}: expected an ECDSA P-256 public key, found {_describe(key)}")
    return key


def load_private_key(
    pem: bytes, passphrase: bytes | None, where: str
) -> ec.EllipticCurvePrivateKey:
    """A PEM ECDSA P-256 private key (PKCS#8 or SEC1, optionally encrypted)."""
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase or None)
    except TypeError as e:
        raise SignatureError(f"{where}: {e}") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise SignatureError(
            f"{where}: expected a PEM private key (and the right passphrase): {e}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise SignatureError(
            f"{where}: expected an ECDSA P-256 private key, found {_describe(key)}"
        )
    return key


def _describe(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"ECDSA {key.curve.name}"
    return type(key).__name__.lstrip("_")


def verify_signature(sig: SigstoreSignature, keys: list[ec.EllipticCurvePublicKey], where: str):
    """Check the ECDSA signature with any of ``keys``; return the parsed :class:`Payload`."""
    try:
        raw = base64.b64decode(sig.signature_b64.replace("\n", ""), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{where}: signature annotation is not base64") from None
    for key in keys:
        try:
            key.verify(raw, sig.payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            continue
        return Payload.parse(sig.payload, expected_type=COSIGN_TYPE, where=where)
    raise SignatureError(f"{where}: ECDSA signature does not verify with the policy's key")


def sign_payload(key: ec.EllipticCurvePrivateKey, payload: bytes) -> str:
    """The annotation value for ``payload``: base64 of the DER ECDSA P-256/SHA-256 signature."""
    return base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()


def _config(diff_ids: list[str]) -> bytes:
    doc = {
        "architecture": "",
        "config": {},
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "os": "",
        "rootfs": {"diff_ids": diff_ids, "type": "layers"},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def sign_sigstore(
    docker_reference: str,
    manifest_digest: str,
    private_key_pem: bytes,
    *,
    passphrase: bytes | None = None,
    existing_manifest: bytes | None = None,
    timestamp: int | None = None,
) -> SignatureManifest:
    """Make (or extend) the ``sha256-HEX.sig`` manifest with one new signature.

    ``existing_manifest`` is the current ``.sig`` manifest if the repository already has one:
    its layers are kept (their blobs are already in the registry) and the new one appended."""
    tag = attachment_tag(manifest_digest)
    key = load_private_key(private_key_pem, passphrase, "sigstore private key")
    payload = Payload(docker_reference, manifest_digest, COSIGN_TYPE).to_bytes(
        creator="coco", timestamp=timestamp
    )
    layers: list[dict] = []
    if existing_manifest is not None:
        layers = list(_parse_manifest(existing_manifest, f"existing {tag}")["layers"])
    layers.append(
        {
            "mediaType": LAYER_MEDIA_TYPE,
            "size": len(payload),
            "digest": _sha256(payload),
            "annotations": {SIGNATURE_ANNOTATION: sign_payload(key, payload)},
        }
    )
    config = _config([layer["digest"] for layer in layers])
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "size": len(config), "digest": _sha256(config)},
        "layers": layers,
    }
    body = json.dumps(manifest, separators=(",", ":")).encode()
    return SignatureManifest(tag, body, {_sha256(config): config, _sha256(payload): payload})


def _parse_manifest(data: bytes, where: str) -> dict:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SignatureError(f"{where}: manifest is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise SignatureError(f"{where}: expected an OCI image manifest with schemaVersion 2")
    mt = doc.get("mediaType", MANIFEST_MEDIA_TYPE)
    if mt != MANIFEST_MEDIA_TYPE:
        raise SignatureError(f"{where}: expected mediaType {MANIFEST_MEDIA_TYPE}, found {mt!r}")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) > _MAX_LAYERS:
        raise SignatureError(f"{where}: layers: expected a list of at most {_MAX_LAYERS}")
    for i, layer in enumerate(layers):
        lw = f"{where}: layers[{i}]"
        if not isinstance(layer, dict):
            raise SignatureError(f"{lw}: expected an object")
        if layer.get("mediaType") != LAYER_MEDIA_TYPE:
            raise SignatureError(
                f"{lw}: expected mediaType {LAYER_MEDIA_TYPE}, found {layer.get('mediaType')!r}"
            )
        size, digest = layer.get("size"), layer.get("digest")
        if not isinstance(size, int) or not 0 <= size <= _MAX_PAYLOAD:
            raise SignatureError(f"{lw}: size: expected 0..{_MAX_PAYLOAD}, found {size!r}")
        if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
            raise SignatureError(f"{lw}: digest: expected sha256:<64 hex>, found {digest!r}")
        ann = layer.get("annotations")
        if not isinstance(ann, dict) or not isinstance(ann.get(SIGNATURE_ANNOTATION), str):
            raise SignatureError(f"{lw}: missing annotation {SIGNATURE_ANNOTATION!r}")
    return doc


def parse_attachment(
    manifest: bytes, get_blob: Callable[[str, int], bytes], where: str
) -> list[SigstoreSignature]:
    """The signatures in a ``.sig`` manifest; ``get_blob(digest, size)`` reads a layer blob (its
    digest is checked here as well)."""
    doc = _parse_manifest(manifest, where)
    out: list[SigstoreSignature] = []
    for i, layer in enumerate(doc["layers"]):
        blob = get_blob(layer["digest"], layer["size"])
        if len(blob) != layer["size"] or _sha256(blob) != layer["digest"]:
            raise SignatureError(
                f"{where}: layers[{i}]: blob does not match its descriptor "
                f"(expected {layer['digest']}, got {_sha256(blob)})"
            )
        out.append(SigstoreSignature(blob, layer["annotations"][SIGNATURE_ANNOTATION]))
    return out
