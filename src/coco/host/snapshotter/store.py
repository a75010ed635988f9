"""Snapshots on disk with the semantics of containerd's overlayfs snapshotter, plus guest-pull ones.

Layout under the root: ``metadata.db`` (SQLite: one row per snapshot, written in transactions, so
a restart of the snapshotter or of containerd loses nothing) and ``snapshots/<id>/{fs,work}``.

* ``Prepare`` (active) / ``View`` (read-only) on a parent chain: no parent -> a bind mount of the
  snapshot's own ``fs``; a view of one parent -> a read-only bind of the parent's ``fs``; an active
  snapshot with parents -> ``overlay`` (``upperdir`` its ``fs``, ``lowerdir`` the parents' ``fs``
  nearest first, ``workdir``); a view of several parents -> ``overlay`` of lower dirs only.
* ``Commit`` turns an active snapshot into a committed one under a name, with its disk usage
  recorded; ``Remove`` refuses a snapshot with children; ``Cleanup`` removes directories no row
  names.
* A guest-pull snapshot (``guest_pull``) has an empty ``fs`` and is mounted as a bind of it alone:
  the image lives in the guest, never here. Made by :meth:`Store.skip`, inherited by children.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from coco.host.snapshotter import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SnapshotterError,
)

VIEW, ACTIVE, COMMITTED = 1, 2, 3
KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  key TEXT NOT NULL UNIQUE,
  parent TEXT NOT NULL DEFAULT '',
  kind INTEGER NOT NULL,
  created REAL NOT NULL,
  updated REAL NOT NULL,
  labels TEXT NOT NULL DEFAULT '{}',
  guest_pull INTEGER NOT NULL DEFAULT 0,
  size INTEGER NOT NULL DEFAULT 0,
  inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""


@dataclass
class Snapshot:
    id: int
    key: str  # the name of a committed snapshot, the key of an active one or a view
    parent: str
    kind: int
    created: float
    updated: float
    labels: dict[str, str] = field(default_factory=dict)
    guest_pull: bool = False
    size: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: list[str]


def disk_usage(path: Path) -> tuple[int, int]:
    """Bytes (allocated blocks) and inodes under ``path``, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for top, dirs, files in os.walk(path):
        for name in [top, *(os.path.join(top, n) for n in dirs + files)]:
            try:
                st = os.lstat(name)
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident not in seen:
                seen.add(ident)
                size += st.st_blocks * 512
    return size, len(seen)


def _overlay_index_off() -> bool:
    return Path("/sys/module/overlay/parameters/index").exists()


