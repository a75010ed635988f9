"""Bundles: a rootfs assembled from the layer store, and the OCI runtime ``config.json``.

``create_bundle`` mounts an overlay of the store's layer directories (top layer first) when the
kernel allows it, with the writable upper and work dirs inside the bundle; with ``flatten=True``
(or when the mount is refused) it copies the layers bottom to top into ``rootfs/``, applying the
whiteouts recorded in each layer directory exactly as umoci applies ``.wh.`` entries: a whiteout
removes the lower path, an opaque directory loses its lower contents, a directory that only
exists implicitly in a layer (no tar entry) keeps the lower directory's owner, mode and mtime,
and where a lower layer has a symlink in its place, the symlink is followed as if the rootfs
were ``/`` (``..`` stops at the rootfs), as umoci does for usr-merged images (``bin -> usr/bin``).
Every write into the rootfs goes through directory fds with ``O_NOFOLLOW`` (the symlink
resolution above is done by hand, then walked that way), so nothing ever lands outside.

In overlay mode the kernel shows the topmost copy of a directory; after mounting, an implicit
directory is given the metadata of the lower explicit one through the merged view (a metadata
copy-up), a directory that only ever held whiteouts is removed, and directories holding
whiteouts are copied up so that their listing never shows the whiteouts. Residual differences
of overlay mode, for layers no image builder writes: an implicit directory over a lower
non-directory hides it instead of following or keeping it. In both modes, the mtime of a
directory in which an implicit parent was created is not bumped to "now" as umoci leaves it.

Layer directories are read-only lowers of every overlay bundle: the store is shared on disk,
and a container's writes land in its bundle's ``overlay/upper``.

A failure removes the bundle directory (unmounting first) and its registration; nothing partial
is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coco.errors import BundleError
from coco.image.store import LayerInfo, LayerStore
from coco.image.unpack import OPAQUE_XATTR

__all__ = ["Bundle", "create_bundle", "remove_bundle", "runtime_config"]

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_XATTR_NAMESPACES = ("user.", "security.")
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Bundle:
    """An assembled bundle: ``path/config.json`` and ``path/rootfs``."""

    path: Path
    mode: str  # "overlay" or "flatten"
    diff_ids: tuple[str, ...]

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"


# -- mounting ----------------------------------------------------------------------------------
_libc = ctypes.CDLL(
    None, use_errno=True
)  # libc, already loaded: no find_library (it runs ldconfig)


def _mount_overlay(lowers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    for p in [*lowers, upper, work]:
        if any(c in str(p) for c in ",:\\"):
            raise OSError(errno.EINVAL, f"overlay cannot name the path {p}")
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    if len(opts) >= 4000:
        raise OSError(errno.E2BIG, "too many layers for one overlay option string")
    rc = _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, opts.encode())
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _umount(target: Path) -> None:
    if _libc.umount2(os.fsencode(target), 2) != 0:  # MNT_DETACH
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOENT):
            raise OSError(e, f"umount {target}: {os.strerror(e)}")


def _is_mount(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.path.ismount(path)
    return False


# -- flattening --------------------------------------------------------------------------------
def _remove_at(dfd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def _copy_xattrs(src: int, dst: int) -> None:
    try:
        names = os.listxattr(src)
    except OSError:
        return
    for n in names:
        if n.startswith(_XATTR_NAMESPACES):
            with contextlib.suppress(OSError):
                os.setxattr(dst, n, os.getxattr(src, n))


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class _Flattener:
    def __init__(self, root_fd: int, layer: LayerInfo) -> None:
        self.root_fd = root_fd
        self.layer = layer
        self.links: dict[int, tuple[str, str]] = {}  # layer inode -> (dir, name) of 1st copy
        self.firsts: dict[str, int] = {}  # rootfs path of a first copy -> layer inode
        self.is_root = os.geteuid() == 0

    def run(self) -> None:
        lfd = os.open(self.layer.path, _DIR_FLAGS)
        try:
            explicit = "" not in self.layer.implicit_dirs
            if explicit:
                self._meta_dir(lfd, self.root_fd)
            before = os.fstat(self.root_fd)
            self._dir(lfd, self.root_fd, "", "")
            _set_mtime(self.root_fd, os.fstat(lfd) if explicit else before)
        finally:
            os.close(lfd)

    def _meta_dir(self, lfd: int, rfd: int) -> None:
        st = os.fstat(lfd)
        if self.is_root:
            os.fchown(rfd, st.st_uid, st.st_gid)
        os.fchmod(rfd, stat.S_IMODE(st.st_mode))
        _copy_xattrs(lfd, rfd)

    def _dir(self, lfd: int, rfd: int, rel: str, rdir: str) -> None:
        """Apply layer dir ``rel`` (fd ``lfd``) onto the rootfs dir at ``rdir`` (fd ``rfd``)."""
        with contextlib.suppress(OSError):
            if os.getxattr(lfd, OPAQUE_XATTR) == b"y":
                for name in os.listdir(rfd):
                    self._remove(rfd, rdir, name)
        with os.scandir(lfd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            self._entry(lfd, rfd, e.name, f"{rel}/{e.name}" if rel else e.name, rdir)

    def _entry(self, lfd: int, rfd: int, name: str, rel: str, rdir: str) -> None:
        try:
            self._apply(lfd, rfd, name, rel, rdir)
        except OSError as e:  # the innermost entry names itself; outer ones pass it on
            raise BundleError(
                f"flatten: layer {self.layer.diff_id} entry {rel!r}: expected to apply it onto "
                f"the rootfs at {(f'{rdir}/{name}' if rdir else name)!r}, found "
                f"{e.strerror or e}"
            ) from None

    def _apply(self, lfd: int, rfd: int, name: str, rel: str, rdir: str) -> None:
        st = os.stat(name, dir_fd=lfd, follow_symlinks=False)
        if _is_whiteout(st):
            self._remove(rfd, rdir, name)
            return
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            self._subdir(lfd, rfd, name, rel, rdir)
            return
        self._remove(rfd, rdir, name)
        if stat.S_ISREG(mode):
            first = self.links.get(st.st_ino) if st.st_nlink > 1 else None
            if first is not None:
                self._link(first, rfd, name)
                return
            self._copy_file(lfd, rfd, name, st)
            if st.st_nlink > 1:
                self.links[st.st_ino] = (rdir, name)
                self.firsts[f"{rdir}/{name}" if rdir else name] = st.st_ino
            return
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=lfd), name, dir_fd=rfd)
        else:
            os.mknod(name, (mode & ~0o7777) | 0o600, st.st_rdev, dir_fd=rfd)
            os.chmod(name, stat.S_IMODE(mode), dir_fd=rfd, follow_symlinks=False)
        if self.is_root:
            os.chown(name, st.st_uid, st.st_gid, dir_fd=rfd, follow_symlinks=False)
        os.utime(name, ns=(st.st_mtime_ns, st.st_mtime_ns), dir_fd=rfd, follow_symlinks=False)

    def _remove(self, rfd: int, rdir: str, name: str) -> None:
        """Remove a rootfs entry, forgetting the first copies of hardlinks it held: another
        entry of the layer, applied through a lower symlink, may replace one before its links
        are made (they then get a copy of their own, with the layer's content)."""
        if not self.firsts:
            _remove_at(rfd, name)
            return
        path = f"{rdir}/{name}" if rdir else name
        gone = [path]
        try:
            st = os.stat(name, dir_fd=rfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):  # (fwalk opens its top: only ever a directory)
            for top, _, files, _ in os.fwalk(name, dir_fd=rfd):  # never follows symlinks
                rel = path + top[len(name) :]
                gone += [f"{rel}/{n}" for n in files]
        _remove_at(rfd, name)
        for p in gone:
            ino = self.firsts.pop(p, None)
            if ino is not None:
                self.links.pop(ino, None)

    def _link(self, first: tuple[str, str], rfd: int, name: str) -> None:
        """Hardlink to the first copy, reaching its directory without following symlinks."""
        sfd = _open_under(self.root_fd, first[0])
        try:
            os.link(first[1], name, src_dir_fd=sfd, dst_dir_fd=rfd, follow_symlinks=False)
        finally:
            os.close(sfd)

    def _follow(self, clfd: int, rel: str, real: str, create: bool) -> bool:
        """Apply layer dir ``clfd`` onto the rootfs directory at ``real`` (opened without
        following anything); False when that is not a directory."""
        try:
            crfd = _open_under(self.root_fd, real, create=create)
        except OSError:
            return False
        try:
            keep = os.fstat(crfd)
            self._dir(clfd, crfd, rel, real)
            _set_mtime(crfd, keep)
            return True
        finally:
            os.close(crfd)

    def _copy_file(self, lfd: int, rfd: int, name: str, st: os.stat_result) -> None:
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=lfd)
        try:
            dst = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=rfd,
            )
            try:
                if st.st_blocks * 512 < st.st_size:  # sparse: copy the data, keep the holes
                    _copy_sparse(src, dst, st.st_size)
                else:
                    _copy_range(src, dst, st.st_size)
                if self.is_root:
                    os.fchown(dst, st.st_uid, st.st_gid)
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
                _copy_xattrs(src, dst)
                os.utime(dst, ns=(st.st_mtime_ns, st.st_mtime_ns))
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _subdir(self, lfd: int, rfd: int, name: str, rel: str, rdir: str) -> None:
        implicit = rel in self.layer.implicit_dirs
        if rel in self.layer.fresh_dirs:  # this layer whited the lower one out first
            self._remove(rfd, rdir, name)
        clfd = os.open(name, _DIR_FLAGS, dir_fd=lfd)
        try:
            try:
                rst = os.stat(name, dir_fd=rfd, follow_symlinks=False)
            except FileNotFoundError:
                rst = None
            if implicit and rst is not None and stat.S_ISLNK(rst.st_mode):
                # no tar entry for this directory, a lower symlink in its place: follow it
                # inside the rootfs, as umoci does (``usr``-merged images: bin -> usr/bin)
                real = _join_in_root(self.root_fd, rdir, name)
                only_whiteouts = _only_whiteouts(
                    clfd, rel, self.layer.implicit_dirs
                )  # those never create directories
                if real is not None and self._follow(clfd, rel, real, not only_whiteouts):
                    return
                if only_whiteouts:
                    return
            keep = rst if rst is not None and stat.S_ISDIR(rst.st_mode) else None
            child = f"{rdir}/{name}" if rdir else name
            if keep is None:
                if implicit and _only_whiteouts(clfd, rel, self.layer.implicit_dirs):
                    return  # nothing to hide below, nothing to create (as umoci)
                if rst is not None:
                    self._remove(rfd, rdir, name)
                os.mkdir(name, 0o700, dir_fd=rfd)
                if implicit:
                    os.chmod(name, 0o755, dir_fd=rfd)
            crfd = os.open(name, _DIR_FLAGS, dir_fd=rfd)
            try:
                if not implicit:
                    self._meta_dir(clfd, crfd)
                self._dir(clfd, crfd, rel, child)
                # an explicit directory takes the layer's mtime; an implicit one keeps the
                # lower directory's (as umoci), whatever changed inside it
                if not implicit:
                    _set_mtime(crfd, os.fstat(clfd))
                elif keep is not None:
                    _set_mtime(crfd, keep)
            finally:
                os.close(crfd)
        finally:
            os.close(clfd)


