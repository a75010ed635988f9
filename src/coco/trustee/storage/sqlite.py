"""SQLite storage: one file in WAL mode, shared by every worker process on the machine.

Writes to durable namespaces (resources, policies, reference values) are committed with
``synchronous=FULL``; session churn uses ``NORMAL`` (still safe against a process crash).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

from coco.trustee.storage.base import StorageError, Store, check_key

_VOLATILE = {"kbs_protocol_session"}
# Small, read-mostly namespaces whose reads are cached until any connection commits a change.
_CACHED = {"kbs", "attestation_service_policy", "reference_value", "trustee_keys"}
_MISS = object()


class SqliteStore(Store):
    def __init__(self, path: str):
        self.url = f"sqlite://{path}"
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise StorageError(f"sqlite storage {path}: directory {parent} does not exist")
        try:
            self._db = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=10
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS kv (ns TEXT NOT NULL, key TEXT NOT NULL, "
                "value BLOB NOT NULL, expires REAL, PRIMARY KEY (ns, key)) WITHOUT ROWID"
            )
        except sqlite3.Error as e:
            raise StorageError(f"sqlite storage {path}: cannot open: {e}") from None
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str | None], object] = {}
        self._version = -1

    def _run(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as e:
            raise StorageError(f"sqlite storage {self.url}: {e}") from None

    def _fresh(self) -> None:
        """Drop the read cache when another connection (another process) committed."""
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._version = version
            self._cache.clear()

    def get(self, ns: str, key: str) -> bytes | None:
        if ns in _CACHED:
            with self._lock:
                self._fresh()
                hit = self._cache.get((ns, key), _MISS)
                if hit is not _MISS:
                    return hit  # type: ignore[return-value]
                row = self._run(
                    "SELECT value FROM kv WHERE ns=? AND key=? AND expires IS NULL", (ns, key)
                ).fetchone()
                value = bytes(row[0]) if row else None
                self._cache[(ns, key)] = value
                return value
        with self._lock:
            row = self._run(
                "SELECT value FROM kv WHERE ns=? AND key=? AND (expires IS NULL OR expires>?)",
                (ns, key, time.time()),
            ).fetchone()
        return bytes(row[0]) if row else None

    def put(self, ns, key, value, *, overwrite=True, expires=None) -> bool:  # type: ignore[no-untyped-def]
        check_key(key)
        durable = ns not in _VOLATILE
        with self._lock:
            if ns in _CACHED:
                self._cache.clear()
            if durable:
                self._run("PRAGMA synchronous=FULL")
            try:
                if overwrite:
                    self._run(
                        "INSERT OR REPLACE INTO kv (ns, key, value, expires) VALUES (?,?,?,?)",
                        (ns, key, bytes(value), expires),
                    )
                    return True
                self._run("BEGIN IMMEDIATE")
                try:
                    row = self._run(
                        "SELECT 1 FROM kv WHERE ns=? AND key=? AND (expires IS NULL OR expires>?)",
                        (ns, key, time.time()),
                    ).fetchone()
                    if row:
                        return False
                    self._run(
                        "INSERT OR REPLACE INTO kv (ns, key, value, expires) VALUES (?,?,?,?)",
                        (ns, key, bytes(value), expires),
                    )
                finally:
                    self._run("COMMIT")
                return True
            finally:
                if durable:
                    self._run("PRAGMA synchronous=NORMAL")

    def delete(self, ns: str, key: str) -> bool:
        with self._lock:
            if ns in _CACHED:
                self._cache.clear()
            return self._run("DELETE FROM kv WHERE ns=? AND key=?", (ns, key)).rowcount > 0

    def keys(self, ns: str) -> list[str]:
        with self._lock:
            rows = self._run(
                "SELECT key FROM kv WHERE ns=? AND (expires IS NULL OR expires>?) ORDER BY key",
                (ns, time.time()),
            ).fetchall()
        return [r[0] for r in rows]

    def items(self, ns: str) -> dict[str, bytes]:
        if ns in _CACHED:
            with self._lock:
                self._fresh()
                hit = self._cache.get((ns, None), _MISS)
                if hit is not _MISS:
                    return dict(hit)  # type: ignore[call-overload]
                rows = self._run(
                    "SELECT key, value FROM kv WHERE ns=? AND expires IS NULL", (ns,)
                ).fetchall()
                value = {r[0]: bytes(r[1]) for r in rows}
                self._cache[(ns, None)] = value
                return dict(value)
        with self._lock:
            rows = self._run(
                "SELECT key, value FROM kv WHERE ns=? AND (expires IS NULL OR expires>?)",
                (ns, time.time()),
            ).fetchall()
        return {r[0]: bytes(r[1]) for r in rows}

    def sweep(self, ns: str) -> int:
        with self._lock:
            return self._run(
                "DELETE FROM kv WHERE ns=? AND expires IS NOT NULL AND expires<=?",
                (ns, time.time()),
            ).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
