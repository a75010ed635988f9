"""Build small test images without a network: tar layers in memory, written as OCI layouts.

Used by the OCI, ocicrypt and image tests to feed our code and the peers (skopeo, umoci)::

    layer = tar_layer({"etc/hello": b"hi\\n", "bin/": None})
    img = write_image(tmp_path / "lay", [layer], tag="v1", compression="gzip")
    img.manifest_digest, img.layer_digests, img.diff_ids

Layers are deterministic (fixed mtimes, owners, ordering) so digests are stable across runs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from coco.oci import mediatypes as mt
from coco.oci.layout import OciLayout
from coco.oci.models import Descriptor, Platform, go_json

MTIME = 1_700_000_000


def tar_layer(files: Mapping[str, bytes | str | None], *, mode: int = 0o644) -> bytes:
    """A tar of ``files``: bytes/str are regular files, ``None`` or a name ending in '/' is a
    directory, a str starting with '->' is a symlink to what follows. Parents are added."""
    buf = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add_dir(name: str) -> None:
            name = name.strip("/")
            if not name or name in seen:
                return
            parent = name.rpartition("/")[0]
            if parent:
                add_dir(parent)
            seen.add(name)
            ti = tarfile.TarInfo(name + "/")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tf.addfile(ti)

        for name in sorted(files):
            content = files[name]
            if content is None or name.endswith("/"):
                add_dir(name)
                continue
            parent = name.strip("/").rpartition("/")[0]
            if parent:
                add_dir(parent)
            ti = tarfile.TarInfo(name.strip("/"))
            ti.mtime = MTIME
            if isinstance(content, str) and content.startswith("->"):
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, content[2:], 0o777
                tf.addfile(ti)
                continue
            data = content.encode() if isinstance(content, str) else content
            ti.size, ti.mode = len(data), mode
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def layer_media_type(compression: str, docker: bool = False) -> str:
    if docker:
        return {
            "gzip": mt.DOCKER_LAYER_GZIP,
            "zstd": mt.DOCKER_LAYER_ZSTD,
            "none": mt.DOCKER_LAYER,
        }[compression]
    return {"gzip": mt.OCI_LAYER_GZIP, "zstd": mt.OCI_LAYER_ZSTD, "none": mt.OCI_LAYER}[compression]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class BuiltImage:
    """What :func:`write_image` wrote."""

    path: Path
    tag: str | None
    manifest: bytes
    manifest_digest: str
    manifest_media_type: str
    config: bytes
    config_digest: str
    layers: list[bytes]  # blob bytes as stored (compressed)
    layer_digests: list[str]
    diff_ids: list[str]
    platform: Platform = field(default_factory=lambda: Platform("amd64", "linux"))

    @property
    def ref(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.manifest_media_type, self.manifest_digest, len(self.manifest))


@dataclass
class BuiltIndex:
    path: Path
    tag: str | None
    index: bytes
    index_digest: str
    images: list[BuiltImage]

    @property
    def ref(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")


def image_blobs(
    tar_layers: Sequence[bytes],
    *,
    compression: str = "gzip",
    docker: bool = False,
    arch: str = "amd64",
    os: str = "linux",
    variant: str = "",
    config_extra: Mapping[str, object] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> tuple[bytes, bytes, list[bytes], list[str]]:
    """(manifest, config, layer blobs, diff_ids) for an image, without writing anything."""
    blobs = [compress(t, compression) for t in tar_layers]
    diff_ids = [sha256(t) for t in tar_layers]
    cfg: dict[str, object] = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": arch,
        "os": os,
    }
    if variant:
        cfg["variant"] = variant
    cfg["config"] = {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"}
    cfg["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    cfg["history"] = [{"created": "2023-11-14T22:13:20Z", "created_by": "imagekit"}] * len(blobs)
    if config_extra:
        cfg.update(config_extra)
    config = json.dumps(cfg, separators=(",", ":")).encode()
    lmt = layer_media_type(compression, docker)
    man: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": mt.DOCKER_MANIFEST if docker else mt.OCI_MANIFEST,
        "config": Descriptor(
            mt.DOCKER_CONFIG if docker else mt.OCI_CONFIG, sha256(config), len(config)
        ).to_json(docker),
        "layers": [Descriptor(lmt, sha256(b), len(b)).to_json(docker) for b in blobs],
    }
    if annotations:
        man["annotations"] = dict(annotations)
    return go_json(man), config, blobs, diff_ids


def write_image(
    path: str | Path,
    tar_layers: Sequence[bytes],
    *,
    tag: str | None = "latest",
    compression: str = "gzip",
    docker: bool = False,
    arch: str = "amd64",
    os: str = "linux",
    variant: str = "",
    config_extra: Mapping[str, object] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> BuiltImage:
    """Write a single-platform image into the OCI layout at ``path`` (created if needed)."""
    lay = OciLayout.init(path)
    manifest, config, blobs, diff_ids = image_blobs(
        tar_layers,
        compression=compression,
        docker=docker,
        arch=arch,
        os=os,
        variant=variant,
        config_extra=config_extra,
        annotations=annotations,
    )
    mmt = mt.DOCKER_MANIFEST if docker else mt.OCI_MANIFEST
    with lay.transaction() as tx:
        for b in [config, *blobs, manifest]:
            tx.put_bytes(b)
        if tag is not None:
            tx.set_tag(tag, Descriptor(mmt, sha256(manifest), len(manifest)))
    return BuiltImage(
        Path(path),
        tag,
        manifest,
        sha256(manifest),
        mmt,
        config,
        sha256(config),
        blobs,
        [sha256(b) for b in blobs],
        diff_ids,
        Platform(arch, os, variant=variant),
    )


def write_index(
    path: str | Path,
    platforms: Sequence[tuple[str, str, Sequence[bytes]]],
    *,
    tag: str | None = "latest",
    compression: str = "gzip",
    docker: bool = False,
) -> BuiltIndex:
    """Write a multi-arch index: ``platforms`` is a list of (os, arch, tar layers)."""
    images = [
        write_image(path, layers, tag=None, compression=compression, docker=docker, arch=a, os=o)
        for o, a, layers in platforms
    ]
    entries = [
        Descriptor(
            im.manifest_media_type, im.manifest_digest, len(im.manifest), platform=im.platform
        ).to_json(docker)
        for im in images
    ]
    imt = mt.DOCKER_MANIFEST_LIST if docker else mt.OCI_INDEX
    index = go_json({"schemaVersion": 2, "mediaType": imt, "manifests": entries})
    lay = OciLayout(path)
    with lay.transaction() as tx:
        tx.put_bytes(index)
        if tag is not None:
            tx.set_tag(tag, Descriptor(imt, sha256(index), len(index)))
    return BuiltIndex(Path(path), tag, index, sha256(index), images)
