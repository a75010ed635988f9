"""Secure streaming untar of one decompressed OCI layer into a layer directory.

The layer directory is in the form overlayfs reads as a lower layer, so a bundle can mount the
store's layers directly, and :mod:`coco.image.bundle` can flatten them onto a copy:

- ``.wh.NAME`` becomes a character device 0:0 at ``NAME`` (an overlay whiteout). Whiteouts only
  hide lower layers: a whiteout of a file this same layer created is ignored, and one of a
  directory this layer created makes that directory opaque (its own entries stay, as umoci).
- ``.wh..wh..opq`` sets ``trusted.overlay.opaque=y`` on its directory.
- The layer directory holds the layer's final state, with the effects of a sequential untar onto
  the lower layers kept: a directory at a path where this layer earlier had a non-directory or a
  whiteout is opaque (the lower one was removed), and ``implicit_dirs`` / ``fresh_dirs`` in the
  stats tell parents that no entry described apart (see :mod:`coco.image.bundle`).

Hostile entries, and what happens to them (the guest is the attack surface):

- ``..`` components are clamped at the layer root and absolute names are taken relative to it,
  as umoci does (contained, not refused).
- Every write resolves its path component by component from directory file descriptors with
  ``O_NOFOLLOW``: a symlink planted by an earlier entry is never followed; an entry whose parent
  is a symlink or a non-directory is refused.
- Hardlinks must name an earlier non-directory entry of the same layer; a target that climbs
  above the root with ``..`` is refused.
- Character and block devices are refused unless ``UnpackLimits.unsafe_allow_devices`` (the guest has no
  business receiving device nodes from an image); a character device 0:0 is always refused since
  it means "whiteout" in the layer directory. FIFOs are created.
- setuid/setgid bits are stripped when not running as root (ownership cannot be kept anyway).
- Duplicate entries: the last one wins, as with tar and umoci (the earlier one is removed).
- Extended attributes from PAX ``SCHILY.xattr.*`` are applied only in the ``user.`` and
  ``security.`` namespaces; ``trusted.*`` (notably ``trusted.overlay.*``) is never taken from a tar.
- ``max_layer_size`` bounds the bytes read from the decompressed stream and ``max_files`` the number
  of entries, both enforced while streaming, before anything larger is written.

On any error the caller (:class:`coco.image.store.LayerStore`) removes the whole directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import stat
import tarfile
import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from coco.errors import CocoError, UnpackError
from coco.image.layerdir import DIR_FLAGS, OPAQUE_XATTR, LayerDir
from coco.image.limits import UnpackLimits

__all__ = ["OPAQUE_XATTR", "UnpackLimits", "UnpackStats", "unpack_layer"]

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_NAME = ".wh..wh..opq"

_CHUNK = 1 << 20
_WRITE_BUFFERS = 8  # files of at most _CHUNK bytes in flight to the writer thread
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_XATTR_NAMESPACES = ("user.", "security.")
# tar extension headers (PAX records, GNU long names, sparse maps) are read whole into memory:
# bound the bytes one entry's headers may take, and how many may chain before a real entry
_MAX_HEADER_BYTES = 1 << 20
_MAX_HEADER_CHAIN = 16
_MAX_SPARSE_EXTENTS = 1 << 16
_MAX_GLOBAL_RECORDS = 64  # PAX global records apply to every later entry: keep them few
_META_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


@dataclass
class UnpackStats:
    """What one layer held; ``implicit_dirs`` are parents no entry described ('' is the root);
    ``fresh_dirs`` those of them that replace a whiteout of the same layer (the lower directory
    is gone, the new one is root:0755)."""

    entries: int = 0
    bytes_read: int = 0
    file_bytes: int = 0  # regular files' declared sizes (sparse holes included)
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    others: int = 0
    diff_id: str = ""
    implicit_dirs: list[str] = field(default_factory=list)
    fresh_dirs: list[str] = field(default_factory=list)  # implicit, replacing a whiteout
    whiteout_dirs: list[str] = field(default_factory=list)  # directories holding whiteouts


class _Reader:
    """Counts (and optionally hashes) the decompressed stream; refuses past the size limit.

    It offers ``tell`` and a forward-only ``seek`` (skipping reads and hashes), which is all
    tarfile's ``r:`` mode needs on a sequential walk, so file data goes from the stream to disk
    without tarfile's stream-mode buffer juggling.
    """

    def __init__(self, raw: BinaryIO, limit: int, hasher: hashlib._Hash | None) -> None:
        self._raw = raw
        self._limit = limit
        self._hasher = hasher
        self.count = 0
        self.header_end = -1  # while parsing extension headers: offset they must stay below
        self._buf: memoryview | None = None  # copy_to's buffer, made at its first use

    def _account(self, data: bytes | memoryview) -> None:
        self.count += len(data)
        if self.count > self._limit:
            raise UnpackError(
                f"layer: decompressed size exceeds --max-layer-size: limit {self._limit} "
                f"bytes, read {self.count} so far"
            )
        if 0 <= self.header_end < self.count:
            raise _HeaderLimit(
                f"expected at most {_MAX_HEADER_BYTES} bytes of extension headers (PAX, GNU "
                f"long names, sparse maps) for one entry, found more at offset {self.count}"
            )
        if self._hasher is not None:
            self._hasher.update(data)

    def read(self, n: int | None = -1) -> bytes:
        data = self._raw.read(n if n is not None and n >= 0 else _CHUNK)
        if data:
            self._account(data)
        return data

    def copy_to(self, fd: int, size: int) -> None:
        """Write the next ``size`` bytes of the stream to ``fd``: read straight from the
        decompressor into one reused buffer (counted and hashed as :meth:`read` does), one copy
        instead of the two or three of ``tarfile.extractfile``. A short stream raises
        :class:`tarfile.ReadError` as tarfile does."""
        buf = self._buf
        if buf is None:
            buf = self._buf = memoryview(bytearray(_CHUNK))
        while size:
            view = self.fill(buf, min(size, _CHUNK))
            size -= len(view)
            while view:
                view = view[os.write(fd, view) :]

    def fill(self, buf: memoryview, size: int) -> memoryview:
        """The next ``size`` bytes of the stream (at most ``len(buf)``) read into ``buf``,
        counted and hashed as :meth:`read` does; a short stream raises tarfile.ReadError."""
        readinto = getattr(self._raw, "readinto", None)
        got = 0
        while got < size:
            want = buf[got:size]
            if readinto is not None:
                n = readinto(want)
            else:  # a source without readinto (never one of coco.oci.compression's)
                data = self._raw.read(len(want))
                n = len(data)
                want[:n] = data
            if not n:
                raise tarfile.ReadError("unexpected end of data")
            self._account(want[:n])
            got += n
        return buf[:size]

    def tell(self) -> int:
        return self.count

    def seekable(self) -> bool:  # forward only (see seek): what reading sparse members needs
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self.count:
            raise UnpackError(
                f"layer: the tar reader asked to go back to offset {pos} from {self.count}"
            )
        while self.count < pos:
            if not self.read(min(_CHUNK, pos - self.count)):
                break
        return self.count

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def _components(name: str, where: str, *, strict: bool = False) -> list[str]:
    """Clean path components; '..' is clamped at the root (refused when ``strict``)."""
    out: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                if strict:
                    raise UnpackError(f"{where}: expected a path inside the layer, found {name!r}")
                continue
            out.pop()
            continue
        out.append(part)
    return out


class _HeaderLimit(CocoError):
    """An entry's extension headers went past a bound (reported with the entry count)."""


