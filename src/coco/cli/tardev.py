"""``coco tardev``: turn layer tars into tardev layer files (tar, tarfs index, verity) and list them."""

from __future__ import annotations

import json
from pathlib import Path

import click

from coco.cli.verity import busy
from coco.integrity import tardev


@click.group("tardev")
def tardev_group() -> None:
    """tardev layer files: the tarfs index and dm-verity tree the guest mounts."""


@tardev_group.command("convert")
@click.argument("layer", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--index-only", is_flag=True, help="Write only the tar and its index (no tree).")
@click.option(
    "--tarindex-version",
    type=click.IntRange(1, 2),
    default=2,
    show_default=True,
    help="2: current tarindex; 1: the older one, which drops symlinks with long targets.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Processes hashing a large layer [default: one per core].",
)
def convert_cmd(
    layer: Path, out: Path, index_only: bool, tarindex_version: int, jobs: int | None
) -> None:
    """Convert LAYER (.tar, .tar.gz or .tar.zst) to the tardev file OUT; print the root hash.

    The root hash covers the tar and its index; it is the value genpolicy puts in policies.
    """
    with busy(f"converting {layer}"):
        res = tardev.convert(
            layer, out, index_only=index_only, version=tarindex_version, workers=jobs
        )
    click.echo(res.root_hash.hex())


@tardev_group.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
def inspect_cmd(file: Path, fmt: str) -> None:
    """List the tarfs index of FILE (a tardev layer file or an indexed tar)."""
    info = tardev.inspect(file)
    if fmt == "json":
        click.echo(
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
    click.echo(f"Kind:       {kind}")
    click.echo(f"Tar size:   {info.tar_size}")
    click.echo(f"Data size:  {info.data_size} ({info.data_size // tardev.BLOCK} blocks)")
    click.echo(f"Inodes:     {info.inodes}")
    tree = (
        ""
        if info.tree_ok is None
        else (" (stored tree matches)" if info.tree_ok else " (STORED TREE DOES NOT MATCH)")
    )
    click.echo(f"Root hash:  {info.root_hash.hex()}{tree}")
    if info.layer_file:
        n = info.data_size // tardev.BLOCK
        click.echo(
            f"Check with: veritysetup verify --data-block-size=4096 --hash-block-size=4096 "
            f"--data-blocks={n} --hash-offset={info.data_size} --no-superblock "
            f"--salt={tardev.ZERO_SALT.hex()} {file} {file} {info.root_hash.hex()}"
        )
    for e in info.entries:
        click.echo(e.line())
