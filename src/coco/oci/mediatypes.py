"""Media types of the OCI image spec and Docker image manifest v2 schema 2, and mappings between them."""

from __future__ import annotations

# OCI
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYOUT_HEADER = "application/vnd.oci.layout.header.v1+json"

# Docker v2 schema 2
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"

ENCRYPTED_SUFFIX = "+encrypted"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

_PLAIN_LAYERS = frozenset(
    {
        OCI_LAYER,
        OCI_LAYER_GZIP,
        OCI_LAYER_ZSTD,
        OCI_LAYER_ND,
        OCI_LAYER_ND_GZIP,
        OCI_LAYER_ND_ZSTD,
        DOCKER_LAYER,
        DOCKER_LAYER_GZIP,
        DOCKER_LAYER_FOREIGN_GZIP,
        DOCKER_LAYER_ZSTD,
    }
)
LAYER_TYPES = frozenset(_PLAIN_LAYERS | {t + ENCRYPTED_SUFFIX for t in _PLAIN_LAYERS})

#: The Accept list sent for every manifest request (docker-registry answers 404 without the OCI type).
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])

_DOCKER_TO_OCI = {
    DOCKER_MANIFEST: OCI_MANIFEST,
    DOCKER_MANIFEST_LIST: OCI_INDEX,
    DOCKER_CONFIG: OCI_CONFIG,
    DOCKER_LAYER: OCI_LAYER,
    DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_LAYER_ZSTD: OCI_LAYER_ZSTD,
    DOCKER_LAYER_FOREIGN_GZIP: OCI_LAYER_ND_GZIP,
}


def is_layer(media_type: str) -> bool:
    return media_type in LAYER_TYPES


def is_encrypted(media_type: str) -> bool:
    return media_type.endswith(ENCRYPTED_SUFFIX)


def to_oci(media_type: str) -> str:
    """The OCI equivalent of a Docker media type (OCI types map to themselves)."""
    if media_type.endswith(ENCRYPTED_SUFFIX):
        base = media_type[: -len(ENCRYPTED_SUFFIX)]
        return _DOCKER_TO_OCI.get(base, base) + ENCRYPTED_SUFFIX
    return _DOCKER_TO_OCI.get(media_type, media_type)


def compression(media_type: str) -> str:
    """``gzip``, ``zstd`` or ``none`` for a layer media type (encryption suffix ignored)."""
    base = media_type.removesuffix(ENCRYPTED_SUFFIX)
    if base.endswith("gzip"):
        return "gzip"
    if base.endswith("zstd"):
        return "zstd"
    return "none"
