"""``coco demo``: live the whole life of a confidential pod on this machine (``make demo``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.cli._args import Parser, boolean

DESCRIPTION = (
    "Live the whole life of a confidential pod here, with real parts: a KBS, a registry and a "
    "containerd of the demo's own; an image built, signed and encrypted with a key only the KBS "
    "keeps; a pod with its agent policy and initdata run through the CRI; the secret printed "
    "from inside; three refusals (an altered pod, evidence without the pod's initdata, a "
    "tampered layer); the same pod as a peer pod through a cloud-api-adaptor; then everything "
    "stopped. Exits 0 only if every step did what it should."
)


def _arguments(p: Parser) -> None:
    p.add_argument(
        "--runtime-class",
        choices=["auto", "coco-qemu", "coco-local"],
        default="auto",
        metavar="[auto|coco-qemu|coco-local]",
        help="Where the pod runs (auto: coco-qemu, else coco-local with a warning). [default: auto]",
    )
    p.add_argument(
        "--peer-pods",
        type=boolean,
        nargs="?",
        const=True,
        default=None,
        metavar="[=BOOL]",
        help="Also run the pod as a peer pod on coco-remote (default: where coco-qemu runs).",
    )
    p.add_argument("--json", dest="json_path", type=Path, metavar="FILE",
                   help="Write a machine-readable log of the steps here.")  # fmt: skip
    p.add_argument("--keep", action="store_true",
                   help="Leave the services running and print how to reach them.")  # fmt: skip
    p.add_argument("--podvm-image", type=Path, metavar="DIR",
                   help="coco-qemu's pod VM image (default: coco podvm build's, cached).")  # fmt: skip


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    group.description = DESCRIPTION
    _arguments(group)
    return run, vars(group.parse_args(argv))


def run(
    runtime_class: str, peer_pods: bool | None, json_path: Path | None, keep: bool,
    podvm_image: Path | None,
) -> None:  # fmt: skip
    from coco.demo.run import Options, main

    sys.exit(main(Options(runtime_class, peer_pods, json_path, keep, podvm_image)))
