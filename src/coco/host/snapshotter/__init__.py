"""coco's snapshotter: containerd's overlay snapshotter, but images pulled in the guest skip the host.

containerd 1.6 unpacks every image it pulls with its (one, global) CRI snapshotter. For an image
whose layers are encrypted for the guest that fails (the host has no key, and must never have
one), and for any confidential pod it is wasted work: the guest pulls the image itself
(``image_guest_pull``). Upstream solves this with nydus-snapshotter in proxy mode; this package is
coco's own: ``coco snapshotter serve`` answers containerd's ``Snapshots`` gRPC service as a proxy
plugin.

* Ordinary images get the semantics of containerd's overlayfs snapshotter (:mod:`.store`), so runc
  pods on the same containerd keep working.
* An image the guest must pull (any ``+encrypted`` layer in its manifest, read through containerd's
  content service; or an image reference matching a configured pattern, :mod:`.guestpull`) is
  skipped the way remote snapshotters do it: the Prepare of each layer's unpack, which carries the
  ``containerd.io/snapshot.ref`` label, creates the committed snapshot itself and answers
  ALREADY_EXISTS, so containerd neither fetches, decrypts nor applies the layer. A container's
  rootfs on top of such a chain is an empty directory; coco's shim never uses it.

Known limit (shared with upstream's proxy mode): snapshots are named by chain ID, so within one
containerd namespace an image whose layers have the same diff IDs as an already skipped image
reuses the skipped (empty) chain.
"""

from __future__ import annotations

from coco.errors import HostError


class SnapshotterError(HostError):
    """A snapshot request that cannot be answered; ``code`` is the gRPC status name."""

    code = "UNKNOWN"


class NotFound(SnapshotterError):
    code = "NOT_FOUND"


class AlreadyExists(SnapshotterError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(SnapshotterError):
    code = "FAILED_PRECONDITION"


class InvalidArgument(SnapshotterError):
    code = "INVALID_ARGUMENT"


class Unavailable(SnapshotterError):
    code = "UNAVAILABLE"


PLUGIN = "coco"
SOCKET = "/run/coco/snapshotter.sock"
ROOT = "/var/lib/coco/snapshotter"


def containerd_settings(socket: str) -> list[tuple[list[str], object]]:
    """What containerd's config (version 2) needs to use this snapshotter, as (TOML path, value):
    the proxy plugin ``coco`` on ``socket``, chosen as the CRI plugin's snapshotter (one for all
    runtimes on containerd 1.6), with the snapshot labels that say which image a layer is of."""
    cri = ["plugins", "io.containerd.grpc.v1.cri", "containerd"]
    return [
        (["proxy_plugins", PLUGIN], {"type": "snapshot", "address": socket}),
        ([*cri, "snapshotter"], PLUGIN),
        ([*cri, "disable_snapshot_annotations"], False),
    ]
