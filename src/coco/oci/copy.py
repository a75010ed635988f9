"""Copy images between transports like ``skopeo copy``, with an optional per-layer transform.

The copier reads the source manifest (for an index: every instance with ``all_platforms``, else
the one for the requested or host platform), copies the config and the layers (several layers
at once, each streamed in ~1 MiB chunks through a reader thread so I/O and hashing overlap),
skips blobs the destination already has, tries a cross-repository mount on the same registry,
and writes the manifest last. Unchanged manifests are copied byte for byte. Any failure leaves
the destination as it was (see :mod:`coco.oci.transport`).

A :class:`LayerTransform` (``coco.ocicrypt`` plugs in here) may rewrite layers on the way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from coco.crypto.digest import sha256_digest
from coco.errors import ManifestError
from coco.oci import mediatypes as mt
from coco.oci.auth import Credentials
from coco.oci.models import Descriptor, Index, Manifest, parse_manifest
from coco.oci.reference import ImageReference, parse_reference
from coco.oci.stream import Cancelled, prefetch
from coco.oci.transport import (
    Access,
    ImageDestination,
    ImageSource,
    open_destination,
    open_source,
    resolve_platform,
)


@dataclass
class TransformedLayer:
    """What a :class:`LayerTransform` returns for one layer."""

    chunks: Iterator[bytes]
    """The new blob bytes; may raise CocoError anywhere, including at the end."""
    descriptor: Callable[[str, int], Descriptor]
    """Called once ``chunks`` is exhausted with the new blob's digest and size."""


class LayerTransform(Protocol):
    """Rewrites selected layers while they are copied (encryption, decryption ...).

    The copier calls :meth:`wants` for every layer of every manifest it copies (with the
    source descriptor). If any layer is wanted and ``requires_oci`` is true, a Docker v2s2
    manifest is converted to OCI first; :meth:`apply` then gets the layer descriptor as it will
    appear in the destination manifest (OCI media types) and the *source* blob as a stream of
    ~1 MiB chunks that raises DigestMismatchError at its end if the source is corrupt. The
    returned chunks are written to the destination while they are produced; a CocoError from
    them (at any point, including the end) aborts the whole copy and leaves the destination
    unchanged. The config blob is never transformed.
    """

    requires_oci: bool

    def wants(self, index: int, total: int, layer: Descriptor) -> bool:
        """True to transform layer ``index`` (0-based) of ``total``; False copies it unchanged."""
        ...

    def apply(
        self, index: int, total: int, layer: Descriptor, chunks: Iterator[bytes]
    ) -> TransformedLayer:
        """Start transforming one layer (called from a worker thread)."""
        ...


class ProgressTask(Protocol):
    def advance(self, n: int) -> None: ...

    def finish(self) -> None: ...


class Progress(Protocol):
    """Receives progress; the CLI draws it with rich."""

    def task(self, description: str, total: int | None) -> ProgressTask: ...


@dataclass
class CopyOptions:
    src_credentials: Credentials | None = None
    dest_credentials: Credentials | None = None
    authfile: Path | None = None
    """Explicit authfile; None: $REGISTRY_AUTH_FILE, XDG, ~/.docker/config.json."""
    src_tls_verify: bool = True
    dest_tls_verify: bool = True
    src_cert_dir: Path | None = None
    dest_cert_dir: Path | None = None
    retry_times: int = 0
    all_platforms: bool = False
    override_os: str | None = None
    override_arch: str | None = None
    override_variant: str | None = None
    workers: int = 3
    patch_size: int | None = None

    def access(self, side: str) -> Access:
        """How to reach the ``src`` or the ``dest`` registry."""
        src = side == "src"
        return Access(
            self.src_credentials if src else self.dest_credentials,
            self.authfile,
            self.src_tls_verify if src else self.dest_tls_verify,
            self.src_cert_dir if src else self.dest_cert_dir,
            self.retry_times,
        )

    """Upload to registries in PATCH requests of at most this many bytes (None: one PATCH)."""


