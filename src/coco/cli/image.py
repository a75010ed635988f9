"""``coco image``: copy, inspect (and later pull, prune) OCI images."""

import click


@click.group()
def image() -> None:
    """Copy, inspect and pull OCI images."""
