"""``coco verity``: build and check dm-verity hash trees the way ``veritysetup`` does."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import click

from coco.errors import UsageError
from coco.integrity import verity

_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_HEX_RE = re.compile(r"^(?:[0-9a-fA-F]{2})*$")


def _salt(text: str | None) -> bytes:
    if text is None:
        return os.urandom(32)  # veritysetup's default: 32 random bytes
    if text == "-":
        return b""
    if not _HEX_RE.match(text) or len(text) > 2 * verity.MAX_SALT_SIZE:
        raise UsageError(
            f"--salt: expected '-' or an even number of hex digits (at most "
            f"{2 * verity.MAX_SALT_SIZE}), found {text[:80]!r}"
        )
    return bytes.fromhex(text)


def _uuid(text: str | None) -> uuidlib.UUID | None:
    if text is None:
        return None
    if not _UUID_RE.match(text):
        raise UsageError(
            f"--uuid: expected the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, found {text[:80]!r}"
        )
    return uuidlib.UUID(text)


def _params_options(f):
    opts = [
        click.option(
            "--hash",
            "hash_name",
            default="sha256",
            show_default=True,
            type=click.Choice(verity.HASH_ALGORITHMS),
            help="Hash algorithm.",
        ),
        click.option(
            "--data-block-size",
            default=4096,
            show_default=True,
            type=int,
            help="Data block size in bytes.",
        ),
        click.option(
            "--hash-block-size",
            default=4096,
            show_default=True,
            type=int,
            help="Hash block size in bytes.",
        ),
        click.option(
            "--data-blocks",
            type=click.IntRange(min=1),
            default=None,
            help="Number of data blocks (default: all whole blocks of DATA).",
        ),
        click.option(
            "--hash-offset",
            type=click.IntRange(min=0),
            default=None,
            help="Byte offset of the hash area (superblock) in the hash file "
            "[default: 0, or the data size when the tree goes into DATA].",
        ),
        click.option(
            "--format",
            "hash_type",
            type=click.IntRange(0, 1),
            default=1,
            show_default=True,
            help="1: normal, 0: original Chrome OS.",
        ),
        click.option("--no-superblock", is_flag=True, help="Do not write/read a superblock."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@contextlib.contextmanager
def busy(message: str) -> Iterator[None]:
    """A spinner on stderr while long work runs, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield


def _single_file_offset(data: Path, dbs: int, data_blocks: int | None) -> int:
    if data_blocks is not None:
        return data_blocks * dbs
    try:
        size = data.stat().st_size
    except OSError as e:
        raise UsageError(f"data file {data}: cannot read it: {e.strerror}") from None
    return size // dbs * dbs


@click.group("verity")
def verity_group() -> None:
    """dm-verity hash trees, compatible with veritysetup."""


@verity_group.command("format")
@click.argument("data", type=click.Path(dir_okay=False))
@click.argument("hash_file", required=False, type=click.Path(dir_okay=False))
@_params_options
@click.option(
    "-s", "--salt", default=None, help="Salt as hex, '-' for none [default: 32 random bytes]."
)
@click.option(
    "--root-hash-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the root hash (hex, no newline) to this file.",
)
@click.option("--uuid", "uuid_text", default=None, help="UUID stored in the superblock.")
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Processes hashing a large file [default: one per core].",
)
def format_cmd(
    data: str,
    hash_file: str | None,
    hash_name: str,
    data_block_size: int,
    hash_block_size: int,
    data_blocks: int | None,
    hash_offset: int | None,
    hash_type: int,
    no_superblock: bool,
    salt: str | None,
    root_hash_file: Path | None,
    uuid_text: str | None,
    jobs: int | None,
) -> None:
    """Write the hash tree of DATA to HASH_FILE (or into DATA after its data) and print the root.

    The tree bytes and the printed lines are those of `veritysetup format` with the same options.
    """
    if hash_file is None and hash_offset is None:
        hash_offset = _single_file_offset(Path(data), data_block_size, data_blocks)
    if hash_file is None and data_blocks is None:
        assert hash_offset is not None
        data_blocks = hash_offset // data_block_size or None
    params = verity.VerityParams(
        hash_name=hash_name,
        data_block_size=data_block_size,
        hash_block_size=hash_block_size,
        salt=_salt(salt),
        hash_type=hash_type,
        hash_offset=hash_offset or 0,
        data_blocks=data_blocks,
        superblock=not no_superblock,
        uuid=_uuid(uuid_text),
    )
    target = hash_file if hash_file is not None else data
    with busy(f"hashing {data}"):
        tree = verity.format_file(data, target, params, workers=jobs)
    if root_hash_file is not None:
        _write_root(root_hash_file, tree.root_hash.hex())
    click.echo(verity.report(tree, target), nl=False)  # the path as given, like veritysetup