@dataclass
class LayerCopy:
    source: Descriptor
    dest: Descriptor
    action: str  # "copied", "skipped", "mounted" or "transformed"


@dataclass
class CopyResult:
    manifest_digest: str
    media_type: str
    manifest: bytes
    destination: str
    layers: list[LayerCopy] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)


def copy_image(
    src: ImageReference | str,
    dst: ImageReference | str,
    *,
    options: CopyOptions | None = None,
    transform: LayerTransform | None = None,
    progress: Progress | None = None,
    accept: Callable[[ImageSource, bytes, str], None] | None = None,
) -> CopyResult:
    """Copy ``src`` to ``dst``; return what was written. Raises CocoError on any failure.

    ``accept(source, manifest_bytes, manifest_digest)`` is called with the top-level manifest
    before anything is written and refuses the copy by raising (a signature policy, as skopeo's).
    """
    options = options or CopyOptions()
    src_ref = parse_reference(src) if isinstance(src, str) else src
    dst_ref = parse_reference(dst) if isinstance(dst, str) else dst
    source = open_source(
        src_ref,
        options.access("src"),
    )
    try:
        raw, media_type = source.top_manifest()
        top = parse_manifest(raw, media_type, f"{src_ref}: manifest")
        if accept is not None:
            accept(source, raw, sha256_digest(raw))
        dest = open_destination(
            dst_ref,
            options.access("dest"),
            options.patch_size,
        )
        try:
            copier = _Copier(source, dest, options, transform, progress)
            result = copier.run(top)
            dest.commit()
            return result
        except BaseException:
            dest.abort()
            raise
        finally:
            dest.close()
    finally:
        source.close()


