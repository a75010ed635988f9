"""OCI image layouts on disk: read manifests, configs and blobs by tag; write them atomically.

Writing goes through a :class:`LayoutTransaction`: blobs are streamed into a private staging
directory inside the layout (same file system), hashed on the way, fsynced and checked against
their expected digest and size. Only :meth:`LayoutTransaction.commit` renames them into
``blobs/<alg>/<hex>`` and then replaces ``index.json`` (temp file + rename), so a failure at any
point leaves the layout exactly as it was: no half-written blob, no tag moved.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from coco.crypto.digest import Digest, HashingReader
from coco.errors import ManifestError, OciError
from coco.files import atomic_write, fsync_dir
from coco.oci import mediatypes as mt
from coco.oci.models import Descriptor, ImageConfig, Index, Manifest, go_json, parse_manifest

REF_NAME = "org.opencontainers.image.ref.name"
CHUNK = 1 << 20
_LAYOUT_FILE = b'{"imageLayoutVersion":"1.0.0"}'
_STAGING_PREFIX = ".coco-staging-"


class OciLayout:
    """An OCI image layout directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"OciLayout({str(self.path)!r})"

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> OciLayout:
        """Open an existing layout; raise :class:`OciError` if ``path`` is not one."""
        lay = cls(path)
        marker = lay.path / "oci-layout"
        try:
            obj = json.loads(marker.read_bytes())
        except FileNotFoundError:
            raise OciError(f"oci:{path}: not an OCI layout (no oci-layout file)") from None
        except (OSError, ValueError, RecursionError) as e:
            raise OciError(f"oci:{path}: unreadable oci-layout file: {e}") from None
        if not isinstance(obj, dict) or obj.get("imageLayoutVersion") != "1.0.0":
            raise OciError(f"oci:{path}: oci-layout: expected imageLayoutVersion '1.0.0'")
        return lay

    @classmethod
    def init(cls, path: str | os.PathLike[str]) -> OciLayout:
        """Open the layout at ``path``, creating an empty one if the directory is missing or empty."""
        p = Path(path)
        if (p / "oci-layout").exists():
            return cls.open(p)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise OciError(f"oci:{path}: exists and is not an OCI layout")
        p.mkdir(parents=True, exist_ok=True)
        (p / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        atomic_write(p / "oci-layout", _LAYOUT_FILE)
        atomic_write(p / "index.json", b'{"schemaVersion":2,"manifests":[]}')
        return cls(p)

    # --- reading -------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        d = Digest.parse(digest)
        return self.path / "blobs" / d.algorithm / d.hex

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def open_blob(
        self, digest: str, size: int | None = None, what: str | None = None
    ) -> Iterator[bytes]:
        """Stream a blob in 1 MiB chunks; raises DigestMismatchError at the end if it is corrupt."""
        what = what or f"oci:{self.path}: blob {digest}"
        path = self.blob_path(digest)
        try:
            f = path.open("rb", buffering=0)
        except FileNotFoundError:
            raise OciError(f"{what}: missing from the layout ({path})") from None
        return iter(
            HashingReader(_file_chunks(f), what=what, expected_digest=digest, expected_size=size)
        )

    def read_blob(self, digest: str, size: int | None = None, what: str | None = None) -> bytes:
        return b"".join(self.open_blob(digest, size, what))

    def index(self) -> Index:
        where = f"oci:{self.path}: index.json"
        try:
            raw = (self.path / "index.json").read_bytes()
        except FileNotFoundError:
            raise OciError(f"{where}: missing") from None
        parsed = parse_manifest(raw, mt.OCI_INDEX, where)
        if not isinstance(parsed, Index):
            raise ManifestError(f"{where}: expected an image index")
        return parsed

    def tags(self) -> list[str]:
        return [
            d.annotations[REF_NAME] for d in self.index().manifests if REF_NAME in d.annotations
        ]

    def resolve(self, tag: str | None = None) -> Descriptor:
        """The index.json entry named ``tag`` (or the only entry when ``tag`` is None)."""
        entries = self.index().manifests
        if tag is None:
            if len(entries) == 1:
                return entries[0]
            raise OciError(
                f"oci:{self.path}: {len(entries)} images in the layout, name one with oci:PATH:TAG"
            )
        for d in entries:
            if d.annotations.get(REF_NAME) == tag:
                return d
        raise OciError(f"oci:{self.path}:{tag}: no such tag in index.json")

    def read_manifest(self, ref: str | Descriptor | None = None) -> Manifest | Index:
        """The manifest or index named by a tag or a descriptor, digest-checked."""
        desc = ref if isinstance(ref, Descriptor) else self.resolve(ref)
        where = f"oci:{self.path}: manifest {desc.digest}"
        raw = self.read_blob(desc.digest, desc.size, where)
        return parse_manifest(raw, desc.media_type, where)

    def image(
        self, tag: str | None = None, *, os: str | None = None, arch: str | None = None
    ) -> tuple[Manifest, ImageConfig]:
        """Manifest and config of an image (for an index: the platform entry)."""
        m = self.read_manifest(tag)
        while isinstance(m, Index):
            m = self.read_manifest(m.select(os, arch, where=f"oci:{self.path}:{tag or ''}"))
        where = f"oci:{self.path}: config {m.config.digest}"
        cfg = ImageConfig.parse(self.read_blob(m.config.digest, m.config.size, where), where)
        return m, cfg

    # --- writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[LayoutTransaction]:
        """Stage writes; commit on success, discard everything on an exception."""
        tx = LayoutTransaction(self)
        try:
            yield tx
            tx.commit()
        finally:
            tx.discard()

    def put_blob(self, data: bytes) -> str:
        """Write one blob (convenience; atomic); return its digest."""
        with self.transaction() as tx:
            digest, _ = tx.write_blob([data])
        return digest

    def tag(self, name: str, desc: Descriptor) -> None:
        with self.transaction() as tx:
            tx.set_tag(name, desc)


class LayoutTransaction:
    """Blobs and tags staged for one layout; see :meth:`OciLayout.transaction`."""

    def __init__(self, layout: OciLayout) -> None:
        self.layout = layout
        self._staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=layout.path))
        self._blobs: dict[str, Path] = {}
        self._tags: list[tuple[str | None, Descriptor]] = []
        self._lock = threading.Lock()
        self._done = False

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        return digest in self._blobs or self.layout.has_blob(digest, size)

    def write_blob(
        self,
        chunks: Iterable[bytes],
        *,
        expected_digest: str | None = None,
        expected_size: int | None = None,
        what: str = "blob",
        trusted: bool = False,
    ) -> tuple[str, int]:
        """Stream ``chunks`` into a staged blob; return its digest and size.

        ``trusted``: ``chunks`` verify themselves against ``expected_digest`` (they raise at their
        end otherwise), so they are not hashed a second time.

        Raises :class:`DigestMismatchError` (and stages nothing) if the content does not match
        ``expected_digest``/``expected_size``; any exception raised by ``chunks`` propagates.
        """
        fd, tmp = tempfile.mkstemp(dir=self._staging, prefix="blob-")
        reader = HashingReader(
            chunks,
            what=what,
            expected_digest=expected_digest,
            expected_size=expected_size,
            trusted=trusted,
        )
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                written = started = 0
                for chunk in reader:
                    f.write(chunk)
                    written += len(chunk)
                    if written - started >= _WRITEBACK:  # start writeback now: a short fsync
                        _start_writeback(fd, started, written - started)
                        started = written
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        assert reader.digest is not None
        with self._lock:
            if reader.digest in self._blobs:
                os.unlink(tmp)
            else:
                self._blobs[reader.digest] = Path(tmp)
        return reader.digest, reader.size

    def put_bytes(self, data: bytes, expected_digest: str | None = None, what: str = "blob") -> str:
        digest, _ = self.write_blob(
            [data], expected_digest=expected_digest, expected_size=None, what=what
        )
        return digest

    def set_tag(self, tag: str | None, desc: Descriptor) -> None:
        """Point ``tag`` at ``desc`` at commit (``None``: add an untagged entry)."""
        if tag is not None and not tag:
            raise OciError(f"oci:{self.layout.path}: empty tag")
        self._tags.append((tag, desc))

    def commit(self) -> None:
        lay = self.layout
        dirs = set()
        for digest, tmp in self._blobs.items():
            dst = lay.blob_path(digest)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():
                tmp.unlink()
            else:
                os.replace(tmp, dst)
                dirs.add(dst.parent)
        for d in dirs:
            fsync_dir(d)
        if self._tags:
            with _locked(lay.path / "oci-layout"):
                for _tag, desc in self._tags:
                    if not lay.has_blob(desc.digest, desc.size):
                        raise OciError(
                            f"oci:{lay.path}: refusing to tag {desc.digest}: blob not in the layout"
                        )
                index = lay.index()
                entries = list(index.manifests)
                for tag, desc in self._tags:
                    if tag is not None:
                        entries = [e for e in entries if e.annotations.get(REF_NAME) != tag]
                        ann = {**desc.annotations, REF_NAME: tag}
                    else:
                        ann = dict(desc.annotations)
                    entries.append(desc.with_(annotations=ann))
                doc: dict[str, object] = {"schemaVersion": 2}
                if "mediaType" in json.loads(index.raw):
                    doc["mediaType"] = mt.OCI_INDEX
                doc["manifests"] = [e.to_json() for e in entries]
                if index.annotations:
                    doc["annotations"] = dict(index.annotations)
                atomic_write(lay.path / "index.json", go_json(doc))
        self._done = True

    def discard(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)
        self._blobs.clear()


def _file_chunks(f: object) -> Iterator[bytes]:
    with f:  # type: ignore[attr-defined]
        while True:
            b = f.read(CHUNK)  # type: ignore[attr-defined]
            if not b:
                return
            yield b


_WRITEBACK = 16 << 20


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing ``length`` bytes from ``offset`` back (Linux starts the
    writeback of dirty pages on POSIX_FADV_DONTNEED), so the final fsync has little left."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
