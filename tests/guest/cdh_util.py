"""Helpers of the CDH tests: an offline_fs-style getter over a dict."""

from __future__ import annotations

from coco.guest.cdh.errors import ResourceError


class DictGetter:
    """``get_resource(uri)`` from a dict keyed by URI; records every call; a missing key is
    refused the way a KBS policy refusal reaches the hub (a CocoError naming the URI)."""

    def __init__(self, resources: dict[str, bytes] | None = None) -> None:
        self.resources = dict(resources or {})
        self.calls: list[str] = []

    def get_resource(self, uri: str) -> bytes:
        self.calls.append(uri)
        try:
            return self.resources[uri]
        except KeyError:
            raise ResourceError(
                f"resource {uri}: refused by the test KBS (not in its store)"
            ) from None
