"""``coco tardev``: turn layer tars into tardev layer files (tar, tarfs index, verity) and list them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.cli._args import Commands, Parser, int_range, path, run_group, shown
from coco.cli.verity import busy
from coco.integrity import tardev

DESCRIPTION = "tardev layer files: the tarfs index and dm-verity tree the guest mounts."


def _build_convert(p: Parser) -> None:
    p.description = (
        "Convert LAYER (.tar, .tar.gz or .tar.zst) to the tardev file OUT; print the root hash."
        "\n\nThe root hash covers the tar and its index; it is the value genpolicy puts in "
        "policies."
    )
    p.add_argument("layer", metavar="LAYER", type=path(dir_okay=False))
    p.add_argument("out", metavar="OUT", type=path(dir_okay=False))
    p.add_argument(
        "--index-only", action="store_true", help="Write only the tar and its index (no tree)."
    )
    p.add_argument(
        "--tarindex-version",
        type=int_range(1, 2),
        default=2,
        metavar="INTEGER RANGE",
        help=shown(
            "2: current tarindex; 1: the older one, which drops symlinks with long targets.",
            "2; 1<=x<=2",
        ),
    )
    p.add_argument(
        "--jobs",
        type=int_range(1),
        metavar="INTEGER RANGE",
        help="Processes hashing a large layer [default: one per core].  [x>=1]",
    )
    p.set_defaults(func=convert_cmd)


def convert_cmd(
    layer: Path, out: Path, index_only: bool, tarindex_version: int, jobs: int | None
) -> None:
    with busy(f"converting {layer}"):
        res = tardev.convert(
            layer, out, index_only=index_only, version=tarindex_version, workers=jobs
        )
    print(res.root_hash.hex())


def _build_inspect(p: Parser) -> None:
    p.description = "List the tarfs index of FILE (a tardev layer file or an indexed tar)."
    p.add_argument("file", metavar="FILE", type=path(dir_okay=False))
    p.add_argument(
        "--format",
        dest="fmt",
        choices=["text", "json"],
        default="text",
        metavar="[text|json]",
        help=shown("Output format.", "text"),
    )
    p.set_defaults(func=inspect_cmd)


def inspect_cmd(file: Path, fmt: str) -> None:
    info = tardev.inspect(file)
    if fmt == "json":
        print(
            json.dumps(
                {
                    "kind": "layer" if info.layer_file else "indexed-tar",
                    "tar_size": info.tar_size,
                    "data_size": info.data_size,
                    "inodes": info.inodes,
                    "root_hash": info.root_hash.hex(),
                    "tree_matches": info.tree_ok,
                    "entries": [e.to_json() for e in info.entries],
                },
                indent=2,
            )
        )
        return
    kind = "tardev layer file" if info.layer_file else "indexed tar (no hash tree)"
    print(f"Kind:       {kind}")
    print(f"Tar size:   {info.tar_size}")
    print(f"Data size:  {info.data_size} ({info.data_size // tardev.BLOCK} blocks)")
    print(f"Inodes:     {info.inodes}")
    tree = (
        ""
        if info.tree_ok is None
        else (" (stored tree matches)" if info.tree_ok else " (STORED TREE DOES NOT MATCH)")
    )
    print(f"Root hash:  {info.root_hash.hex()}{tree}")
    if info.layer_file:
        n = info.data_size // tardev.BLOCK
        print(
            f"Check with: veritysetup verify --data-block-size=4096 --hash-block-size=4096 "
            f"--data-blocks={n} --hash-offset={info.data_size} --no-superblock "
            f"--salt={tardev.ZERO_SALT.hex()} {file} {file} {info.root_hash.hex()}"
        )
    for e in info.entries:
        print(e.line())


COMMANDS: Commands = {
    "convert": ("Convert a layer tar to a tardev layer file; print the root hash.", _build_convert),
    "inspect": ("List the tarfs index of a tardev layer file or an indexed tar.", _build_inspect),
}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, COMMANDS)
