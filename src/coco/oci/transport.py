"""Image sources and destinations for the two transports, ``oci:`` layouts and ``docker://``
registries, behind one small interface used by :mod:`coco.oci.copy`.

A destination stages everything and makes it visible only in :meth:`ImageDestination.commit`:
a layout renames blobs into place and then rewrites ``index.json``; a registry receives blobs as
they come (unreferenced until a manifest points at them) and the tagged manifest last.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from coco.crypto.digest import sha256_digest
from coco.errors import DigestMismatchError, ManifestError, UsageError
from coco.oci.auth import Credentials, find_credentials
from coco.oci.models import Descriptor, Index, Manifest, parse_manifest
from coco.oci.reference import DockerReference, ImageReference, LayoutReference
from coco.record import record

TYPE_CHECKING = False  # typing stays unloaded in short processes
if TYPE_CHECKING:  # each transport's module loads only when it is used
    from coco.oci.registry import RegistryClient


@record
class Access:
    """How to reach a registry: credentials (flag > authfile > the default auth files, see
    :mod:`coco.oci.auth`), TLS verification with the registry's own CA (``cert_dir``, else
    ``/etc/containers/certs.d/HOST/``) and how often to retry a failed request (as skopeo's
    ``--retry-times``)."""

    credentials: Credentials | None = None
    authfile: Path | None = None
    tls_verify: bool = True
    cert_dir: Path | None = None
    retry_times: int = 0

    def client(self, ref: DockerReference) -> RegistryClient:
        from coco.oci.registry import RegistryClient

        creds = self.credentials or find_credentials(ref.registry, ref.repository, self.authfile)
        return RegistryClient(
            ref.registry,
            credentials=creds,
            tls_verify=self.tls_verify,
            cert_dir=self.cert_dir,
            retry_times=self.retry_times,
        )


class ImageSource:
    """Where an image is read from."""

    ref: ImageReference

    def top_manifest(self) -> tuple[bytes, str | None]:
        """The manifest or index the reference names, and its media type if the transport knows."""
        raise NotImplementedError

    def child_manifest(self, desc: Descriptor, what: str) -> bytes:
        raise NotImplementedError

    def open_blob(self, desc: Descriptor, what: str) -> Iterator[bytes]:
        """The blob in ~1 MiB chunks; raises DigestMismatchError at the end if it is corrupt."""
        raise NotImplementedError

    def tags(self) -> list[str]:
        """The repository's tags (none for a transport without repositories)."""
        return []

    def close(self) -> None:
        pass


class ImageDestination:
    """Where an image is written; nothing is visible before :meth:`commit`."""

    ref: ImageReference

    def has_blob(self, desc: Descriptor, what: str) -> bool:
        raise NotImplementedError

    def try_mount(self, desc: Descriptor, source: ImageSource, what: str) -> bool:
        return False

    def write_blob(
        self,
        chunks: Iterable[bytes],
        *,
        expected_digest: str | None,
        expected_size: int | None,
        what: str,
        trusted: bool = False,
    ) -> tuple[str, int]:
        """Stream ``chunks`` into a blob. ``trusted``: the chunks check themselves against
        ``expected_digest`` (a source HashingReader), so they need not be hashed again."""
        raise NotImplementedError

    def put_manifest(self, raw: bytes, media_type: str, *, top: bool, what: str) -> str:
        """Store a manifest; ``top``: the one the reference names (tagged at commit)."""
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


# --- oci: layouts ------------------------------------------------------------------------------


class LayoutSource(ImageSource):
    def __init__(self, ref: LayoutReference) -> None:
        self.ref = ref
        from coco.oci.layout import OciLayout

        self.layout = OciLayout.open(ref.path)

    def top_manifest(self) -> tuple[bytes, str | None]:
        desc = self.layout.resolve(self.ref.tag)
        raw = self.layout.read_blob(desc.digest, desc.size, f"{self.ref}: manifest {desc.digest}")
        return raw, desc.media_type

    def child_manifest(self, desc: Descriptor, what: str) -> bytes:
        return self.layout.read_blob(desc.digest, desc.size, what)

    def open_blob(self, desc: Descriptor, what: str) -> Iterator[bytes]:
        return self.layout.open_blob(desc.digest, desc.size, what)


class LayoutDestination(ImageDestination):
    def __init__(self, ref: LayoutReference) -> None:
        self.ref = ref
        path = Path(ref.path)
        self._existed = path.exists()
        # A missing or empty directory becomes a layout now; abort() puts it back as it was.
        self._fresh = not self._existed or (path.is_dir() and not any(path.iterdir()))
        from coco.oci.layout import LayoutTransaction, OciLayout

        self.layout = OciLayout.init(path)
        self._tx = LayoutTransaction(self.layout)
        self._top: Descriptor | None = None

    def has_blob(self, desc: Descriptor, what: str) -> bool:
        return self._tx.has_blob(desc.digest, desc.size)

    def write_blob(
        self,
        chunks: Iterable[bytes],
        *,
        expected_digest: str | None,
        expected_size: int | None,
        what: str,
        trusted: bool = False,
    ) -> tuple[str, int]:
        return self._tx.write_blob(
            chunks,
            expected_digest=expected_digest,
            expected_size=expected_size,
            what=what,
            trusted=trusted,
        )

    def put_manifest(self, raw: bytes, media_type: str, *, top: bool, what: str) -> str:
        digest = self._tx.put_bytes(raw, what=what)
        if top:
            self._top = Descriptor(media_type, digest, len(raw))
        return digest

    def commit(self) -> None:
        if self._top is not None:
            self._tx.set_tag(self.ref.tag, self._top)
        self._tx.commit()
        self._tx.discard()

    def abort(self) -> None:
        self._tx.discard()
        if self._fresh:
            import shutil  # only when something is removed

            shutil.rmtree(self.layout.path, ignore_errors=True)
            if self._existed:
                self.layout.path.mkdir()