class _Copier:
    def __init__(
        self,
        source: ImageSource,
        dest: ImageDestination,
        options: CopyOptions,
        transform: LayerTransform | None,
        progress: Progress | None,
    ) -> None:
        self.source = source
        self.dest = dest
        self.options = options
        self.transform = transform
        self.progress = progress
        self.cancel = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=max(1, options.workers))
        self.layers: list[LayerCopy] = []
        self.instances: list[str] = []

    def run(self, top: Manifest | Index) -> CopyResult:
        try:
            if isinstance(top, Manifest):
                m = self._copy_manifest(top, str(self.source.ref))
                self.dest.put_manifest(m.raw, m.media_type, top=True, what=f"{self.dest.ref}")
                return self._result(m.raw, m.media_type)
            if not self.options.all_platforms:
                o = self.options
                where = f"{self.source.ref}"
                child, desc = resolve_platform(
                    self.source,
                    top,
                    where,
                    os=o.override_os,
                    arch=o.override_arch,
                    variant=o.override_variant,
                )
                assert desc is not None
                m = self._copy_manifest(child, f"{where} ({desc.platform})")
                self.dest.put_manifest(m.raw, m.media_type, top=True, what=f"{self.dest.ref}")
                return self._result(m.raw, m.media_type)
            new_entries = []
            for desc in top.manifests:
                child = self._child(desc)
                if not isinstance(child, Manifest):
                    raise ManifestError(
                        f"{self.source.ref}: nested index {desc.digest} not supported"
                    )
                label = f"{self.source.ref} ({desc.platform or desc.short})"
                m = self._copy_manifest(child, label)
                self.dest.put_manifest(m.raw, m.media_type, top=False, what=label)
                self.instances.append(m.digest)
                new_entries.append(
                    desc.with_(media_type=m.media_type, digest=m.digest, size=len(m.raw))
                )
            idx = top
            if tuple(new_entries) != top.manifests:
                idx_type = (
                    mt.OCI_INDEX
                    if any(e.media_type == mt.OCI_MANIFEST for e in new_entries)
                    else top.media_type
                )
                idx = top.rebuilt(media_type=idx_type, manifests=tuple(new_entries))
            self.dest.put_manifest(idx.raw, idx.media_type, top=True, what=f"{self.dest.ref}")
            return self._result(idx.raw, idx.media_type)
        finally:
            self.cancel.set()  # releases reader threads of streams nobody consumed
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _result(self, raw: bytes, media_type: str) -> CopyResult:
        return CopyResult(
            sha256_digest(raw), media_type, raw, str(self.dest.ref), self.layers, self.instances
        )

    def _child(self, desc: Descriptor) -> Manifest | Index:
        what = f"{self.source.ref}: manifest {desc.digest}"
        return parse_manifest(self.source.child_manifest(desc, what), desc.media_type, what)

    def _copy_manifest(self, m: Manifest, label: str) -> Manifest:
        total = len(m.layers)
        t = self.transform
        wanted = [bool(t and t.wants(i, total, d)) for i, d in enumerate(m.layers)]
        out = m.to_oci() if (t is not None and t.requires_oci and any(wanted)) else m
        # Config first (never transformed), then the layers in parallel.
        part = f"config {m.config.digest}"
        self._copy_blob(m.config, f"{label}: {part}", f"{self.dest.ref}: {part}")
        futures: list[Future[LayerCopy]] = []
        for i, (src_desc, new_desc) in enumerate(zip(m.layers, out.layers, strict=True)):
            part = f"layer {i + 1}/{total} {src_desc.digest}"
            futures.append(
                self.pool.submit(
                    self._copy_layer,
                    i,
                    total,
                    src_desc,
                    new_desc,
                    wanted[i],
                    f"{label}: {part}",
                    f"{self.dest.ref}: {part}",
                )
            )
        results: list[LayerCopy] = []
        error: BaseException | None = None
        for f in futures:
            try:
                results.append(f.result())
            except Cancelled:
                pass
            except BaseException as e:
                if error is None:
                    error = e
                self.cancel.set()
        if error is not None:
            raise error
        self.layers.extend(results)
        new_layers = tuple(r.dest for r in results)
        if new_layers != out.layers:
            out = out.rebuilt(layers=new_layers)
        return out

    def _source_chunks(self, desc: Descriptor, what: str) -> Iterator[bytes]:
        it = self.source.open_blob(desc, what)
        task = None
        if self.progress is not None:
            kind = what.rsplit(": ", 1)[-1].rsplit(" ", 1)[0]  # "layer 2/3" or "config"
            task = self.progress.task(f"{kind} {desc.short}", desc.size)
        return prefetch(it, self.cancel, task)

    def _copy_blob(self, desc: Descriptor, what: str, dwhat: str) -> str:
        if self.dest.has_blob(desc, dwhat):
            return "skipped"
        if self.dest.try_mount(desc, self.source, dwhat):
            return "mounted"
        self.dest.write_blob(
            self._source_chunks(desc, what),  # verified by the source at its end
            expected_digest=desc.digest,
            expected_size=desc.size,
            what=dwhat,
            trusted=True,
        )
        return "copied"

    def _copy_layer(
        self,
        i: int,
        total: int,
        src_desc: Descriptor,
        new_desc: Descriptor,
        wanted: bool,
        what: str,
        dwhat: str,
    ) -> LayerCopy:
        if self.cancel.is_set():
            raise Cancelled
        if not wanted:
            return LayerCopy(src_desc, new_desc, self._copy_blob(src_desc, what, dwhat))
        assert self.transform is not None
        tl = self.transform.apply(i, total, new_desc, self._source_chunks(src_desc, what))
        digest, size = self.dest.write_blob(
            tl.chunks, expected_digest=None, expected_size=None, what=dwhat
        )
        return LayerCopy(src_desc, tl.descriptor(digest, size), "transformed")


__all__ = [
    "CopyOptions",
    "CopyResult",
    "LayerCopy",
    "LayerTransform",
    "TransformedLayer",
    "copy_image",
]