class _GuardedInfo(tarfile.TarInfo):
    """TarInfo whose header parsing is bounded: tarfile reads a PAX record block, a GNU long
    name or a sparse map whole, and a chain of extension headers recursively."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        meta = self.type in _META_TYPES
        if not meta and self.type != tarfile.GNUTYPE_SPARSE:  # a plain member: nothing to bound
            return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]
        reader = tarfile_.fileobj
        assert isinstance(reader, _Reader)
        if meta and not 0 <= self.size <= _MAX_HEADER_BYTES:
            raise _HeaderLimit(
                f"expected an extension header of at most {_MAX_HEADER_BYTES} bytes, found "
                f"{self.size} at offset {reader.count - tarfile.BLOCKSIZE}"
            )
        depth = getattr(tarfile_, "_coco_depth", 0)
        if depth >= _MAX_HEADER_CHAIN:
            raise _HeaderLimit(
                f"expected at most {_MAX_HEADER_CHAIN} chained extension headers, found more "
                f"at offset {reader.count}"
            )
        outer = reader.header_end
        if outer < 0:
            reader.header_end = reader.count + _MAX_HEADER_BYTES
        tarfile_._coco_depth = depth + 1  # type: ignore[attr-defined]
        try:
            member = super()._proc_member(tarfile_)  # type: ignore[misc]
        finally:
            tarfile_._coco_depth = depth  # type: ignore[attr-defined]
            reader.header_end = outer
        if len(tarfile_.pax_headers) > _MAX_GLOBAL_RECORDS:
            raise _HeaderLimit(
                f"expected at most {_MAX_GLOBAL_RECORDS} PAX global header records, found "
                f"{len(tarfile_.pax_headers)}"
            )
        if member.sparse is not None and len(member.sparse) > _MAX_SPARSE_EXTENTS:
            raise _HeaderLimit(
                f"expected a sparse map of at most {_MAX_SPARSE_EXTENTS} extents, found "
                f"{len(member.sparse)}"
            )
        return member  # type: ignore[no-any-return]


class _Writer:
    """Writes small files' data, then their metadata, on a thread of its own, and closes them.

    The untar thread parses headers, reads (and hashes) each file's bytes into a buffer and
    hands the open descriptor over; this thread's ``write`` (the kernel's copy into the page
    cache) runs meanwhile on the other core. Everything is done through the descriptor the untar
    thread opened safely, so later entries (a whiteout, a replacement) cannot redirect it. Memory
    is bounded by the buffers (:data:`_WRITE_BUFFERS` of :data:`_CHUNK`). The first error is
    raised on the untar thread at its next hand-over or at :meth:`join`, naming its entry.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[int, memoryview, Any, str] | None] = queue.SimpleQueue()
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(_WRITE_BUFFERS):
            self._free.put(memoryview(bytearray(_CHUNK)))
        self._error: tuple[str, BaseException] | None = None
        self._thread = threading.Thread(target=self._run, name="coco-untar-write", daemon=True)
        self._thread.start()

    def buffer(self) -> memoryview:
        """A free buffer (waits while all are in flight)."""
        self.check()
        return self._free.get()

    def give_back(self, buf: memoryview) -> None:
        self._free.put(buf)

    def submit(self, fd: int, data: memoryview, buf: memoryview, finish: Any, where: str) -> None:
        """Write ``data`` (held in ``buf``, which comes back to the pool) to ``fd``, call
        ``finish(fd)``, close ``fd``."""
        self._jobs.put((fd, data, buf, finish, where))

    def check(self) -> None:
        if self._error is not None:
            where, e = self._error
            text = getattr(e, "strerror", None) or e
            raise UnpackError(f"{where}: cannot create file: {text}") from None

    def join(self) -> None:
        """Wait until everything handed over is written and closed (idempotent)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fd, data, buf, finish, where = job
            try:
                if self._error is None:
                    view = data
                    while view:
                        view = view[os.write(fd, view) :]
                    finish(fd)
            except BaseException as e:  # reported on the untar thread
                if self._error is None:
                    self._error = (where, e)
            finally:
                os.close(fd)
                self._free.put(buf)


class _Unpacker(LayerDir):
    """Applies the entries of one layer's tar, in order, onto its layer directory."""

    def __init__(self, dest: str, limits: UnpackLimits) -> None:
        super().__init__(dest)
        self.limits = limits
        self.is_root = os.geteuid() == 0
        # what root creates here is owned 0:0 until a setgid directory of another group hands
        # its group down: until then an entry owned 0:0 needs no chown
        top = os.fstat(self.root_fd)
        self.owner_is_root = (
            self.is_root
            and os.getegid() == 0
            and not (top.st_mode & stat.S_ISGID and top.st_gid != 0)
        )
        self.stats = UnpackStats()
        self.current: str | None = None  # the entry being written (for truncation errors)
        self.written = 0  # bytes of regular files, as declared (sparse holes included)
        self.writer = _Writer()

    # -- entries -----------------------------------------------------------------------------
    def entry(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        self.current = ti.name
        try:
            self._entry(tf, ti)
            self.current = None
        except (OSError, ValueError) as e:
            raise UnpackError(
                f"layer entry {self.stats.entries} {ti.name!r}: cannot create {_kind(ti)}: "
                f"{getattr(e, 'strerror', None) or e}"
            ) from None

    def _entry(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        st = self.stats
        st.entries += 1
        where = f"layer entry {st.entries} {ti.name!r}"
        if st.entries > self.limits.max_files:
            raise UnpackError(
                f"{where}: more entries than --max-files allows ({self.limits.max_files})"
            )
        parts = _components(ti.name, where)
        if len(parts) > self.limits.max_depth:
            raise UnpackError(
                f"{where}: expected at most {self.limits.max_depth} path components, "
                f"found {len(parts)}"
            )
        for what, ident in (("uid", ti.uid), ("gid", ti.gid)):
            if not 0 <= ident < 2**32 - 1:
                raise UnpackError(f"{where}: expected a {what} below 2^32-1, found {ident}")
        if ti.size < 0:
            raise UnpackError(f"{where}: expected a size of 0 or more, found {ti.size}")
        if "\0" in ti.name or "\0" in ti.linkname:
            what, text = ("name", ti.name) if "\0" in ti.name else ("link target", ti.linkname)
            raise UnpackError(f"{where}: expected a {what} without NUL bytes, found {text!r}")
        if ti.sparse is not None:
            _check_sparse(ti, where)
        if not parts:
            if not ti.isdir():
                raise UnpackError(f"{where}: the layer root must be a directory, found {_kind(ti)}")
            self._dir_meta(self.root_fd, "", ti)
            return
        base = parts[-1]
        path = "/".join(parts)
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, where)
            return
        if ti.isreg():
            # file sizes are summed apart from the stream: sparse files write more than they read
            self.written += ti.size
            if max(self.written, st.bytes_read + ti.size) > self.limits.max_layer_size:
                raise UnpackError(
                    f"{where}: a {ti.size}-byte file would take the layer past --max-layer-size "
                    f"({self.limits.max_layer_size} bytes)"
                )
        dfd = self.parent_fd(parts[:-1], where)
        self._write(tf, ti, dfd, base, path, where)
        self.created.add(path)
        if not ti.isdir():
            self.nondir.add(path)

    def _write(
        self, tf: tarfile.TarFile, ti: tarfile.TarInfo, dfd: int, base: str, path: str, where: str
    ) -> None:
        st = self.stats
        if ti.isdir():
            # this layer had a non-directory (or a whiteout) here: as in a sequential untar,
            # that removed the lower directory, so the new one hides the lower contents
            hides_lower = path in self.nondir
            if not self._clear(dfd, base, path, keep_dir=True):
                os.mkdir(base, 0o700, dir_fd=dfd)
            fd = os.open(base, DIR_FLAGS, dir_fd=dfd)
            try:
                if hides_lower:
                    self._set_opaque(fd)
                self._dir_meta(fd, path, ti)
            finally:
                os.close(fd)
            st.dirs += 1
            return
        if ti.islnk():
            self._hardlink(ti, dfd, base, path, where)
            return
        if ti.isreg():
            self._clear(dfd, base, path, keep_dir=False)
            if ti.sparse is None and ti.size <= _CHUNK:
                self._small_file(tf, ti, dfd, base, where)
                st.files += 1
                return
            fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=dfd)
            try:
                if ti.sparse is not None:
                    src = tf.extractfile(ti)
                    assert src is not None  # a regular file
                    _write_sparse(src, fd, ti)
                elif ti.size:
                    reader = tf.fileobj
                    assert isinstance(reader, _Reader) and reader.count == ti.offset_data
                    reader.copy_to(fd, ti.size)  # tarfile skips the padding at its next()
                if self._needs_chown(ti):
                    os.fchown(fd, ti.uid, ti.gid)
                os.fchmod(fd, self._mode(ti))
                self._xattrs(fd, ti)
                os.utime(fd, (_mtime(ti), _mtime(ti)))
            finally:
                os.close(fd)
            st.files += 1
            return
        if ti.issym():
            if not ti.linkname:
                raise UnpackError(f"{where}: expected a symlink target, found an empty one")
            self._clear(dfd, base, path, keep_dir=False)
            os.symlink(ti.linkname, base, dir_fd=dfd)
            if self._needs_chown(ti):
                os.chown(base, ti.uid, ti.gid, dir_fd=dfd, follow_symlinks=False)
            os.utime(base, (_mtime(ti), _mtime(ti)), dir_fd=dfd, follow_symlinks=False)
            st.symlinks += 1
            return
        if ti.isfifo() or ti.ischr() or ti.isblk():
            if not ti.isfifo():
                if ti.ischr() and ti.devmajor == 0 and ti.devminor == 0:
                    raise UnpackError(
                        f"{where}: character device 0:0 is refused (it means a whiteout here)"
                    )
                if not self.limits.unsafe_allow_devices:
                    raise UnpackError(
                        f"{where}: device nodes are refused ({_kind(ti)} "
                        f"{ti.devmajor}:{ti.devminor}); allow them with unsafe_allow_devices"
                    )
            self._clear(dfd, base, path, keep_dir=False)
            kind = stat.S_IFIFO if ti.isfifo() else stat.S_IFCHR if ti.ischr() else stat.S_IFBLK
            os.mknod(base, kind | 0o600, os.makedev(ti.devmajor, ti.devminor), dir_fd=dfd)
            if self.is_root:
                os.chown(base, ti.uid, ti.gid, dir_fd=dfd, follow_symlinks=False)
            os.chmod(base, self._mode(ti), dir_fd=dfd, follow_symlinks=False)
            os.utime(base, (_mtime(ti), _mtime(ti)), dir_fd=dfd, follow_symlinks=False)
            st.others += 1
            return
        raise UnpackError(f"{where}: unsupported tar entry type {ti.type!r}")

    def _small_file(
        self, tf: tarfile.TarFile, ti: tarfile.TarInfo, dfd: int, base: str, where: str
    ) -> None:
        """A file of at most one chunk: its bytes read here, written by the writer thread."""
        reader = tf.fileobj
        assert isinstance(reader, _Reader) and reader.count == ti.offset_data
        buf = self.writer.buffer()
        try:
            data = reader.fill(buf, ti.size)  # tarfile skips the padding at its next()
            fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=dfd)
        except BaseException:
            self.writer.give_back(buf)
            raise
        chown = self._needs_chown(ti)
        mode, mtime = self._mode(ti), _mtime(ti)

        def finish(fd: int) -> None:
            if chown:
                os.fchown(fd, ti.uid, ti.gid)
            os.fchmod(fd, mode)
            self._xattrs(fd, ti)
            os.utime(fd, (mtime, mtime))

        self.writer.submit(fd, data, buf, finish, where)

    def _hardlink(self, ti: tarfile.TarInfo, dfd: int, base: str, path: str, where: str) -> None:
        tparts = _components(ti.linkname, f"{where}: hardlink target", strict=True)
        tpath = "/".join(tparts)
        if not tparts or tpath == path:
            raise UnpackError(
                f"{where}: expected a hardlink to another file, found target {ti.linkname!r}"
            )
        if tpath in self.whiteouts or tpath not in self.created:
            raise UnpackError(
                f"{where}: expected a hardlink to an earlier file of this layer, found target "
                f"{ti.linkname!r} which this layer did not create"
            )
        tfd = -1
        try:
            tfd = self._open_parent_nocreate(tparts[:-1], where)
            tst = os.stat(tparts[-1], dir_fd=tfd, follow_symlinks=False)
            if stat.S_ISDIR(tst.st_mode):
                raise UnpackError(
                    f"{where}: expected a hardlink to a file, found directory {ti.linkname!r}"
                )
            # the target's parent fd must survive clearing ours: re-resolve ours afterwards
            self._clear(dfd, base, path, keep_dir=False)
            os.link(tparts[-1], base, src_dir_fd=tfd, dst_dir_fd=dfd, follow_symlinks=False)
        finally:
            if tfd >= 0 and tfd != self.root_fd:
                os.close(tfd)
        self.stats.hardlinks += 1

    def _whiteout(self, parts: list[str], where: str) -> None:
        base = parts[-1]
        dfd = self.parent_fd(parts[:-1], where)
        if base == OPAQUE_NAME:
            self._set_opaque(dfd)
            self.stats.opaque_dirs += 1
            return
        name = base[len(WHITEOUT_PREFIX) :]
        if name in ("", ".", "..") or "/" in name:
            raise UnpackError(
                f"{where}: expected a whiteout of a name in its directory, found {base!r}"
            )
        path = "/".join([*parts[:-1], name])
        self.stats.whiteouts += 1
        if path in self.whiteouts:
            return
        if path in self.created:
            # hides lower layers only: this layer's own entry stays (as umoci); a directory of
            # this layer keeps its own contents but loses the lower ones, i.e. becomes opaque
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(name, DIR_FLAGS, dir_fd=dfd)
                try:
                    self._set_opaque(fd)
                finally:
                    os.close(fd)
            return
        try:
            self._clear(dfd, name, path, keep_dir=False)
            os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dfd)
        except OSError as e:
            raise UnpackError(
                f"{where}: cannot record the whiteout as a 0:0 character device: {e.strerror}; "
                "the layer store needs root"
            ) from None
        self.whiteouts.add(path)
        self.nondir.add(path)

    # -- metadata ----------------------------------------------------------------------------
    def _mode(self, ti: tarfile.TarInfo) -> int:
        mode = ti.mode & 0o7777
        if not self.is_root:
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
        return mode

    def _needs_chown(self, ti: tarfile.TarInfo) -> bool:
        """Whether an entry root just created must be chowned to the tar's owner."""
        return self.is_root and (ti.uid != 0 or ti.gid != 0 or not self.owner_is_root)

    def _dir_meta(self, fd: int, path: str, ti: tarfile.TarInfo) -> None:
        if self.is_root:  # root writes into any mode: set it now; others wait for finish()
            mode = self._mode(ti)
            if mode & stat.S_ISGID and ti.gid != 0:  # its new entries get group ti.gid
                self.owner_is_root = False
            os.fchown(fd, ti.uid, ti.gid)  # a kept directory may have had another owner
            os.fchmod(fd, mode)
        self._xattrs(fd, ti)
        self.implicit.discard(path)
        self.dir_meta[path] = (self._mode(ti), _mtime(ti))

    def _xattrs(self, fd: int, ti: tarfile.TarInfo) -> None:
        for key, value in ti.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr.") :]
            if not name.startswith(_XATTR_NAMESPACES):
                log.debug("layer entry %r: xattr %r ignored", ti.name, name)
                continue
            raw = value.encode("utf-8", "surrogateescape")
            try:
                os.setxattr(fd, name, raw)
            except OSError as e:
                log.debug("layer entry %r: xattr %r not set: %s", ti.name, name, e)

    def finish(self) -> None:
        """Directory mtimes (and modes, when not root) last, once their contents stopped
        changing; deepest first. A directory a later entry replaced is skipped."""
        self.writer.join()
        self.writer.check()
        for path, (mode, mtime) in sorted(self.dir_meta.items(), key=lambda kv: -len(kv[0])):
            try:
                if path:
                    parent, _, name = path.rpartition("/")
                    pfd = self.parent_fd(parent.split("/") if parent else [], path, create=False)
                    fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
                else:
                    fd = os.dup(self.root_fd)
            except (OSError, UnpackError):
                continue
            try:
                if not self.is_root:
                    os.fchmod(fd, mode)
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
        self._drop_cache()
        self.stats.implicit_dirs = sorted(self.implicit)
        self.stats.fresh_dirs = sorted(self.fresh & self.implicit)
        self.stats.whiteout_dirs = sorted({p.rpartition("/")[0] for p in self.whiteouts})


