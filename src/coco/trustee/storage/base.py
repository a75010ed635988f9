"""The storage contract, the key rule, and an in-memory store (tests, throwaway servers).

The backends import this module; :func:`coco.trustee.storage.open_store` picks one by URL.
"""

from __future__ import annotations

import re
import threading
import time
from abc import ABC, abstractmethod

from coco.errors import KbsError

NS_PROBE = "readiness_probe"  # never written: a read that no backend answers from a cache
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_\-./]*$")


class StorageError(KbsError):
    """The storage backend could not be opened, or refused an operation."""


def check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.match(key) or len(key) > 512:
        raise StorageError(
            f"storage key {key!r}: expected [A-Za-z0-9-_./], not starting with '.' or '/'"
        )


class Store(ABC):
    """Namespaced bytes. ``expires`` (epoch seconds) makes an entry invisible after that time."""

    url: str = ""

    @abstractmethod
    def get(self, ns: str, key: str) -> bytes | None: ...

    @abstractmethod
    def put(
        self,
        ns: str,
        key: str,
        value: bytes,
        *,
        overwrite: bool = True,
        expires: float | None = None,
    ) -> bool:
        """Store; with ``overwrite=False`` keep an existing live entry and return False."""

    @abstractmethod
    def delete(self, ns: str, key: str) -> bool: ...

    @abstractmethod
    def keys(self, ns: str) -> list[str]: ...

    @abstractmethod
    def sweep(self, ns: str) -> int:
        """Delete expired entries of ``ns``; returns how many."""

    def items(self, ns: str) -> dict[str, bytes]:
        """Every live entry of ``ns``."""
        out = {}
        for k in self.keys(ns):
            v = self.get(ns, k)
            if v is not None:
                out[k] = v
        return out

    def ready(self) -> None:
        """Raise :class:`StorageError` unless the backend answers a read now (``/readyz``)."""
        self.get(NS_PROBE, "ready")

    def close(self) -> None:  # noqa: B027 - optional
        pass


class MemoryStore(Store):
    """Process-local storage: lost on exit. For tests and throwaway servers."""

    url = "memory://"

    def __init__(self) -> None:
        self._d: dict[tuple[str, str], tuple[bytes, float | None]] = {}
        self._lock = threading.Lock()

    def _live(self, ns: str, key: str) -> bytes | None:
        item = self._d.get((ns, key))
        if item is None:
            return None
        if item[1] is not None and item[1] <= time.time():
            del self._d[(ns, key)]
            return None
        return item[0]

    def get(self, ns: str, key: str) -> bytes | None:
        with self._lock:
            return self._live(ns, key)

    def put(self, ns, key, value, *, overwrite=True, expires=None) -> bool:  # type: ignore[no-untyped-def]
        check_key(key)
        with self._lock:
            if not overwrite and self._live(ns, key) is not None:
                return False
            self._d[(ns, key)] = (bytes(value), expires)
            return True

    def delete(self, ns: str, key: str) -> bool:
        with self._lock:
            return self._d.pop((ns, key), None) is not None

    def keys(self, ns: str) -> list[str]:
        with self._lock:
            return sorted(k for (n, k) in list(self._d) if n == ns and self._live(n, k) is not None)

    def sweep(self, ns: str) -> int:
        now = time.time()
        with self._lock:
            dead = [
                k for k, v in self._d.items() if k[0] == ns and v[1] is not None and v[1] <= now
            ]
            for k in dead:
                del self._d[k]
            return len(dead)
