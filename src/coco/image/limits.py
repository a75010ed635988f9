"""How much one layer may hold: :class:`UnpackLimits`, checked by the untar
(:mod:`coco.image.unpack`) and by the layer store when it reuses a layer. Kept apart from the
untar so that a pull whose layers are all in the store loads neither it nor :mod:`tarfile`."""

from __future__ import annotations

from coco.record import record

__all__ = ["UnpackLimits"]


@record
class UnpackLimits:
    """Bounds on what one layer may do; the defaults suit real images."""

    max_layer_size: int = 32 << 30  # bytes of decompressed tar stream
    max_files: int = 1_000_000  # tar entries, whiteouts and directories included
    max_depth: int = 128  # path components of one entry
    unsafe_allow_devices: bool = False  # create char/block device nodes (as root only)

    def __post_init__(self) -> None:
        for name in ("max_layer_size", "max_files", "max_depth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"UnpackLimits.{name} must be positive")
        if self.unsafe_allow_devices:
            import coco.log

            coco.log.get("coco.image.unpack").warning(
                "unpack: unsafe_allow_devices: device nodes from images will be created"
            )
