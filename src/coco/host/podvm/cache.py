"""The content-addressed cache of pod VM build stages.

Each stage (the Debian base root, the kernel, the Python dependencies, the finished image) is a
directory ``<kind>-<key>`` whose key hashes everything that went into it. A stage is built in a
``.tmp-*`` directory and renamed into place only when it is complete, so a failed or killed build
leaves nothing that looks finished; builds hold an exclusive lock on ``<cache>/.lock`` and remove
leftover ``.tmp-*`` directories they find under it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from coco.errors import PodVmError
from coco.files import cache_dir

ENV_CACHE = "COCO_PODVM_CACHE"
KEEP = 3  # finished stages of each kind kept besides the one in use


def default_cache_dir() -> Path:
    """``$COCO_PODVM_CACHE``, else ``/var/cache/coco/podvm`` for root, else the XDG cache."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    if os.geteuid() == 0:
        return Path("/var/cache/coco/podvm")
    return cache_dir("podvm")


def digest(parts: Iterable[str | bytes]) -> str:
    """A short stable key over ``parts`` (each length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:24]


def tree_digest(root: Path, files: Iterable[Path]) -> str:
    """A key over the relative names and contents of ``files`` under ``root``."""
    parts: list[str | bytes] = []
    for path in sorted(files):
        parts += [path.relative_to(root).as_posix(), path.read_bytes()]
    return digest(parts)


class Cache:
    """A cache directory of build stages; use :meth:`locked` around any change to it."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_cache_dir()).absolute()

    def path(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}"

    @contextlib.contextmanager
    def locked(self, waiting: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the cache's build lock; ``waiting`` is called once if another build holds it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise PodVmError(f"pod VM cache {self.root}: cannot use it: {e.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting is not None:
                    waiting()
                fcntl.flock(fd, fcntl.LOCK_EX)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def stage(self, kind: str, key: str) -> Iterator[Path]:
        """A fresh work directory that becomes ``<kind>-<key>`` if the block ends without error;
        on error it is removed. Call with the lock held."""
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{kind}-", dir=self.root))
        work.chmod(0o755)
        try:
            yield work
            work.rename(self.path(kind, key))
            os.utime(self.path(kind, key))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def prune(self, kind: str, keep: Path) -> None:
        """Remove all but the newest :data:`KEEP` finished stages of ``kind`` (never ``keep``)."""
        others = [p for p in self.root.glob(f"{kind}-*") if p != keep and p.is_dir()]
        others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in others[KEEP:]:
            shutil.rmtree(old, ignore_errors=True)

    def touch(self, path: Path) -> None:
        """Mark a stage as used now (pruning keeps the most recently used)."""
        with contextlib.suppress(OSError):
            os.utime(path)
