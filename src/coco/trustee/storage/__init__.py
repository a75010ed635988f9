"""Key-value storage shared by KBS, AS and RVPS: namespaces of keys to bytes.

:func:`open_store` takes a URL: ``sqlite:///path/kbs.db`` (the default, one file, WAL),
``postgresql://user:pass@host:port/db`` (several KBS replicas share it) or ``memory://``.
Namespaces as upstream: ``kbs`` (resource policy), ``repository`` (resources),
``kbs_protocol_session``, ``attestation_service_policy``, ``reference_value``.
"""

from __future__ import annotations

from coco.trustee.storage.base import StorageError, Store, open_store

NS_KBS = "kbs"
NS_REPOSITORY = "repository"
NS_SESSION = "kbs_protocol_session"
NS_AS_POLICY = "attestation_service_policy"
NS_REFERENCE_VALUE = "reference_value"
NS_KEYS = "trustee_keys"

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
