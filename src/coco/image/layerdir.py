"""A layer directory while a layer is unpacked into it: directories walked through fds without
ever following a symlink, and the bookkeeping of what this layer created, whited out or left
implicit (what :mod:`coco.image.unpack` turns into the layer's overlay form and stats).

Every path is resolved component by component from directory file descriptors with
``O_NOFOLLOW | O_DIRECTORY`` (an LRU of them keeps deep trees cheap): a symlink planted by an
earlier entry is never followed, and a parent that is a symlink or a non-directory is refused.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict

from coco.errors import UnpackError

OPAQUE_XATTR = "trusted.overlay.opaque"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FD_CACHE = 64


class LayerDir:
    """The directory ``dest`` a layer is being unpacked into."""

    def __init__(self, dest: str) -> None:
        self.root_fd = os.open(dest, DIR_FLAGS)
        self.created: set[str] = set()  # paths this layer wrote (whiteouts of them are ignored)
        self.whiteouts: set[str] = set()
        self.nondir: set[str] = set()  # paths that held a non-directory at some point
        self.fresh: set[str] = set()  # implicit dirs that replaced a whiteout of this layer
        self.implicit: set[str] = {""}
        self.dir_meta: dict[str, tuple[int, int]] = {}  # path -> (mode, mtime), applied at the end
        self._fds: OrderedDict[tuple[str, ...], int] = OrderedDict()  # LRU of directory fds

    def close(self) -> None:
        self._drop_cache()
        os.close(self.root_fd)

    def _drop_cache(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _invalidate(self, path: str) -> None:
        """Forget cached fds at or below ``path`` (about to be removed)."""
        key = tuple(path.split("/")) if path else ()
        n = len(key)
        for k in [k for k in self._fds if k[:n] == key]:
            os.close(self._fds.pop(k))

    def parent_fd(self, parts: list[str], where: str, *, create: bool = True) -> int:
        """A borrowed fd of the directory ``parts`` (created as needed); never follows symlinks.

        The walk starts at the deepest cached ancestor; every step is an ``openat`` with
        ``O_NOFOLLOW | O_DIRECTORY`` from the previous directory's fd.
        """
        if not parts:
            return self.root_fd
        key = tuple(parts)
        fds = self._fds
        fd = fds.get(key)
        if fd is not None:
            fds.move_to_end(key)
            return fd
        start, fd = 0, self.root_fd
        for i in range(len(key) - 1, 0, -1):
            cached = fds.get(key[:i])
            if cached is not None:
                start, fd = i, cached
                break
        for i in range(start, len(key)):
            fd = self._open_dir(fd, key[i], "/".join(key[: i + 1]), where, create)
            fds[key[: i + 1]] = fd
        while len(fds) > _FD_CACHE:
            os.close(fds.popitem(last=False)[1])
        return fd

    def _open_dir(self, fd: int, name: str, path: str, where: str, create: bool) -> int:
        try:
            return os.open(name, DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR) or not create:
                raise
            if path not in self.whiteouts:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                raise UnpackError(
                    f"{where}: expected parent {path!r} to be a directory, found {kind}"
                ) from None
            # a directory under a path this layer whited out: it replaces the whiteout, opaque
            os.unlink(name, dir_fd=fd)
            self.whiteouts.discard(path)
            nfd = self._mkdir(fd, name, path)
            self._set_opaque(nfd)
            self.fresh.add(path)  # flattening removes the lower one, creates it only if needed
            return nfd
        return self._mkdir(fd, name, path)

    def _mkdir(self, fd: int, name: str, path: str) -> int:
        os.mkdir(name, 0o755, dir_fd=fd)
        nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
        os.fchmod(nfd, 0o755)
        self.implicit.add(path)
        self.created.add(path)
        return nfd

    def _set_opaque(self, fd: int) -> None:
        try:
            os.setxattr(fd, OPAQUE_XATTR, b"y")
        except OSError as e:
            raise UnpackError(
                f"layer: cannot mark an opaque directory ({OPAQUE_XATTR}): {e.strerror}; the "
                "layer store needs a filesystem with trusted xattrs and root"
            ) from None

    def _clear(self, dfd: int, name: str, path: str, *, keep_dir: bool) -> bool:
        """Remove what is at ``name``; keep a directory when asked. True if a dir remains.

        The directory started empty, so only a path this layer created or whited out can hold
        anything: others skip the ``stat`` (were that ever wrong, the ``O_EXCL`` create, ``mkdir``
        or ``symlink`` that follows fails: nothing is overwritten or followed)."""
        if path not in self.created and path not in self.whiteouts:
            return False
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self._invalidate(path)
            # forget what the tree held, in time proportional to it (not to the whole layer:
            # a layer replacing directories over and over must not go quadratic)
            gone = [path]
            for top, dirs, files, _ in os.fwalk(name, dir_fd=dfd):  # never follows symlinks
                rel = path + top[len(name) :]
                gone += [f"{rel}/{n}" for n in (*dirs, *files)]
            import shutil  # only when something is removed

            shutil.rmtree(name, dir_fd=dfd)
            for p in gone:
                self.created.discard(p)
                self.whiteouts.discard(p)
                self.implicit.discard(p)
                self.fresh.discard(p)
                self.dir_meta.pop(p, None)
        else:
            os.unlink(name, dir_fd=dfd)
        self.whiteouts.discard(path)
        return False

    def _open_parent_nocreate(self, parts: list[str], where: str) -> int:
        fd = self.root_fd
        for name in parts:
            try:
                nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError:
                if fd != self.root_fd:
                    os.close(fd)
                raise UnpackError(
                    f"{where}: expected the hardlink target's parents to be directories of this "
                    f"layer, found {'/'.join(parts)!r} is not"
                ) from None
            if fd != self.root_fd:
                os.close(fd)
            fd = nfd
        return fd