def _copy_range(src: int, dst: int, left: int) -> None:
    while left > 0:
        n = os.copy_file_range(src, dst, min(left, 1 << 30))
        if n == 0:
            break
        left -= n


def _copy_sparse(src: int, dst: int, size: int) -> None:
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        os.lseek(src, start, os.SEEK_SET)
        os.lseek(dst, start, os.SEEK_SET)
        _copy_range(src, dst, end - start)
        pos = end
    os.ftruncate(dst, size)


def _join_in_root(root_fd: int, parent: str, name: str) -> str | None:
    """Where ``parent/name`` leads inside the rootfs, symlinks resolved as if the rootfs were
    ``/`` (``..`` stops at it); what does not exist yet is taken as written; None when the
    walk meets a non-directory or too many symlinks."""
    done = parent.split("/") if parent else []
    todo = [name]
    hops = 0
    while todo:
        c = todo.pop()
        if c in ("", "."):
            continue
        if c == "..":
            if done:
                done.pop()
            continue
        cur = "/".join([*done, c])
        try:
            st = os.stat(cur, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:  # the rest does not exist yet: it is created (as umoci)
            done.append(c)
            for c in reversed(todo):
                if c == "..":
                    if done:
                        done.pop()
                elif c not in ("", "."):
                    done.append(c)
            return "/".join(done)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(cur, dir_fd=root_fd)
            if target.startswith("/"):
                done = []
            todo.extend(reversed(target.split("/")))
            continue
        done.append(c)
    return "/".join(done)


def _set_mtime(fd: int, st: os.stat_result) -> None:
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _open_under(root_fd: int, rel: str, *, create: bool = False) -> int:
    """A directory of the rootfs, walked without following symlinks (missing ones made)."""
    fd = os.dup(root_fd)
    try:
        for name in rel.split("/") if rel else []:
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, 0o755, dir_fd=fd)
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.fchmod(nfd, 0o755)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _only_whiteouts(fd: int, rel: str, implicit: frozenset[str]) -> bool:
    """True when layer dir ``rel`` holds nothing but whiteouts and implicit directories of
    whiteouts: applying it creates nothing."""
    with os.scandir(fd) as it:
        for e in it:
            st = e.stat(follow_symlinks=False)
            if _is_whiteout(st):
                continue
            child = f"{rel}/{e.name}" if rel else e.name
            if not stat.S_ISDIR(st.st_mode) or child not in implicit:
                return False
            cfd = os.open(e.name, _DIR_FLAGS, dir_fd=fd)
            try:
                if not _only_whiteouts(cfd, child, implicit):
                    return False
            finally:
                os.close(cfd)
    return True


