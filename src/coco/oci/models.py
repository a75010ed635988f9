"""Strict models of the image-spec objects: descriptors, manifests, indexes and image configs.

One class per spec object. Parsing refuses what the spec does not allow (unknown fields in
descriptors, manifests and indexes, unknown media types, malformed digests, negative sizes) with
a one-line :class:`~coco.errors.ManifestError` that names the object. Every parsed manifest or
index keeps its exact source bytes in ``raw`` so that copying it unchanged keeps its digest.

:func:`go_json` serializes a changed manifest the way Go's ``encoding/json`` does for the image-spec
structs (compact, struct field order, sorted map keys, ``<>&`` escaped), so that our output is
byte-identical to skopeo's for the same content.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from coco.crypto.digest import Digest, sha256_digest
from coco.errors import ManifestError
from coco.jsonfields import Fields, kind
from coco.oci import mediatypes as mt
from coco.record import Factory, record, replace

TYPE_CHECKING = False  # typing stays unloaded in short processes
if TYPE_CHECKING:
    from typing import Any

_EXTRA_LAYER_TYPES = frozenset({mt.OCI_EMPTY, "application/vnd.wasm.content.layer.v1+wasm"})


_FIELDS = Fields(ManifestError)


def _annotations(obj: Mapping[str, Any], where: str) -> dict[str, str]:
    if obj.get("annotations") is None:
        return {}
    return dict(_FIELDS.mapping(obj, "annotations", where))


@record
class Platform:
    """The platform of an index entry (``os``/``architecture``/``variant`` ...)."""

    architecture: str
    os: str
    os_version: str = ""
    os_features: tuple[str, ...] = ()
    variant: str = ""
    features: tuple[str, ...] = ()  # Docker manifest lists only

    _KEYS = frozenset({"architecture", "os", "os.version", "os.features", "variant", "features"})

    @classmethod
    def from_json(cls, obj: object, where: str) -> Platform:
        if not isinstance(obj, dict):
            raise ManifestError(f"{where}: platform: expected object, found {kind(obj)}")
        _FIELDS.check(obj, f"{where}: platform", optional=cls._KEYS)
        for k in ("os.features", "features"):
            _FIELDS.strings(obj, k, f"{where}: platform", [])
        for k in ("os.version", "variant"):
            _FIELDS.string(obj, k, f"{where}: platform", "")
        return cls(
            architecture=_FIELDS.get(obj, "architecture", f"{where}: platform", str),
            os=_FIELDS.get(obj, "os", f"{where}: platform", str),
            os_version=obj.get("os.version", ""),
            os_features=tuple(obj.get("os.features", ())),
            variant=obj.get("variant", ""),
            features=tuple(obj.get("features", ())),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant:
            out["variant"] = self.variant
        if self.features:
            out["features"] = list(self.features)
        return out

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


@record
class Descriptor:
    """A content descriptor: media type, digest and size of a blob, plus optional extras."""

    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    annotations: Mapping[str, str] = Factory(dict)
    data: str | None = None
    platform: Platform | None = None
    artifact_type: str = ""

    _KEYS = frozenset(
        {"mediaType", "digest", "size", "urls", "annotations", "data", "platform", "artifactType"}
    )

    @classmethod
    def from_json(cls, obj: object, where: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise ManifestError(f"{where}: expected a descriptor object, found {kind(obj)}")
        _FIELDS.check(obj, where, optional=cls._KEYS)
        media_type = _FIELDS.get(obj, "mediaType", where, str)
        digest = str(Digest.parse(_FIELDS.get(obj, "digest", where, str), f"{where}: digest"))
        size = _FIELDS.get(obj, "size", where, int)
        if size < 0:
            raise ManifestError(f"{where}: size must be >= 0, found {size}")
        urls = obj.get("urls", [])
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ManifestError(f"{where}: 'urls' must be an array of strings")
        data = obj.get("data")
        if data is not None and not isinstance(data, str):
            raise ManifestError(f"{where}: 'data' must be a base64 string")
        plat = obj.get("platform")
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            urls=tuple(urls),
            annotations=_annotations(obj, where),
            data=data,
            platform=Platform.from_json(plat, where) if plat is not None else None,
            artifact_type=obj.get("artifactType", "") or "",
        )

    def to_json(self, docker: bool = False) -> dict[str, Any]:
        """Fields in Go struct order (Docker schema 2 puts size before digest)."""
        if docker:
            out: dict[str, Any] = {
                "mediaType": self.media_type,
                "size": self.size,
                "digest": self.digest,
            }
        else:
            out = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.data is not None:
            out["data"] = self.data
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out

    def with_(self, **changes: Any) -> Descriptor:
        return replace(self, **changes)

    @property
    def short(self) -> str:
        alg, _, hx = self.digest.partition(":")
        return f"{alg}:{hx[:12]}"


@record
class Manifest:
    """An image manifest (OCI or Docker v2 schema 2)."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = Factory(dict)
    subject: Descriptor | None = None
    artifact_type: str = ""
    raw: bytes = b""
    explicit_media_type: bool = True

    _KEYS = frozenset(
        {"schemaVersion", "mediaType", "config", "layers", "annotations", "subject", "artifactType"}
    )

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)

    @property
    def is_docker(self) -> bool:
        return self.media_type == mt.DOCKER_MANIFEST

    def to_bytes(self) -> bytes:
        """Serialize as Go would (used only when the manifest changed)."""
        docker = self.is_docker
        out: dict[str, Any] = {"schemaVersion": 2}
        if self.explicit_media_type or docker:
            out["mediaType"] = self.media_type
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        out["config"] = self.config.to_json(docker)
        out["layers"] = [d.to_json(docker) for d in self.layers]
        if self.subject is not None:
            out["subject"] = self.subject.to_json()
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return go_json(out)

    def rebuilt(self, **changes: Any) -> Manifest:
        """A copy with ``changes`` applied and ``raw`` re-serialized."""
        m = replace(self, **changes)
        return replace(m, raw=m.to_bytes())

    def to_oci(self) -> Manifest:
        """The OCI equivalent of a Docker manifest (self if already OCI)."""
        if not self.is_docker:
            return self
        return self.rebuilt(
            media_type=mt.OCI_MANIFEST,
            config=self.config.with_(media_type=mt.to_oci(self.config.media_type)),
            layers=tuple(d.with_(media_type=mt.to_oci(d.media_type)) for d in self.layers),
        )


