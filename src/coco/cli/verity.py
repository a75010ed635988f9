"""``coco verity``: build and check dm-verity hash trees the way ``veritysetup`` does."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coco.cli._args import Commands, Parser, int_range, integer, path, run_group, shown
from coco.cli._progress import busy
from coco.errors import UsageError, VerityMismatchError
from coco.integrity import verity

if TYPE_CHECKING:
    import uuid as uuidlib

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
    import uuid as uuidlib  # only when given: uuid is slow to import

    return uuidlib.UUID(text)


DESCRIPTION = "dm-verity hash trees, compatible with veritysetup."


def _params_options(p: Parser) -> None:
    p.add_argument(
        "--hash",
        dest="hash_name",
        default="sha256",
        choices=verity.HASH_ALGORITHMS,
        metavar="[" + "|".join(verity.HASH_ALGORITHMS) + "]",
        help=shown("Hash algorithm.", "sha256"),
    )
    p.add_argument(
        "--data-block-size",
        default=4096,
        type=integer,
        metavar="INTEGER",
        help=shown("Data block size in bytes.", 4096),
    )
    p.add_argument(
        "--hash-block-size",
        default=4096,
        type=integer,
        metavar="INTEGER",
        help=shown("Hash block size in bytes.", 4096),
    )
    p.add_argument(
        "--data-blocks",
        type=int_range(1),
        metavar="INTEGER RANGE",
        help="Number of data blocks (default: all whole blocks of DATA).  [x>=1]",
    )
    p.add_argument(
        "--hash-offset",
        type=int_range(0),
        metavar="INTEGER RANGE",
        help="Byte offset of the hash area (superblock) in the hash file "
        "[default: 0, or the data size when the tree goes into DATA].  [x>=0]",
    )
    p.add_argument(
        "--format",
        dest="hash_type",
        type=int_range(0, 1),
        default=1,
        metavar="INTEGER RANGE",
        help=shown("1: normal, 0: original Chrome OS.", "1; 0<=x<=1"),
    )
    p.add_argument("--no-superblock", action="store_true", help="Do not write/read a superblock.")


def _jobs_option(p: Parser) -> None:
    p.add_argument(
        "--jobs",
        type=int_range(1),
        metavar="INTEGER RANGE",
        help="Processes hashing a large file [default: one per core].  [x>=1]",
    )


def _build_format(p: Parser) -> None:
    p.description = (
        "Write the hash tree of DATA to HASH_FILE and print the root.\n\nThe tree bytes and the "
        "printed lines are those of `veritysetup format` with the same options. As with "
        "veritysetup, the tree goes inside DATA when DATA is named twice with --hash-offset "
        "(and --data-blocks) past the data."
    )
    p.add_argument("data", metavar="DATA", type=path(dir_okay=False, as_path=False))
    p.add_argument(
        "hash_file", metavar="HASH_FILE", nargs="?", type=path(dir_okay=False, as_path=False)
    )  # optional for the parser, so that its absence is refused in veritysetup's words
    _params_options(p)
    p.add_argument(
        "-s", "--salt", metavar="TEXT", help="Salt as hex, '-' for none [default: 32 random bytes]."
    )
    p.add_argument(
        "--root-hash-file",
        type=path(dir_okay=False),
        metavar="FILE",
        help="Also write the root hash (hex, no newline) to this file.",
    )
    p.add_argument(
        "--uuid", dest="uuid_text", metavar="TEXT", help="UUID stored in the superblock."
    )
    _jobs_option(p)
    p.set_defaults(func=format_cmd)


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
    if hash_file is None:  # veritysetup: "format: requires <data_device> <hash_device>" (exit 1)
        raise UsageError(
            f"format: expected DATA HASH_FILE, found only DATA ({data}); for the tree inside DATA "
            "name it twice and give --hash-offset"
        )
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
    created = not os.path.lexists(target)
    with _root_hash_writer(root_hash_file) as write_root:  # checked before any hashing
        with busy(f"hashing {data}"):
            tree = verity.format_file(data, target, params, workers=jobs)
        try:
            write_root(tree.root_hash.hex())
        except BaseException:
            if created:  # a hash file without its root hash is of no use: nothing is left
                Path(target).unlink(missing_ok=True)
            raise
    sys.stdout.write(verity.report(tree, target))  # the path as given, like veritysetup


@contextlib.contextmanager
def _root_hash_writer(path: Path | None) -> Iterator[Callable[[str], None]]:
    """A writer for ``--root-hash-file``: a temporary file is made next to it at once (so an
    unwritable place fails before any work) and replaces it when written; on failure it goes."""
    if path is None:
        yield lambda text: None
        return
    where = f"--root-hash-file {path}"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise UsageError(f"{where}: cannot write it: {e.strerror}") from None
    done = False

    def write(text: str) -> None:
        nonlocal done
        try:
            os.write(fd, text.encode())
            os.replace(tmp, path)
        except OSError as e:
            raise UsageError(f"{where}: cannot write it: {e.strerror}") from None
        done = True

    try:
        yield write
    finally:
        os.close(fd)
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# a root hash is at most 64 bytes (sha512): 128 hex digits; a larger file is not a root hash file
_MAX_ROOT_FILE = 1024


def _read_root(path: Path) -> str:
    where = f"--root-hash-file {path}"
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_ROOT_FILE + 1)
    except OSError as e:
        raise UsageError(f"{where}: cannot read it: {e.strerror}") from None
    text = raw.strip()
    if len(raw) > _MAX_ROOT_FILE or not re.fullmatch(rb"(?:[0-9a-fA-F]{2})+", text):
        found = (
            f"more than {_MAX_ROOT_FILE} bytes"
            if len(raw) > _MAX_ROOT_FILE
            else "an empty file"
            if not text
            else repr(text[:80].decode())
            if text.isascii() and text.decode().isprintable()
            else f"{len(text)} bytes that are not text (binary file?)"
        )
        raise UsageError(f"{where}: expected a root hash in hex digits, found {found}")
    return text.decode()


def _build_verify(p: Parser) -> None:
    p.description = (
        "Check DATA HASH_FILE ROOT_HASH; name the first block that does not match.\n\n"
        "With a superblock (the default) the parameters are read from it. As with veritysetup, "
        "the tree is read from inside DATA when DATA is named twice with --hash-offset; "
        "the exit status is 2 when the data or the tree does not match the root hash."
    )
    p.add_argument("files", metavar="FILES", nargs="+")
    _params_options(p)
    p.add_argument(
        "-s",
        "--salt",
        metavar="TEXT",
        help="Salt as hex, '-' for none (needed with --no-superblock).",
    )
    p.add_argument(
        "--root-hash-file",
        type=path(dir_okay=False),
        metavar="FILE",
        help="Read the root hash from this file instead of the ROOT_HASH argument.",
    )
    _jobs_option(p)
    p.set_defaults(func=verify_cmd)


def verify_cmd(
    files: list[str],
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
    if root_hash_file is not None:
        files = [*files, _read_root(root_hash_file)]
    if len(files) != 3:  # veritysetup refuses both with exit status 1
        raise UsageError(
            f"verify: expected DATA HASH_FILE ROOT_HASH (or DATA HASH_FILE --root-hash-file), "
            f"found {len(files)} argument(s)"
        )
    data, hash_file = Path(files[0]), Path(files[1])
    root_text = files[-1]
    if not re.fullmatch(r"(?:[0-9a-fA-F]{2})+", root_text):
        raise UsageError(f"ROOT_HASH: expected hex digits, found {root_text[:80]!r}")
    if no_superblock and salt is None:
        raise UsageError("--salt is needed with --no-superblock (use '-' for an empty salt)")
    if data.resolve() == hash_file.resolve() and no_superblock and data_blocks is None:
        data_blocks = (hash_offset or 0) // data_block_size or None
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
    try:
        with busy(f"verifying {data}"):
            used = verity.verify(data, hash_file, bytes.fromhex(root_text), params, workers=jobs)
    except VerityMismatchError as e:  # veritysetup's status for a failed verification
        sys.stdout.flush()
        print(f"coco: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(
        f"Verification succeeded: {data}: {used.data_blocks} data blocks match root hash "
        f"{root_text.lower()}"
    )


COMMANDS: Commands = {
    "format": ("Write the hash tree of DATA and print the root hash.", _build_format),
    "verify": ("Check DATA [HASH_FILE] ROOT_HASH.", _build_verify),
}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, COMMANDS)