def _write_root(path: Path, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError as e:
        raise UsageError(f"--root-hash-file {path}: cannot write it: {e.strerror}") from None


def _read_root(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as e:
        raise UsageError(f"--root-hash-file {path}: cannot read it: {e.strerror}") from None


@verity_group.command("verify")
@click.argument("files", nargs=-1, required=True)
@_params_options
@click.option(
    "-s", "--salt", default=None, help="Salt as hex, '-' for none (needed with --no-superblock)."
)
@click.option(
    "--root-hash-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Read the root hash from this file instead of the ROOT_HASH argument.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Processes hashing a large file [default: one per core].",
)
def verify_cmd(
    files: tuple[str, ...],
    hash_name: str,
    data_block_size: int,
    hash_block_size: int,
    data_blocks: int | None,
    hash_offset: int | None,
    hash_type: int,
    no_superblock: bool,
    salt: str | None,
    root_hash_file: Path | None,
    jobs: int | None,
) -> None:
    """Check DATA [HASH_FILE] ROOT_HASH; name the first block that does not match.

    With a superblock (the default) the parameters are read from it. Without HASH_FILE the tree
    is read from DATA at --hash-offset (default: right after the data).
    """
    if root_hash_file is not None:
        files = (*files, _read_root(root_hash_file))
    if len(files) not in (2, 3):
        raise click.UsageError(
            f"expected DATA [HASH_FILE] ROOT_HASH (or --root-hash-file), found {len(files)} "
            "arguments"
        )
    data = Path(files[0])
    hash_file = Path(files[1]) if len(files) == 3 else data
    root_text = files[-1]
    if not re.fullmatch(r"(?:[0-9a-fA-F]{2})+", root_text):
        raise UsageError(f"ROOT_HASH: expected hex digits, found {root_text[:80]!r}")
    if no_superblock and salt is None:
        raise UsageError("--salt is needed with --no-superblock (use '-' for an empty salt)")
    if len(files) == 2 and hash_offset is None:
        if data_blocks is None:
            raise UsageError(
                "with the tree inside DATA, give --hash-offset (or --data-blocks) to say where it is"
            )
        hash_offset = data_blocks * data_block_size
    if len(files) == 2 and no_superblock and data_blocks is None:
        assert hash_offset is not None
        data_blocks = hash_offset // data_block_size or None
    params = verity.VerityParams(
        hash_name=hash_name,
        data_block_size=data_block_size,
        hash_block_size=hash_block_size,
        salt=_salt(salt) if no_superblock else b"",
        hash_type=hash_type,
        hash_offset=hash_offset or 0,
        data_blocks=data_blocks,
        superblock=not no_superblock,
    )
    with busy(f"verifying {data}"):
        used = verity.verify(data, hash_file, bytes.fromhex(root_text), params, workers=jobs)
    click.echo(
        f"Verification succeeded: {data}: {used.data_blocks} data blocks match root hash "
        f"{root_text.lower()}"
    )