@record
class Index:
    """An image index (OCI) or manifest list (Docker)."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = Factory(dict)
    subject: Descriptor | None = None
    artifact_type: str = ""
    raw: bytes = b""

    _KEYS = frozenset(
        {"schemaVersion", "mediaType", "manifests", "annotations", "subject", "artifactType"}
    )

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)

    @property
    def is_docker(self) -> bool:
        return self.media_type == mt.DOCKER_MANIFEST_LIST

    def to_bytes(self) -> bytes:
        """Serialize as Go would (used only when the index changed)."""
        docker = self.is_docker
        out: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        out["manifests"] = [d.to_json(docker) for d in self.manifests]
        if self.subject is not None:
            out["subject"] = self.subject.to_json()
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return go_json(out)

    def rebuilt(self, **changes: Any) -> Index:
        i = replace(self, **changes)
        return replace(i, raw=i.to_bytes())

    def select(
        self,
        os: str | None = None,
        arch: str | None = None,
        variant: str | None = None,
        where: str = "index",
    ) -> Descriptor:
        """The entry for ``os``/``arch`` (default: this host), as skopeo picks it."""
        want_os = os or "linux"
        want_arch = arch or host_arch()
        if len(self.manifests) == 1 and self.manifests[0].platform is None:
            return self.manifests[0]  # a single entry that names no platform
        candidates = [
            d
            for d in self.manifests
            if d.platform is not None
            and d.platform.os == want_os
            and d.platform.architecture == want_arch
            and (not variant or d.platform.variant == variant)
        ]
        if not candidates:
            have = ", ".join(str(d.platform) for d in self.manifests if d.platform) or "none"
            raise ManifestError(
                f"{where}: no image for platform {want_os}/{want_arch}"
                f"{'/' + variant if variant else ''} (available: {have})"
            )
        if not variant and len(candidates) > 1:
            preferred = _DEFAULT_VARIANT.get(want_arch, "")
            for d in candidates:
                if d.platform is not None and d.platform.variant == preferred:
                    return d
        return candidates[0]


_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


def host_arch() -> str:
    """The Go GOARCH name of this machine."""
    m = os.uname().machine.lower()
    return {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "armv7l": "arm",
        "i686": "386",
        "i386": "386",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }.get(m, m)


def _load_json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        head = raw[:40].decode("utf-8", "replace")
        raise ManifestError(
            f"{where}: not valid JSON ({e.__class__.__name__}: {e}); starts with {head!r}"
        ) from None
    except RecursionError:  # a hostile document: '[' nested beyond the parser's stack
        raise ManifestError(
            f"{where}: expected JSON of reasonable depth, found arrays/objects nested too deeply"
        ) from None
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object, found {kind(obj)}")
    return obj


def parse_manifest(
    raw: bytes, media_type: str | None = None, where: str = "manifest"
) -> Manifest | Index:
    """Parse manifest or index bytes; ``media_type`` is the type the transport announced, if any."""
    obj = _load_json(raw, where)
    declared = obj.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ManifestError(f"{where}: 'mediaType' must be a string")
    kind = declared or media_type
    if kind is None:
        kind = mt.OCI_INDEX if "manifests" in obj else mt.OCI_MANIFEST
    if (
        media_type
        and declared
        and media_type != declared
        and media_type in mt.MANIFEST_TYPES | mt.INDEX_TYPES
    ):
        raise ManifestError(
            f"{where}: media type mismatch: served as {media_type!r}, document says {declared!r}"
        )
    if kind not in mt.MANIFEST_TYPES | mt.INDEX_TYPES:
        raise ManifestError(
            f"{where}: unsupported manifest media type {kind!r} (expected one of "
            f"{', '.join(sorted(mt.MANIFEST_TYPES | mt.INDEX_TYPES))})"
        )
    sv = _FIELDS.get(obj, "schemaVersion", where, int)
    if sv != 2:
        raise ManifestError(f"{where}: schemaVersion: expected 2, found {sv}")
    subject = obj.get("subject")
    subj = Descriptor.from_json(subject, f"{where}: subject") if subject is not None else None
    art = obj.get("artifactType", "")
    if not isinstance(art, str):
        raise ManifestError(f"{where}: 'artifactType' must be a string")
    if kind in mt.INDEX_TYPES:
        _FIELDS.check(obj, where, optional=Index._KEYS)
        entries = _FIELDS.get(obj, "manifests", where, list)
        descs = []
        for i, e in enumerate(entries):
            d = Descriptor.from_json(e, f"{where}: manifests[{i}]")
            if d.media_type not in mt.MANIFEST_TYPES | mt.INDEX_TYPES:
                raise ManifestError(
                    f"{where}: manifests[{i}]: unsupported media type {d.media_type!r}"
                )
            descs.append(d)
        return Index(kind, tuple(descs), _annotations(obj, where), subj, art, raw)
    _FIELDS.check(obj, where, optional=Manifest._KEYS)
    config = Descriptor.from_json(_FIELDS.get(obj, "config", where, dict), f"{where}: config")
    if config.media_type not in mt.CONFIG_TYPES | {mt.OCI_EMPTY}:
        raise ManifestError(
            f"{where}: config: unsupported media type {config.media_type!r} "
            f"(expected {mt.OCI_CONFIG} or {mt.DOCKER_CONFIG})"
        )
    layers = []
    for i, e in enumerate(_FIELDS.get(obj, "layers", where, list)):
        d = Descriptor.from_json(e, f"{where}: layers[{i}]")
        if d.media_type not in mt.LAYER_TYPES | _EXTRA_LAYER_TYPES:
            raise ManifestError(f"{where}: layers[{i}]: unknown layer media type {d.media_type!r}")
        layers.append(d)
    if kind == mt.DOCKER_MANIFEST and declared is None:
        raise ManifestError(f"{where}: Docker schema 2 manifest without 'mediaType'")
    return Manifest(
        kind, config, tuple(layers), _annotations(obj, where), subj, art, raw, declared is not None
    )


@record
class ImageConfig:
    """The parts of an image config this package uses; ``raw`` keeps the exact bytes.

    Fields beyond these are kept but not interpreted (image configs carry tool-specific extras).
    """

    architecture: str
    os: str
    diff_ids: tuple[str, ...]
    variant: str = ""
    config: Mapping[str, Any] = Factory(dict)
    raw: bytes = b""

    @classmethod
    def parse(cls, raw: bytes, where: str = "config") -> ImageConfig:
        obj = _load_json(raw, where)
        arch = _FIELDS.get(obj, "architecture", where, str)
        os_ = _FIELDS.get(obj, "os", where, str)
        rootfs = _FIELDS.get(obj, "rootfs", where, dict)
        if rootfs.get("type") != "layers":
            raise ManifestError(
                f"{where}: rootfs.type: expected 'layers', found {rootfs.get('type')!r}"
            )
        ids = _FIELDS.get(rootfs, "diff_ids", f"{where}: rootfs", list)
        diff_ids = tuple(
            str(Digest.parse(d, f"{where}: rootfs.diff_ids[{i}]")) for i, d in enumerate(ids)
        )
        cfg = obj.get("config") or {}
        if not isinstance(cfg, dict):
            raise ManifestError(f"{where}: 'config' must be an object")
        variant = obj.get("variant", "")
        if not isinstance(variant, str):
            raise ManifestError(f"{where}: 'variant' must be a string")
        return cls(arch, os_, diff_ids, variant, cfg, raw)

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)


# --- Go encoding/json compatible serialization -------------------------------------------------

_GO_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def _go_str(s: str) -> str:
    out = ['"']
    for ch in s:
        esc = _GO_ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _go_value(v: Any, top_order: bool) -> str:
    if isinstance(v, str):
        return _go_str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if v is None:
        return "null"
    if isinstance(v, list | tuple):
        return "[" + ",".join(_go_value(x, True) for x in v) + "]"
    if isinstance(v, dict):
        # Struct-derived dicts keep insertion (= struct field) order; maps (annotations) are sorted
        # by Go, so sort any dict whose keys are not the struct's: the caller builds structs in order.
        items = v.items() if top_order else sorted(v.items())
        return "{" + ",".join(f"{_go_str(k)}:{_go_value(x, _is_struct(k))}" for k, x in items) + "}"
    raise TypeError(f"cannot serialize {type(v).__name__}")


def _is_struct(key: str) -> bool:
    # Values under these keys are maps in Go (sorted keys); everything else is a struct.
    return key != "annotations"


def go_json(obj: Mapping[str, Any]) -> bytes:
    """Compact JSON as Go's ``encoding/json`` writes the image-spec structs."""
    return _go_value(dict(obj), True).encode("utf-8")