def flatten_layers(layers: Sequence[LayerInfo], rootfs: Path) -> None:
    """Copy ``layers`` (bottom first) onto the directory ``rootfs``, applying whiteouts."""
    root_fd = os.open(rootfs, _DIR_FLAGS)
    try:
        for layer in layers:
            _Flattener(root_fd, layer).run()
    finally:
        os.close(root_fd)


# -- bundles -----------------------------------------------------------------------------------
def create_bundle(
    store: LayerStore,
    diff_ids: Sequence[str],
    bundle_dir: str | os.PathLike[str],
    *,
    image_config: Mapping[str, Any] | None = None,
    flatten: bool = False,
    args: Sequence[str] | None = None,
) -> Bundle:
    """Assemble ``bundle_dir`` (which must not exist) from layers already in ``store``."""
    path = Path(bundle_dir).absolute()
    where = f"bundle {path}"
    if not diff_ids:
        raise BundleError(f"{where}: expected at least one layer, found none")
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        raise BundleError(f"{where}: expected a new directory, found one already there") from None
    except OSError as e:
        raise BundleError(f"{where}: cannot create: {e.strerror}") from None
    mode = "flatten"
    try:
        with store.session():
            layers = [store.get(d) for d in diff_ids]
            store.register_bundle(path, diff_ids)
            rootfs = path / "rootfs"
            rootfs.mkdir(mode=0o755)
            os.chmod(rootfs, 0o755)
            if not flatten:
                upper, work = path / "overlay" / "upper", path / "overlay" / "work"
                upper.mkdir(parents=True)
                work.mkdir()
                _root_meta(layers, upper)
                try:
                    # an empty bottom layer: overlay trusts the bottom-most lower to hold no
                    # whiteouts and would list them; no store layer is ever bottom-most
                    _mount_overlay(_visible_lowers(layers), upper, work, rootfs)
                    mode = "overlay"
                except OSError as e:
                    log.info("%s: overlay mount refused (%s); flattening instead", where, e)
                    shutil.rmtree(path / "overlay")
            if mode == "flatten":
                flatten_layers(layers, rootfs)
            else:
                _fix_implicit_dirs(layers, rootfs)
                _merge_whiteout_dirs(layers, rootfs)
            config = runtime_config(image_config or {}, rootfs=rootfs, args=args)
            (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    except BaseException as e:
        _teardown(store, path)
        if isinstance(e, OSError):
            raise BundleError(f"{where}: {e.strerror or e}") from None
        if isinstance(e, RecursionError):
            raise BundleError(f"{where}: expected a shallower tree, found it too deep") from None
        raise
    return Bundle(path, mode, tuple(diff_ids))


def _visible_lowers(layers: Sequence[LayerInfo]) -> list[Path]:
    """Overlay lowerdirs, top first; overlay ignores an opaque layer root, so the layers
    below one (``.wh..wh..opq`` at the top level) are left out instead."""
    out: list[Path] = []
    for layer in reversed(layers):
        out.append(layer.path)
        with contextlib.suppress(OSError):
            if os.getxattr(layer.path, OPAQUE_XATTR) == b"y":
                break
    return out


def _lstat_under(root: Path, rel: str) -> os.stat_result | None:
    """lstat of ``rel`` inside a layer directory, parents walked without following."""
    parent, _, name = rel.rpartition("/")
    try:
        fd = _open_under_path(root, parent)
    except OSError:
        return None
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(fd)


def _open_under_path(root: Path, rel: str) -> int:
    rfd = os.open(root, _DIR_FLAGS)
    try:
        return _open_under(rfd, rel)
    finally:
        os.close(rfd)


def _fix_implicit_dirs(layers: Sequence[LayerInfo], rootfs: Path) -> None:
    """Make the overlay view of implicit directories what a sequential untar gives.

    overlay shows the topmost layer's copy of a directory; when that copy is implicit (no tar
    entry), umoci shows the lower explicit directory's owner, mode and mtime instead, and shows
    nothing at all for a directory that only ever held whiteouts. Both are fixed through the
    merged view (a metadata copy-up, or an rmdir that the kernel records as a whiteout). Only
    the layers the merged directory is made of count: a later layer that deletes the directory,
    or replaces it or a parent with a file or a symlink, or makes a parent opaque, hides them.
    """
    paths = sorted({p for ly in layers for p in ly.implicit_dirs if p}, key=lambda p: -len(p))
    stacks: dict[str, list[tuple[LayerInfo, os.stat_result, bool]]] = {}
    for p in paths:
        found = [(ly, st) for ly, st, _ in _merged_dir(layers, p, stacks)]
        if not found or p not in found[0][0].implicit_dirs:
            continue
        source: os.stat_result | None = None
        for layer, st in found:
            if p not in layer.implicit_dirs:
                source = st
                break
            if p in layer.fresh_dirs:  # this layer whited out what was below
                break
        parent, _, name = p.rpartition("/")
        try:
            if source is None:
                if all(p in ly.implicit_dirs and _only_whiteouts_at(ly, p) for ly, _ in found):
                    pfd = _open_under_path(rootfs, parent)
                    try:
                        with contextlib.suppress(OSError):
                            os.rmdir(name, dir_fd=pfd)
                    finally:
                        os.close(pfd)
                continue
            fd = _open_under_path(rootfs, p)
        except OSError as e:  # not a directory of the merged view after all: nothing to fix
            log.debug("overlay: implicit directory %r not reachable: %s", p, e)
            continue
        try:
            os.fchown(fd, source.st_uid, source.st_gid)
            os.fchmod(fd, stat.S_IMODE(source.st_mode))
            os.utime(fd, ns=(source.st_atime_ns, source.st_mtime_ns))
        finally:
            os.close(fd)


def _merged_dir(
    layers: Sequence[LayerInfo],
    rel: str,
    memo: dict[str, list[tuple[LayerInfo, os.stat_result, bool]]],
) -> list[tuple[LayerInfo, os.stat_result, bool]]:
    """The layers (top first) whose directory ``rel`` the overlay merges, with its lstat and
    whether it is opaque; empty when ``rel`` is no directory of the merged view. Lookups walk
    down from the root as overlay does: a non-directory (a whiteout included) ends the stack,
    and only an opaque parent stops the layers below it (an opaque ``rel`` keeps them: they
    still say what the directory itself was)."""
    if rel in memo:
        return memo[rel]
    if rel:
        parent = rel.rpartition("/")[0]
        above = _merged_dir(layers, parent, memo)
        lower: list[LayerInfo] = []
        for ly, _, opaque in above:
            lower.append(ly)
            if opaque:
                break
    else:
        lower = list(reversed(layers))
    out: list[tuple[LayerInfo, os.stat_result, bool]] = []
    for layer in lower:
        st, opaque = _dir_under(layer.path, rel)
        if st is None:
            continue
        if not stat.S_ISDIR(st.st_mode):
            break
        out.append((layer, st, opaque))
        if not rel and opaque:  # overlay ignores an opaque root: see _visible_lowers
            break
    memo[rel] = out if out and stat.S_ISDIR(out[0][1].st_mode) else []
    return memo[rel]


def _dir_under(root: Path, rel: str) -> tuple[os.stat_result | None, bool]:
    """lstat of ``rel`` inside a layer directory (parents walked without following), and
    whether it is an opaque directory."""
    st = _lstat_under(root, rel) if rel else os.lstat(root)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return st, False
    try:
        fd = _open_under_path(root, rel)
    except OSError:
        return st, False
    try:
        return st, os.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return st, False
    finally:
        os.close(fd)


def _merge_whiteout_dirs(layers: Sequence[LayerInfo], rootfs: Path) -> None:
    """overlay reads a directory that only one layer has straight from that layer, whiteouts
    included (it trusts them to be absent); a metadata copy-up makes such a directory a merged
    one, whose listing hides them. Real images whiteout inside directories lower layers have,
    so this touches nothing there."""
    for p in sorted({d for ly in layers for d in ly.whiteout_dirs if d}):
        try:
            fd = _open_under_path(rootfs, p)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)


