"""Images on the guest side: the hardened layer unpacker, the layer store and bundles.

``unpack_layer`` turns a decompressed layer tar stream into a layer directory (overlay form);
``LayerStore`` keeps those by diff_id and knows which bundles use them; ``create_bundle`` makes a
rootfs (overlay mount, or a flattened copy) plus an OCI runtime ``config.json``.

The names load on first use, so that importing one submodule (the pull service's client, say)
does not load the others.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing itself is a noticeable import for the pull service's client
if TYPE_CHECKING:
    from typing import Any

    from coco.image.bundle import Bundle, create_bundle, remove_bundle
    from coco.image.runtime_spec import runtime_config
    from coco.image.store import LayerInfo, LayerStore
    from coco.image.unpack import UnpackLimits, UnpackStats, unpack_layer

_WHERE = {
    "Bundle": "bundle",
    "create_bundle": "bundle",
    "remove_bundle": "bundle",
    "runtime_config": "runtime_spec",
    "LayerInfo": "store",
    "LayerStore": "store",
    "UnpackLimits": "unpack",
    "UnpackStats": "unpack",
    "unpack_layer": "unpack",
}
__all__ = [
    "Bundle",
    "LayerInfo",
    "LayerStore",
    "UnpackLimits",
    "UnpackStats",
    "create_bundle",
    "remove_bundle",
    "runtime_config",
    "unpack_layer",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'coco.image' has no attribute {name!r}")
    return getattr(importlib.import_module(f"coco.image.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
