"""Read an image's manifest (platform-resolved) and config from any transport, for inspection."""

from __future__ import annotations

from dataclasses import dataclass

from coco.crypto.digest import sha256_digest
from coco.errors import ManifestError
from coco.oci.models import Descriptor, ImageConfig, Index, Manifest, parse_manifest
from coco.oci.reference import ImageReference, parse_reference
from coco.oci.transport import Access, open_source


@dataclass
class InspectedImage:
    reference: str
    raw: bytes
    """The bytes the reference names (a manifest or an index)."""
    media_type: str
    digest: str
    manifest: Manifest
    """The image manifest (for an index: the platform's instance)."""
    config: ImageConfig
    instance: Descriptor | None = None
    """The index entry that was chosen, if the reference names an index."""


def inspect_image(
    ref: ImageReference | str,
    access: Access | None = None,
    *,
    os: str | None = None,
    arch: str | None = None,
    variant: str | None = None,
) -> InspectedImage:
    r = parse_reference(ref) if isinstance(ref, str) else ref
    source = open_source(r, access or Access())
    try:
        raw, media_type = source.top_manifest()
        top = parse_manifest(raw, media_type, f"{r}: manifest")
        m: Manifest | Index = top
        chosen = None
        if isinstance(top, Index):
            chosen = top.select(os, arch, variant, where=str(r))
            what = f"{r}: manifest {chosen.digest}"
            m = parse_manifest(source.child_manifest(chosen, what), chosen.media_type, what)
            if not isinstance(m, Manifest):
                raise ManifestError(f"{r}: nested index {chosen.digest} not supported")
        assert isinstance(m, Manifest)
        what = f"{r}: config {m.config.digest}"
        cfg_raw = b"".join(source.open_blob(m.config, what))
        config = ImageConfig.parse(cfg_raw, what)
        return InspectedImage(str(r), raw, top.media_type, sha256_digest(raw), m, config, chosen)
    finally:
        source.close()