# --- docker:// registries ----------------------------------------------------------------------


_MONOLITHIC_MAX = 1 << 20


class RegistrySource(ImageSource):
    def __init__(self, ref: DockerReference, access: Access) -> None:
        self.ref = ref
        self.client = access.client(ref)

    def top_manifest(self) -> tuple[bytes, str | None]:
        raw, ctype = self.client.get_manifest(
            self.ref.repository, self.ref.reference, str(self.ref)
        )
        return raw, ctype or None

    def child_manifest(self, desc: Descriptor, what: str) -> bytes:
        raw, _ = self.client.get_manifest(self.ref.repository, desc.digest, what)
        if len(raw) != desc.size:
            raise DigestMismatchError(
                f"{what}: size mismatch: expected {desc.size} bytes, received {len(raw)}"
            )
        return raw

    def open_blob(self, desc: Descriptor, what: str) -> Iterator[bytes]:
        return self.client.open_blob(self.ref.repository, desc.digest, desc.size, what)

    def tags(self) -> list[str]:
        return self.client.list_tags(self.ref.repository, str(self.ref))

    def close(self) -> None:
        self.client.close()


class RegistryDestination(ImageDestination):
    def __init__(self, ref: DockerReference, access: Access, patch_size: int | None = None) -> None:
        self.ref = ref
        self.client = access.client(ref)
        self._patch_size = patch_size
        self._top: tuple[bytes, str] | None = None

    @property
    def _repo(self) -> str:
        return self.ref.repository

    def has_blob(self, desc: Descriptor, what: str) -> bool:
        return self.client.blob_exists(self._repo, desc.digest, what, push=True)

    def try_mount(self, desc: Descriptor, source: ImageSource, what: str) -> bool:
        if (
            isinstance(source, RegistrySource)
            and source.ref.registry == self.ref.registry
            and source.ref.repository != self._repo
        ):
            return self.client.mount_blob(self._repo, desc.digest, source.ref.repository, what)
        return False

    def write_blob(
        self,
        chunks: Iterable[bytes],
        *,
        expected_digest: str | None,
        expected_size: int | None,
        what: str,
        trusted: bool = False,
    ) -> tuple[str, int]:
        if expected_digest and expected_size is not None and expected_size <= _MONOLITHIC_MAX:
            # Small blobs (configs, tiny layers): one monolithic PUT. Joining the chunks
            # exhausts them, so a source that fails its digest check raises here first.
            data = b"".join(chunks)
            if len(data) != expected_size or (
                not trusted and sha256_digest(data) != expected_digest
            ):
                raise DigestMismatchError(
                    f"{what}: expected {expected_size} bytes with digest {expected_digest}, "
                    f"got {len(data)} bytes with digest {sha256_digest(data)}"
                )
            self.client.upload_bytes(self._repo, data, what, expected_digest)
            return expected_digest, expected_size
        return self.client.upload_stream(
            self._repo,
            chunks,
            what,
            expected_digest=expected_digest,
            expected_size=expected_size,
            patch_size=self._patch_size,
            trusted=trusted,
        )

    def put_manifest(self, raw: bytes, media_type: str, *, top: bool, what: str) -> str:
        digest = sha256_digest(raw)
        if top:
            if self.ref.digest and self.ref.digest != digest:
                raise UsageError(
                    f"{self.ref}: the copied manifest has digest {digest}, not the one named"
                )
            self._top = (raw, media_type)
            return digest
        self.client.put_manifest(self._repo, digest, raw, media_type, what)
        return digest

    def commit(self) -> None:
        if self._top is not None:
            raw, media_type = self._top
            self.client.put_manifest(self._repo, self.ref.reference, raw, media_type, str(self.ref))

    def abort(self) -> None:
        self._top = None

    def close(self) -> None:
        self.client.close()


def resolve_platform(
    source: ImageSource,
    top: Manifest | Index,
    where: str,
    *,
    os: str | None = None,
    arch: str | None = None,
    variant: str | None = None,
) -> tuple[Manifest, Descriptor | None]:
    """The image manifest of ``top`` for one platform (default: linux on this host's arch, as
    skopeo picks it): ``top`` itself, or the index entry's manifest and that entry."""
    if isinstance(top, Manifest):
        return top, None
    chosen = top.select(os, arch, variant, where=where)
    what = f"{where}: manifest {chosen.digest}"
    m = parse_manifest(source.child_manifest(chosen, what), chosen.media_type, what)
    if not isinstance(m, Manifest):
        raise ManifestError(
            f"{where}: expected an image manifest for {chosen.platform}, found a nested index"
        )
    return m, chosen


def platform_manifest(
    source: ImageSource,
    where: str,
    *,
    os: str | None = None,
    arch: str | None = None,
    variant: str | None = None,
) -> Manifest:
    """The image manifest the source's reference names for one platform (see
    :func:`resolve_platform`)."""
    raw, media_type = source.top_manifest()
    top = parse_manifest(raw, media_type, f"{where}: manifest")
    return resolve_platform(source, top, where, os=os, arch=arch, variant=variant)[0]


def open_source(ref: ImageReference, access: Access) -> ImageSource:
    if isinstance(ref, LayoutReference):
        return LayoutSource(ref)
    return RegistrySource(ref, access)


def open_destination(
    ref: ImageReference, access: Access, patch_size: int | None = None
) -> ImageDestination:
    if isinstance(ref, LayoutReference):
        return LayoutDestination(ref)
    return RegistryDestination(ref, access, patch_size)
