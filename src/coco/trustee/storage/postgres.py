"""PostgreSQL storage: one table shared by every KBS replica pointing at the same database.

Sessions, resources, policies and reference values all live here, so a client may authenticate
on one replica, attest on another and fetch from a third.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

from coco.errors import MissingExtraError

try:
    import psycopg
except ModuleNotFoundError:
    raise MissingExtraError("psycopg", "postgres", "PostgreSQL storage") from None

from coco.trustee.storage.base import StorageError, Store, check_key

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS coco_kv (ns TEXT NOT NULL, key TEXT NOT NULL, value BYTEA NOT NULL, "
    "expires DOUBLE PRECISION, PRIMARY KEY (ns, key))"
)


class PostgresStore(Store):
    def __init__(self, url: str):
        u = urlsplit(url)
        self.url = f"{u.scheme}://{u.hostname}:{u.port or 5432}{u.path}"  # no password in logs
        self._conninfo = url.replace("postgres://", "postgresql://", 1)
        self._lock = threading.Lock()
        self._conn = self._connect()
        try:
            with self._lock:
                # Concurrent replicas may race on CREATE TABLE: serialize with an advisory lock.
                self._conn.execute("SELECT pg_advisory_lock(7710431)")
                try:
                    self._conn.execute(_SCHEMA)
                finally:
                    self._conn.execute("SELECT pg_advisory_unlock(7710431)")
        except psycopg.Error as e:
            raise StorageError(f"postgres storage {self.url}: cannot create table: {e}") from None

    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            raise StorageError(f"postgres storage {self.url}: cannot connect: {e}") from None

    def _run(self, sql: str, args: tuple = ()) -> psycopg.Cursor:
        with self._lock:
            for attempt in (1, 2):
                try:
                    return self._conn.execute(sql, args, prepare=True)
                except psycopg.OperationalError as e:
                    if attempt == 2 or not self._conn.closed:
                        raise StorageError(f"postgres storage {self.url}: {e}") from None
                    self._conn = self._connect()
                except psycopg.Error as e:
                    raise StorageError(f"postgres storage {self.url}: {e}") from None
        raise AssertionError("unreachable")

    def get(self, ns: str, key: str) -> bytes | None:
        row = self._run(
            "SELECT value FROM coco_kv WHERE ns=%s AND key=%s AND (expires IS NULL OR expires>%s)",
            (ns, key, time.time()),
        ).fetchone()
        return bytes(row[0]) if row else None

    def put(self, ns, key, value, *, overwrite=True, expires=None) -> bool:  # type: ignore[no-untyped-def]
        check_key(key)
        if overwrite:
            self._run(
                "INSERT INTO coco_kv (ns, key, value, expires) VALUES (%s,%s,%s,%s) "
                "ON CONFLICT (ns, key) DO UPDATE SET value=EXCLUDED.value, expires=EXCLUDED.expires",
                (ns, key, bytes(value), expires),
            )
            return True
        cur = self._run(
            "INSERT INTO coco_kv (ns, key, value, expires) VALUES (%s,%s,%s,%s) "
            "ON CONFLICT (ns, key) DO UPDATE SET value=EXCLUDED.value, expires=EXCLUDED.expires "
            "WHERE coco_kv.expires IS NOT NULL AND coco_kv.expires <= %s",
            (ns, key, bytes(value), expires, time.time()),
        )
        return cur.rowcount > 0

    def delete(self, ns: str, key: str) -> bool:
        return self._run("DELETE FROM coco_kv WHERE ns=%s AND key=%s", (ns, key)).rowcount > 0

    def keys(self, ns: str) -> list[str]:
        rows = self._run(
            "SELECT key FROM coco_kv WHERE ns=%s AND (expires IS NULL OR expires>%s) ORDER BY key",
            (ns, time.time()),
        ).fetchall()
        return [r[0] for r in rows]

    def items(self, ns: str) -> dict[str, bytes]:
        rows = self._run(
            "SELECT key, value FROM coco_kv WHERE ns=%s AND (expires IS NULL OR expires>%s)",
            (ns, time.time()),
        ).fetchall()
        return {r[0]: bytes(r[1]) for r in rows}

    def sweep(self, ns: str) -> int:
        return self._run(
            "DELETE FROM coco_kv WHERE ns=%s AND expires IS NOT NULL AND expires<=%s",
            (ns, time.time()),
        ).rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()
