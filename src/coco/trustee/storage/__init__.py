"""Key-value storage shared by KBS, AS and RVPS: namespaces of keys to bytes.

:func:`open_store` takes a URL: ``sqlite:///path/kbs.db`` (one file, WAL),
``localfs:///dir`` (upstream's LocalFs: each resource a file ``dir/<repository>/<type>/<tag>``),
``postgresql://user:pass@host:port/db`` (several KBS replicas share it) or ``memory://``.
Namespaces as upstream: ``kbs`` (resource policy), ``repository`` (resources),
``kbs_protocol_session``, ``attestation_service_policy``, ``reference_value``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from coco.trustee.storage.base import MemoryStore, StorageError, Store

NS_KBS = "kbs"
NS_REPOSITORY = "repository"
NS_SESSION = "kbs_protocol_session"
NS_AS_POLICY = "attestation_service_policy"
NS_REFERENCE_VALUE = "reference_value"
NS_KEYS = "trustee_keys"
_FORMS = "sqlite:///PATH, localfs:///DIR, postgresql://USER@HOST:PORT/DB or memory://"


def open_store(url: str) -> Store:
    """The backend that ``url`` names (see the module docstring)."""
    scheme = urlsplit(url).scheme
    if scheme in ("sqlite", "localfs"):
        path = url[len(scheme) + len("://") :]
        if not path or path == "/":
            raise StorageError(f"storage URL {url!r}: expected {scheme}:///PATH")
        if scheme == "sqlite":
            from coco.trustee.storage.sqlite import SqliteStore

            return SqliteStore(path)
        from coco.trustee.storage.localfs import LocalFsStore

        return LocalFsStore(path, NS_REPOSITORY)
    if scheme in ("postgresql", "postgres"):
        from coco.trustee.storage.postgres import PostgresStore

        return PostgresStore(url)
    if scheme == "memory":
        return MemoryStore()
    raise StorageError(f"storage URL {url!r}: expected {_FORMS}")


__all__ = [
    "NS_AS_POLICY",
    "NS_KBS",
    "NS_KEYS",
    "NS_REFERENCE_VALUE",
    "NS_REPOSITORY",
    "NS_SESSION",
    "StorageError",
    "Store",
    "open_store",
]
