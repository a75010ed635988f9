"""Flattening: the store's layer directories copied bottom to top into one rootfs directory.

Whiteouts recorded in each layer directory are applied exactly as umoci applies ``.wh.`` entries:
a whiteout removes the lower path, an opaque directory loses its lower contents, a directory that
only exists implicitly in a layer (no tar entry) keeps the lower directory's owner, mode and
mtime, and where a lower layer has a symlink in its place, the symlink is followed as if the
rootfs were ``/`` (``..`` stops at the rootfs), as umoci does for usr-merged images
(``bin -> usr/bin``). Every write into the rootfs goes through directory fds with ``O_NOFOLLOW``
(the symlink resolution above is done by hand, then walked that way), so nothing ever lands
outside. Used by :mod:`coco.image.bundle` for ``--flatten`` and when an overlay mount is refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from coco.errors import BundleError
from coco.image.layerdir import DIR_FLAGS, OPAQUE_XATTR
from coco.image.store import LayerInfo

_XATTR_NAMESPACES = ("user.", "security.")


def _remove_at(dfd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        import shutil  # only when something is removed

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
        lfd = os.open(self.layer.path, DIR_FLAGS)
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
        sfd = open_under(self.root_fd, first[0])
        try:
            os.link(first[1], name, src_dir_fd=sfd, dst_dir_fd=rfd, follow_symlinks=False)
        finally:
            os.close(sfd)

    def _follow(self, clfd: int, rel: str, real: str, create: bool) -> bool:
        """Apply layer dir ``clfd`` onto the rootfs directory at ``real`` (opened without
        following anything); False when that is not a directory."""
        try:
            crfd = open_under(self.root_fd, real, create=create)
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
        clfd = os.open(name, DIR_FLAGS, dir_fd=lfd)
        try:
            try:
                rst = os.stat(name, dir_fd=rfd, follow_symlinks=False)
            except FileNotFoundError:
                rst = None
            if implicit and rst is not None and stat.S_ISLNK(rst.st_mode):
                # no tar entry for this directory, a lower symlink in its place: follow it
                # inside the rootfs, as umoci does (``usr``-merged images: bin -> usr/bin)
                real = _join_in_root(self.root_fd, rdir, name)
                only_whiteouts = holds_only_whiteouts(
                    clfd, rel, self.layer.implicit_dirs
                )  # those never create directories
                if real is not None and self._follow(clfd, rel, real, not only_whiteouts):
                    return
                if only_whiteouts:
                    return
            keep = rst if rst is not None and stat.S_ISDIR(rst.st_mode) else None
            child = f"{rdir}/{name}" if rdir else name
            if keep is None:
                if implicit and holds_only_whiteouts(clfd, rel, self.layer.implicit_dirs):
                    return  # nothing to hide below, nothing to create (as umoci)
                if rst is not None:
                    self._remove(rfd, rdir, name)
                os.mkdir(name, 0o700, dir_fd=rfd)
                if implicit:
                    os.chmod(name, 0o755, dir_fd=rfd)
            crfd = os.open(name, DIR_FLAGS, dir_fd=rfd)
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


def open_under(root_fd: int, rel: str, *, create: bool = False) -> int:
    """A directory of the rootfs, walked without following symlinks (missing ones made)."""
    fd = os.dup(root_fd)
    try:
        for name in rel.split("/") if rel else []:
            try:
                nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, 0o755, dir_fd=fd)
                nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                os.fchmod(nfd, 0o755)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def holds_only_whiteouts(fd: int, rel: str, implicit: frozenset[str]) -> bool:
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
            cfd = os.open(e.name, DIR_FLAGS, dir_fd=fd)
            try:
                if not holds_only_whiteouts(cfd, child, implicit):
                    return False
            finally:
                os.close(cfd)
    return True


def flatten_layers(layers: Sequence[LayerInfo], rootfs: Path) -> None:
    """Copy ``layers`` (bottom first) onto the directory ``rootfs``, applying whiteouts."""
    root_fd = os.open(rootfs, DIR_FLAGS)
    try:
        for layer in layers:
            _Flattener(root_fd, layer).run()
    finally:
        os.close(root_fd)