def _only_whiteouts_at(layer: LayerInfo, rel: str) -> bool:
    try:
        fd = _open_under_path(layer.path, rel)
    except OSError:
        return False
    try:
        return _only_whiteouts(fd, rel, layer.implicit_dirs)
    finally:
        os.close(fd)


def _root_meta(layers: Sequence[LayerInfo], upper: Path) -> None:
    """The overlay root shows the upper dir: give it the last explicit root entry's metadata."""
    os.chmod(upper, 0o755)
    for layer in reversed(layers):
        if "" not in layer.implicit_dirs:
            st = os.stat(layer.path)
            os.chown(upper, st.st_uid, st.st_gid)
            os.chmod(upper, stat.S_IMODE(st.st_mode))
            os.utime(upper, ns=(st.st_mtime_ns, st.st_mtime_ns))
            return


def _teardown(store: LayerStore, path: Path) -> None:
    rootfs = path / "rootfs"
    if _is_mount(rootfs):
        _umount(rootfs)
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(Exception):
        store.unregister_bundle(path)


def remove_bundle(store: LayerStore, bundle_dir: str | os.PathLike[str]) -> None:
    """Unmount and delete a bundle and forget it in the store (its layers become prunable)."""
    path = Path(bundle_dir).absolute()
    try:
        if _is_mount(path / "rootfs"):
            _umount(path / "rootfs")
    except OSError as e:
        raise BundleError(f"bundle {path}: {e}") from None
    shutil.rmtree(path, ignore_errors=True)
    store.unregister_bundle(path)


