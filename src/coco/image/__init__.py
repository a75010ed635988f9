"""Images on the guest side: the hardened layer unpacker, the layer store and bundles.

``unpack_layer`` turns a decompressed layer tar stream into a layer directory (overlay form);
``LayerStore`` keeps those by diff_id and knows which bundles use them; ``create_bundle`` makes a
rootfs (overlay mount, or a flattened copy) plus an OCI runtime ``config.json``.
"""

from coco.image.bundle import Bundle, create_bundle, remove_bundle, runtime_config
from coco.image.store import LayerInfo, LayerStore
from coco.image.unpack import UnpackLimits, UnpackStats, unpack_layer

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
