"""``coco snapshotter``: containerd's proxy snapshotter that leaves guest-pulled images to the guest."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.cli._args import Commands, Parser, path, run_group, shown

DESCRIPTION = "containerd's snapshotter for coco: overlay on the host, guest-pulled images skipped."
_CONTAINERD = "/run/containerd/containerd.sock"


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, _COMMANDS)


def _build_serve(p: Parser) -> None:
    from coco.host.snapshotter import ROOT, SOCKET

    p.description = (
        "Serve containerd's snapshot service (containerd.services.snapshots.v1.Snapshots) on a "
        "Unix socket, for containerd's proxy plugin `coco` (written by `coco runtime install "
        "--snapshotter`). Ordinary images get overlay snapshots as with containerd's overlayfs "
        "snapshotter; an image with an encrypted layer (found in its manifest in containerd's "
        "content store) or matching --guest-pull-image is not unpacked on the host at all: the "
        "guest pulls it."
    )
    p.add_argument(
        "--socket", type=path(dir_okay=False), default=Path(SOCKET), metavar="PATH",
        help=shown("The Unix socket to listen on.", SOCKET),
    )  # fmt: skip
    p.add_argument(
        "--root", type=path(file_okay=False), default=Path(ROOT), metavar="DIR",
        help=shown("Where snapshots and their metadata live.", ROOT),
    )  # fmt: skip
    p.add_argument(
        "--containerd-address", default=_CONTAINERD, metavar="PATH",
        help=shown("containerd's gRPC socket (its content store holds the manifests).", _CONTAINERD),
    )  # fmt: skip
    p.add_argument(
        "--guest-pull-image", action="append", default=[], metavar="PATTERN",
        help="Also leave images whose reference matches this shell glob to the guest "
        "(e.g. 'registry.example/confidential/*'). Repeatable.",
    )  # fmt: skip
    p.set_defaults(func=serve)


def serve(socket: Path, root: Path, containerd_address: str, guest_pull_image: list[str]) -> None:
    from coco.host.snapshotter.server import serve as run

    def ready(address: str) -> None:
        print(f"coco snapshotter: listening on unix://{address}, root {root.absolute()}",
              file=sys.stderr, flush=True)  # fmt: skip

    run(socket.absolute(), root.absolute(), containerd_address, guest_pull_image, ready=ready)


_COMMANDS: Commands = {
    "serve": ("Serve the snapshot service to containerd.", _build_serve),
}
