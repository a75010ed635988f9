"""Where the hub's resources come from: anything with ``get_resource(uri) -> bytes``.

The Confidential Data Hub never talks to a KBS itself: it asks a :class:`ResourceGetter` (the
guest's KBS client, ``cc_kbc`` after attestation or ``offline_fs_kbc`` from files) for the bytes
named by a resource URI (``kbs:///repo/type/tag``). The getter raises a
:class:`~coco.errors.CocoError` (the KBS's refusal, a missing resource) that the hub passes on.

Some places of upstream's configuration also accept ``file://`` URIs (the image security policy,
the sigstore config, registry credentials): :func:`fetch` reads those from the local file system
and hands everything else to the getter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from coco.guest.cdh.errors import ResourceError
from coco.protocol.resource_uri import ResourceUri, ResourceUriError


@runtime_checkable
class ResourceGetter(Protocol):
    """The KBS client as the hub sees it."""

    def get_resource(self, uri: str) -> bytes: ...


def is_resource_uri(text: str) -> bool:
    """Whether ``text`` parses as a resource URI (:class:`ResourceUri`)."""
    try:
        ResourceUri.parse(text)
    except ResourceUriError:
        return False
    return True


def fetch(getter: ResourceGetter | None, uri: str, what: str) -> bytes:
    """The bytes of ``uri``: a KBS resource through ``getter``, or a ``file://`` path."""
    if uri.startswith("file://"):
        path = Path(uri[len("file://") :])
        try:
            return path.read_bytes()
        except OSError as e:
            raise ResourceError(f"{what} {uri}: cannot read {path}: {e.strerror}") from None
    if not uri.startswith("kbs"):
        raise ResourceError(
            f"{what}: expected a kbs:///repo/type/tag or file:///path URI, found {uri!r}"
        )
    ResourceUri.parse(uri, what)
    if getter is None:
        raise ResourceError(f"{what} {uri}: no KBS client is configured to fetch it")
    return getter.get_resource(uri)