# -- runtime config ----------------------------------------------------------------------------
def _read_in_rootfs(rootfs: Path, rel: str, limit: int = 1 << 20) -> str | None:
    """A small file of the rootfs, never following a symlink (images are untrusted)."""
    fd = os.open(rootfs, _DIR_FLAGS)
    try:
        parts = rel.split("/")
        for name in parts[:-1]:
            nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        # only a regular file is opened: a FIFO would block the pull, a device node could act
        if not stat.S_ISREG(os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode):
            return None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        ffd = os.open(parts[-1], flags, dir_fd=fd)
        with os.fdopen(ffd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _table(text: str | None) -> list[list[str]]:
    return [ln.split(":") for ln in (text or "").splitlines() if ln and not ln.startswith("#")]


def _resolve_user(user: str, rootfs: Path | None) -> dict[str, Any]:
    """``uid``, ``uid:gid``, ``name``, ``name:group`` (names from the rootfs's /etc files)."""
    if not user:
        return {"uid": 0, "gid": 0}
    name, _, group = user.partition(":")
    passwd = _table(_read_in_rootfs(rootfs, "etc/passwd")) if rootfs else []
    groups = _table(_read_in_rootfs(rootfs, "etc/group")) if rootfs else []
    uid: int | None = None
    gid: int | None = None
    username = None
    if name.isdigit():
        uid = int(name)
        for row in passwd:
            if len(row) >= 4 and row[2] == name:
                username, gid = row[0], int(row[3]) if row[3].isdigit() else None
                break
    else:
        for row in passwd:
            if len(row) >= 4 and row[0] == name and row[2].isdigit():
                username, uid = name, int(row[2])
                gid = int(row[3]) if row[3].isdigit() else None
                break
        if uid is None:
            raise BundleError(
                f"image config User {user!r}: expected user {name!r} in the rootfs /etc/passwd, "
                "found none"
            )
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            for row in groups:
                if len(row) >= 3 and row[0] == group and row[2].isdigit():
                    gid = int(row[2])
                    break
            else:
                raise BundleError(
                    f"image config User {user!r}: expected group {group!r} in the rootfs "
                    "/etc/group, found none"
                )
    out: dict[str, Any] = {"uid": uid, "gid": gid if gid is not None else 0}
    if username and not group:
        extra = sorted(
            {
                int(row[2])
                for row in groups
                if len(row) >= 4 and row[2].isdigit() and username in row[3].split(",")
            }
            - {out["gid"]}
        )
        if extra:
            out["additionalGids"] = extra
    return out


def runtime_config(
    image_config: Mapping[str, Any],
    *,
    rootfs: Path | None = None,
    args: Sequence[str] | None = None,
    hostname: str = "coco",
) -> dict[str, Any]:
    """An OCI runtime spec (as ``runc spec`` makes, no terminal) filled from an image config
    (the whole config blob or just its ``config`` object)."""
    cfg = image_config.get("config", image_config) if "rootfs" in image_config else image_config
    cfg = cfg or {}
    if not isinstance(cfg, Mapping):
        raise BundleError(f"image config: expected an object for 'config', found {cfg!r}")
    for key in ("Entrypoint", "Cmd", "Env"):
        v = cfg.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(a, str) for a in v)):
            raise BundleError(f"image config {key}: expected a list of strings, found {v!r}")
    if not isinstance(cfg.get("Labels") or {}, Mapping):
        raise BundleError(f"image config Labels: expected an object, found {cfg['Labels']!r}")
    argv = list(args) if args else [*(cfg.get("Entrypoint") or []), *(cfg.get("Cmd") or [])]
    if not argv:
        raise BundleError("image config: expected Entrypoint and/or Cmd, found neither")
    env = list(cfg.get("Env") or [])
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, DEFAULT_PATH)
    cwd = cfg.get("WorkingDir") or "/"
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise BundleError(f"image config WorkingDir: expected an absolute path, found {cwd!r}")
    user = _resolve_user(str(cfg.get("User") or ""), rootfs)
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    labels = cfg.get("Labels") or {}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": user,
            "args": argv,
            "env": env,
            "cwd": cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
        ],
        "annotations": {str(k): str(v) for k, v in dict(labels).items()},
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [
                {"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")
            ],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }
