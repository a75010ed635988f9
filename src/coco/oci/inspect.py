"""Read an image's manifest (platform-resolved) and config from any transport, for inspection,
and show them as ``skopeo inspect`` does."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coco.crypto.digest import sha256_digest
from coco.errors import ManifestError
from coco.jsonio import loads
from coco.oci.models import Descriptor, ImageConfig, Manifest, parse_manifest
from coco.oci.reference import DockerReference, ImageReference, parse_reference
from coco.oci.transport import Access, open_source, resolve_platform


@dataclass
class InspectedImage:
    reference: ImageReference
    raw: bytes
    """The bytes the reference names (a manifest or an index)."""
    media_type: str
    digest: str
    manifest: Manifest
    """The image manifest (for an index: the platform's instance)."""
    config: ImageConfig
    instance: Descriptor | None = None
    """The index entry that was chosen, if the reference names an index."""
    tags: list[str] = field(default_factory=list)
    """The repository's tags (registries only, when asked for)."""


def inspect_image(
    ref: ImageReference | str,
    access: Access | None = None,
    *,
    os: str | None = None,
    arch: str | None = None,
    variant: str | None = None,
    tags: bool = False,
) -> InspectedImage:
    r = parse_reference(ref) if isinstance(ref, str) else ref
    source = open_source(r, access or Access())
    try:
        raw, media_type = source.top_manifest()
        top = parse_manifest(raw, media_type, f"{r}: manifest")
        m, chosen = resolve_platform(source, top, str(r), os=os, arch=arch, variant=variant)
        what = f"{r}: config {m.config.digest}"
        cfg_raw = b"".join(source.open_blob(m.config, what))
        config = ImageConfig.parse(cfg_raw, what)
        listed = source.tags() if tags else []
        return InspectedImage(r, raw, top.media_type, sha256_digest(raw), m, config, chosen, listed)
    finally:
        source.close()


def skopeo_view(info: InspectedImage) -> dict[str, Any]:
    """What ``skopeo inspect`` prints for the image, key for key and in its order."""
    cfg = loads(info.config.raw, what=f"{info.reference}: config", error=ManifestError)
    inner = cfg.get("config") if isinstance(cfg.get("config"), dict) else {}
    out: dict[str, Any] = {}
    if isinstance(info.reference, DockerReference):
        out["Name"] = info.reference.name
    out["Digest"] = info.digest
    out["RepoTags"] = list(info.tags)
    out["Created"] = cfg.get("created")
    out["DockerVersion"] = str(cfg.get("docker_version") or "")
    out["Labels"] = _go_map(inner.get("Labels"))
    out["Architecture"] = info.config.architecture
    if info.config.variant:
        out["Variant"] = info.config.variant
    out["Os"] = info.config.os
    out["Layers"] = [d.digest for d in info.manifest.layers]
    out["LayersData"] = [
        {
            "MIMEType": d.media_type,
            "Digest": d.digest,
            "Size": d.size,
            "Annotations": _go_map(d.annotations),
        }
        for d in info.manifest.layers
    ]
    out["Env"] = inner.get("Env") or None
    return out


def _go_map(m: object) -> dict[str, Any] | None:
    """A JSON object as Go prints a map: keys sorted, ``null`` when empty or absent."""
    return dict(sorted(m.items())) if isinstance(m, dict | Mapping) and m else None


def skopeo_json(view: dict[str, Any]) -> str:
    """``view`` as Go's json.MarshalIndent writes it (4 spaces, maps sorted, <>& escaped)."""
    text = json.dumps(view, indent=4, ensure_ascii=False, sort_keys=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(ch, esc)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