def _write_sparse(src: BinaryIO, fd: int, ti: tarfile.TarInfo) -> None:
    """Write only the data extents of a sparse member (checked in order by _check_sparse):
    its holes stay holes, so a small layer cannot fill the store's disk with zeros."""
    for offset, length in ti.sparse or ():
        if not length:
            continue
        src.seek(offset)
        os.lseek(fd, offset, os.SEEK_SET)
        left = length
        while left:
            buf = src.read(min(_CHUNK, left))
            if not buf:
                break
            left -= len(buf)
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view) :]
    os.ftruncate(fd, ti.size)


def _check_sparse(ti: tarfile.TarInfo, where: str) -> None:
    """A sparse map must list extents in order, without overlap, inside the file's size
    (empty extents pad old GNU headers and mark a trailing hole: only their bounds matter)."""
    end = 0
    for offset, length in ti.sparse or ():
        if length == 0 and 0 <= offset <= ti.size:
            continue
        if offset < end or length < 0 or offset + length > ti.size:
            raise UnpackError(
                f"{where}: expected sparse extents in order within the {ti.size}-byte file, "
                f"found {length} bytes at offset {offset}"
            )
        end = offset + length


def _mtime(ti: tarfile.TarInfo) -> int:
    try:
        return max(0, min(int(ti.mtime), 2**63 // 10**9 - 1))
    except (TypeError, ValueError, OverflowError):
        return 0


def _kind(ti: tarfile.TarInfo) -> str:
    return {
        tarfile.REGTYPE: "file",
        tarfile.AREGTYPE: "file",
        tarfile.CONTTYPE: "file",
        tarfile.DIRTYPE: "directory",
        tarfile.SYMTYPE: "symlink",
        tarfile.LNKTYPE: "hardlink",
        tarfile.CHRTYPE: "character device",
        tarfile.BLKTYPE: "block device",
        tarfile.FIFOTYPE: "fifo",
    }.get(ti.type, f"type {ti.type!r}")


def _hasher(diff_id: str) -> hashlib._Hash:
    alg, _, hexpart = diff_id.partition(":")
    sizes = {"sha256": 64, "sha512": 128}
    if alg not in sizes or len(hexpart) != sizes[alg] or hexpart.strip("0123456789abcdef"):
        raise UnpackError(
            f"diff_id: expected sha256:<64 hex> or sha512:<128 hex>, found {diff_id!r}"
        )
    return hashlib.new(alg)


def _untar(up: _Unpacker, reader: _Reader) -> None:
    try:
        tf: tarfile.TarFile | None = None
        while True:
            try:
                if tf is None:  # opening parses the first header already
                    tf = tarfile.open(fileobj=reader, mode="r:", tarinfo=_GuardedInfo)  # type: ignore[arg-type]  # noqa: SIM115
                ti = tf.next()
            except _HeaderLimit as e:
                raise UnpackError(f"layer: after entry {up.stats.entries}: {e}") from None
            except ValueError as e:  # a number field tarfile parses without a check
                raise UnpackError(
                    f"layer: expected a valid tar header after entry {up.stats.entries}, found {e}"
                ) from None
            if ti is None:
                break
            up.stats.bytes_read = reader.count
            up.entry(tf, ti)
            tf.members.clear()  # stream mode: keep memory flat
    except (tarfile.TarError, EOFError) as e:
        if isinstance(e, EOFError) or "unexpected end of data" in str(e):
            n = up.stats.entries
            where = f"after entry {n}" if up.current is None else f"in entry {n} {up.current!r}"
            raise UnpackError(
                f"layer: expected a complete tar stream, found it truncated {where}"
            ) from None
        raise UnpackError(
            f"layer: expected a tar stream, found {e} after entry {up.stats.entries}"
        ) from None
    up.finish()


def unpack_layer(
    stream: BinaryIO,
    dest_dir: str | os.PathLike[str],
    *,
    limits: UnpackLimits | None = None,
    diff_id: str | None = None,
) -> UnpackStats:
    """Untar the decompressed layer ``stream`` into the empty directory ``dest_dir``.

    With ``diff_id``, the whole stream (trailing padding included) is hashed and must match it.
    On error an :class:`~coco.errors.UnpackError` is raised and ``dest_dir`` holds a partial tree
    the caller must remove (the layer store does).
    """
    limits = limits or UnpackLimits()
    hasher = _hasher(diff_id) if diff_id else None
    reader = _Reader(stream, limits.max_layer_size, hasher)
    dest = os.fspath(dest_dir)
    if os.listdir(dest):
        raise UnpackError(f"unpack: expected an empty directory, found files in {dest}")
    up = _Unpacker(dest, limits)
    try:
        _untar(up, reader)
    except UnpackError as e:
        msg = str(e)
        if diff_id and msg.startswith("layer") and not msg.startswith(f"layer {diff_id}"):
            raise UnpackError(f"layer {diff_id}{msg[len('layer') :]}") from None
        raise
    finally:
        up.writer.join()  # every descriptor closed before the caller may remove the tree
        up.close()
    if hasher is not None:
        reader.drain()
        got = f"{diff_id.partition(':')[0]}:{hasher.hexdigest()}"  # type: ignore[union-attr]
        if got != diff_id:
            raise UnpackError(f"layer {diff_id}: diff_id mismatch: expected {diff_id}, got {got}")
    up.stats.bytes_read = reader.count
    up.stats.file_bytes = up.written
    up.stats.diff_id = diff_id or ""
    return up.stats
