"""LocalFs storage: resources as plain files, in upstream's layout, so files put there are served.

A resource ``<repository>/<type>/<tag>`` is the file ``<dir_path>/<repository>/<type>/<tag>`` (the
layout of upstream's LocalFs repository: an operator provisions a key by copying a file, or by
mounting a Kubernetes Secret whose entries are symbolic links). Writes through the admin API land
there too, atomically (a hidden temporary file renamed into place). Every other namespace
(policies, reference values, the token-signing key, sessions) lives in the SQLite file
``<dir_path>/.coco-kbs.sqlite``: its leading dot keeps it apart from every repository name, which
may not start with one.
"""

from __future__ import annotations

import os
import tempfile

from coco.protocol.resource_uri import SEGMENT
from coco.trustee.storage.base import StorageError, Store, check_key
from coco.trustee.storage.sqlite import SqliteStore

DB_NAME = ".coco-kbs.sqlite"


class LocalFsStore(Store):
    """Files for the namespace ``files_ns`` (resources) under ``dir_path``; SQLite for the rest."""

    def __init__(self, dir_path: str, files_ns: str) -> None:
        self.root = os.path.abspath(dir_path)
        self.url = f"localfs://{self.root}"
        if not os.path.isdir(self.root):
            raise StorageError(f"localfs storage {self.root}: expected a directory, found none")
        self.files_ns = files_ns
        self._db = SqliteStore(os.path.join(self.root, DB_NAME))

    def _path(self, key: str) -> str:
        check_key(key)
        parts = key.split("/")
        if not all(SEGMENT.fullmatch(p) for p in parts):
            raise StorageError(
                f"localfs storage key {key!r}: expected segments of [A-Za-z0-9-_.], "
                "none empty or starting with '.'"
            )
        return os.path.join(self.root, *parts)

    def get(self, ns: str, key: str) -> bytes | None:
        if ns != self.files_ns:
            return self._db.get(ns, key)
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as e:
            raise StorageError(f"localfs storage {path}: cannot read it: {e.strerror}") from None

    def put(self, ns, key, value, *, overwrite=True, expires=None) -> bool:  # type: ignore[no-untyped-def]
        if ns != self.files_ns:
            return self._db.put(ns, key, value, overwrite=overwrite, expires=expires)
        path = self._path(key)
        if not overwrite and os.path.isfile(path):
            return False
        folder = os.path.dirname(path)
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(bytes(value))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            raise StorageError(f"localfs storage {path}: cannot write it: {e.strerror}") from None
        return True

    def delete(self, ns: str, key: str) -> bool:
        if ns != self.files_ns:
            return self._db.delete(ns, key)
        try:
            os.unlink(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            raise StorageError(f"localfs storage {key}: cannot delete it: {e.strerror}") from None
        return True

    def keys(self, ns: str) -> list[str]:
        if ns != self.files_ns:
            return self._db.keys(ns)
        out = []
        for folder, dirs, files in os.walk(self.root, followlinks=True):
            rel = os.path.relpath(folder, self.root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            dirs[:] = [d for d in dirs if SEGMENT.fullmatch(d)] if depth < 2 else []
            if depth == 2:
                out.extend(f"{rel}/{n}".replace(os.sep, "/") for n in files if SEGMENT.fullmatch(n))
        return sorted(out)

    def sweep(self, ns: str) -> int:
        return 0 if ns == self.files_ns else self._db.sweep(ns)

    def ready(self) -> None:
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise StorageError(f"localfs storage {self.root}: not readable")
        self._db.ready()

    def close(self) -> None:
        self._db.close()