class Store:
    """The snapshots of one root directory; safe to call from several threads."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.dirs = self.root / "snapshots"
        self.dirs.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.root / "metadata.db", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._index_off = _overlay_index_off()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- rows ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @staticmethod
    def _row(row: tuple) -> Snapshot:
        return Snapshot(
            id=row[0], key=row[1], parent=row[2], kind=row[3], created=row[4], updated=row[5],
            labels=json.loads(row[6]), guest_pull=bool(row[7]), size=row[8], inodes=row[9],
        )  # fmt: skip

    _COLUMNS = "id, key, parent, kind, created, updated, labels, guest_pull, size, inodes"

    def _find(self, key: str) -> Snapshot | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._COLUMNS} FROM snapshots WHERE key = ?", (key,)
            ).fetchone()
        return self._row(row) if row else None

    def get(self, key: str) -> Snapshot:
        if not key:
            raise InvalidArgument("snapshot key: expected a non-empty key, found none")
        snap = self._find(key)
        if snap is None:
            raise NotFound(f"snapshot {key!r}: not found")
        return snap

    def all(self) -> list[Snapshot]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLUMNS} FROM snapshots ORDER BY id").fetchall()
        return [self._row(r) for r in rows]

    def fs(self, snap: Snapshot) -> Path:
        return self.dirs / str(snap.id) / "fs"

    def _parents(self, snap: Snapshot) -> list[Snapshot]:
        chain = []
        parent = snap.parent
        while parent:
            p = self.get(parent)
            chain.append(p)
            parent = p.parent
        return chain

    # -- containerd's calls ----------------------------------------------------------------------
    def create(self, kind: int, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        """Prepare (``ACTIVE``) or View (``VIEW``) ``key`` on ``parent``; its mounts."""
        if not key:
            raise InvalidArgument("prepare: expected a snapshot key, found an empty one")
        with self._tx() as db:
            if self._find(key) is not None:
                raise AlreadyExists(f"snapshot {key!r}: already exists")
            guest_pull = False
            if parent:
                p = self._find(parent)
                if p is None:
                    raise NotFound(f"snapshot {key!r}: parent {parent!r} not found")
                if p.kind != COMMITTED:
                    raise InvalidArgument(
                        f"snapshot {key!r}: parent {parent!r}: expected a committed snapshot, "
                        f"found an {KIND_NAMES[p.kind]} one"
                    )
                guest_pull = p.guest_pull
            now = time.time()
            cur = db.execute(
                "INSERT INTO snapshots (key, parent, kind, created, updated, labels, guest_pull) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, parent, kind, now, now, json.dumps(labels), int(guest_pull)),
            )
            sid = cur.lastrowid
            base = self.dirs / str(sid)
            shutil.rmtree(base, ignore_errors=True)  # a leftover of a crash before Cleanup
            (base / "fs").mkdir(parents=True, mode=0o755)
            if kind == ACTIVE and parent and not guest_pull:
                (base / "work").mkdir(mode=0o711)
        return self.mounts(key)

    def skip(self, name: str, parent: str, labels: dict[str, str]) -> bool:
        """The committed guest-pull snapshot ``name`` on ``parent`` (created when missing): True
        when it is there now, False when ``name`` is taken by another kind of snapshot."""
        with self._tx() as db:
            have = self._find(name)
            if have is not None:
                return have.guest_pull and have.parent == parent and have.kind == COMMITTED
            if parent:
                p = self._find(parent)
                if p is None:
                    raise NotFound(f"snapshot {name!r}: parent {parent!r} not found")
                if p.kind != COMMITTED:
                    raise InvalidArgument(
                        f"snapshot {name!r}: parent {parent!r}: expected a committed snapshot, "
                        f"found an {KIND_NAMES[p.kind]} one"
                    )
            now = time.time()
            cur = db.execute(
                "INSERT INTO snapshots (key, parent, kind, created, updated, labels, guest_pull) "
                "VALUES (?, ?, ?, ?, ?, ?, 1)",
                (name, parent, COMMITTED, now, now, json.dumps(labels)),
            )
            base = self.dirs / str(cur.lastrowid)
            shutil.rmtree(base, ignore_errors=True)
            (base / "fs").mkdir(parents=True, mode=0o755)
        return True

    def mounts(self, key: str) -> list[Mount]:
        snap = self.get(key)
        ro = snap.kind != ACTIVE
        bind = ["ro" if ro else "rw", "rbind"]
        if snap.guest_pull or not snap.parent:
            return [Mount("bind", str(self.fs(snap)), bind)]
        parents = self._parents(snap)
        if snap.kind == VIEW and len(parents) == 1:
            return [Mount("bind", str(self.fs(parents[0])), bind)]
        options = ["index=off"] if self._index_off else []
        lower = "lowerdir=" + ":".join(str(self.fs(p)) for p in parents)
        if snap.kind == ACTIVE:
            base = self.dirs / str(snap.id)
            options += [f"workdir={base / 'work'}", f"upperdir={base / 'fs'}", lower]
        else:
            options.append(lower)
        return [Mount("overlay", "overlay", options)]

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        if not name:
            raise InvalidArgument(f"commit of {key!r}: expected a name, found an empty one")
        snap = self.get(key)
        if snap.kind != ACTIVE:
            raise FailedPrecondition(
                f"commit of {key!r}: expected an active snapshot, found a {KIND_NAMES[snap.kind]} one"
            )
        size, inodes = disk_usage(self.fs(snap))
        with self._tx() as db:
            if self._find(name) is not None:
                raise AlreadyExists(f"commit of {key!r}: snapshot {name!r} already exists")
            if self._find(key) is None:
                raise NotFound(f"snapshot {key!r}: not found")
            db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, labels = ?, updated = ?, size = ?, "
                "inodes = ? WHERE id = ?",
                (name, COMMITTED, json.dumps(labels), time.time(), size, inodes, snap.id),
            )
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dirs / str(snap.id) / "work")

    def remove(self, key: str) -> None:
        with self._tx() as db:
            snap = self.get(key)
            child = db.execute("SELECT key FROM snapshots WHERE parent = ? LIMIT 1", (key,))
            row = child.fetchone()
            if row is not None:
                raise FailedPrecondition(
                    f"remove of {key!r}: expected a snapshot without children, found child "
                    f"{row[0]!r}"
                )
            db.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
        self._remove_dir(self.dirs / str(snap.id))

    def _remove_dir(self, path: Path) -> None:
        trash = self.root / "trash"
        trash.mkdir(exist_ok=True)
        gone = trash / f"{path.name}-{time.monotonic_ns()}"
        try:
            path.rename(gone)
        except FileNotFoundError:
            return
        except OSError:
            gone = path  # busy (a mount on it): Cleanup retries
        shutil.rmtree(gone, ignore_errors=True)

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        with self._tx() as db:
            snap = self.get(key)
            new = dict(snap.labels)
            if not paths:
                new = dict(labels)
            for p in paths:
                if p == "labels":
                    new = dict(labels)
                elif p.startswith("labels."):
                    k = p[len("labels.") :]
                    if k in labels:
                        new[k] = labels[k]
                    else:
                        new.pop(k, None)
                else:
                    raise InvalidArgument(
                        f"update of {key!r}: field {p!r}: expected labels or labels.<key> (the "
                        "other fields of a snapshot cannot change)"
                    )
            now = time.time()
            db.execute(
                "UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                (json.dumps(new), now, snap.id),
            )
        snap.labels, snap.updated = new, now
        return snap

    def usage(self, key: str) -> tuple[int, int]:
        snap = self.get(key)
        if snap.kind == ACTIVE:
            return disk_usage(self.fs(snap))
        return snap.size, snap.inodes

    def cleanup(self) -> list[str]:
        """Remove directories no snapshot names (left by a crash or a busy Remove)."""
        with self._lock:
            ids = {str(s.id) for s in self.all()}
        removed = []
        for entry in self.dirs.iterdir():
            if entry.name not in ids:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        trash = self.root / "trash"
        if trash.exists():
            for entry in trash.iterdir():
                shutil.rmtree(entry, ignore_errors=True)
        return removed


def check_root(root: Path) -> None:
    """Refuse a root that cannot hold overlay upper and work directories."""
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise SnapshotterError(
            f"--root {root}: cannot create the directory: {e.strerror}"
        ) from None
