"""tardev layer files: a layer tar with its tarfs index, dm-verity tree and trailer appended.

Layout, as the tardev snapshotter stores a layer and the guest agent mounts it::

    | tar | tarfs index ... tarfs trailer | verity tree (top level first) | verity trailer |
    |<-------- data: n blocks of 4096 -->|

The verity parameters are fixed: sha256, 4096-byte blocks, format 1, salt of 32 zero bytes, no
superblock, tree right after the data. The verity trailer is one 4096-byte block, zero except for
``u32 data_block_size, u32 hash_block_size, u64 data_blocks`` (little-endian) at offset 3584. The
root hash is the one genpolicy puts in policies (it only covers the data).

:func:`convert` reads a ``.tar``, ``.tar.gz`` or ``.tar.zst`` layer (recognised by its first
bytes, not its name), writes the result to a temporary file next to the output and renames it into
place only when everything worked. :func:`inspect` reads either kind of output back.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import mmap
import os
import shutil
import stat
import struct
import tempfile
import zlib
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import zstandard

from coco.errors import IntegrityError, TarIndexError
from coco.integrity import tarindex, verity
from coco.oci.compression import decompressed, sniff

__all__ = [
    "LAYER_VERITY",
    "ConvertResult",
    "IndexEntry",
    "Inspection",
    "convert",
    "inspect",
    "layer_root_hash",
]

BLOCK = tarindex.BLOCK
ZERO_SALT = bytes(32)
#: the dm-verity parameters of every tardev layer (hash offset and data blocks vary)
LAYER_VERITY = verity.VerityParams(salt=ZERO_SALT, hash_type=1, superblock=False)
_VERITY_TRAILER = struct.Struct("<IIQ")
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ConvertResult:
    """What :func:`convert` wrote."""

    root_hash: bytes
    compression: str  # "none", "gzip" or "zstd"
    tar_size: int
    data_size: int  # tar + index, the part the root hash covers
    file_size: int
    inodes: int


def _decompress_into(src: Path, dst: BinaryIO) -> str:
    try:
        with open(src, "rb") as f:
            kind = sniff(f.read(4))
            f.seek(0)
            with contextlib.closing(decompressed(f, kind)) as layer:
                shutil.copyfileobj(layer, dst, _COPY_CHUNK)
    except (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as e:
        raise TarIndexError(f"layer {src}: cannot decompress it: {e}") from None
    except OSError as e:
        if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
            raise TarIndexError(f"layer {src}: cannot read it: {e.strerror}") from None
        raise TarIndexError(f"layer {src}: cannot decompress it: {e}") from None
    return kind


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    index_only: bool = False,
    version: int = 2,
    workers: int | None = None,
) -> ConvertResult:
    """Write the tardev layer file for layer ``src`` to ``out``; return its root hash and sizes.

    With ``index_only`` the output is just the tar and its index (what genpolicy hashes). Nothing
    is left at ``out`` (or beside it) when the layer is not a valid tar.
    """
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise TarIndexError(f"layer {src}: expected a file, found none")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise IntegrityError(
            f"output {out}: cannot create a file in {parent}: {e.strerror}"
        ) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as f:
            kind = _decompress_into(src, f)
            f.flush()
            tar_size = f.tell()
            f.seek(0)
            index, stats = tarindex.index_tar(f, tar_size, name=f"layer {src}", version=version)
            f.seek(tar_size)
            f.write(index)
            f.flush()
            data_size = tar_size + len(index)
            n = data_size // BLOCK
            params = replace(LAYER_VERITY, hash_offset=data_size, data_blocks=n)
            tree = verity.build_tree(tmp, params, workers=workers)
            if not index_only:
                f.seek(data_size)
                f.write(tree.tree)
                trailer = bytearray(BLOCK)
                _VERITY_TRAILER.pack_into(trailer, BLOCK - 512, BLOCK, BLOCK, n)
                f.write(trailer)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            size = f.tell()
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return ConvertResult(tree.root_hash, kind, tar_size, data_size, size, stats.inodes)


def layer_root_hash(
    src: str | os.PathLike[str], *, version: int = 2, workers: int | None = None
) -> bytes:
    """The root hash genpolicy computes for layer ``src`` (tar, tar+gzip or tar+zstd).

    The indexed tar is built in a temporary directory and removed afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="coco-tardev-") as tmp:
        res = convert(src, Path(tmp) / "layer", index_only=True, version=version, workers=workers)
    return res.root_hash


# ---------------------------------------------------------------------------------------------
# reading a layer back


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One name in the index, as the guest's tarfs will show it."""

    path: str
    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    offset: int
    opaque: bool
    target: str | None  # symlinks

    @property
    def kind(self) -> str:
        return _KIND.get(self.mode & 0o170000, "?")

    def line(self) -> str:
        perms = "".join(c if self.mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))
        when = dt.datetime.fromtimestamp(self.mtime, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        size = (
            f"{self.offset >> 32},{self.offset & 0xFFFFFFFF}"
            if self.kind in ("c", "b") and self.offset
            else str(self.size)
        )
        tail = f" -> {self.target}" if self.target is not None else ""
        opq = " (opaque)" if self.opaque else ""
        return (
            f"{self.ino:>6} {self.kind}{perms} {self.uid}/{self.gid} {size:>10} {when} "
            f"{self.path}{tail}{opq}"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "ino": self.ino,
            "type": self.kind,
            "mode": f"{self.mode:06o}",
            "uid": self.uid,
            "gid": self.gid,
            "size": self.size,
            "mtime": self.mtime,
            "offset": self.offset,
            "opaque": self.opaque,
            "target": self.target,
        }


_KIND = {
    stat.S_IFDIR: "d",
    stat.S_IFREG: "-",
    stat.S_IFLNK: "l",
    stat.S_IFCHR: "c",
    stat.S_IFBLK: "b",
    stat.S_IFIFO: "p",
    stat.S_IFSOCK: "s",
    0: "0",
}


@dataclass(frozen=True, slots=True)
class Inspection:
    """An indexed tar or a full tardev layer file, read back."""

    layer_file: bool  # True: tree and verity trailer present
    data_size: int
    tar_size: int
    inodes: int
    root_hash: bytes
    tree_ok: bool | None  # layer files: the stored tree equals the computed one
    entries: tuple[IndexEntry, ...]


def _decode(name: bytes) -> str:
    return name.decode("utf-8", errors="surrogateescape")


def inspect(path: str | os.PathLike[str], *, workers: int | None = None) -> Inspection:
    """Read the index (and the verity trailer, when there is one) of ``path``."""
    path = Path(path)
    where = f"tardev file {path}"
    try:
        size = path.stat().st_size
        f = open(path, "rb")  # noqa: SIM115
    except OSError as e:
        raise IntegrityError(f"{where}: cannot read it: {e.strerror}") from None
    with f:
        if size < 2 * BLOCK or size % BLOCK:
            raise IntegrityError(
                f"{where}: expected a size that is a multiple of {BLOCK} and at least "
                f"{2 * BLOCK}, found {size}"
            )
        f.seek(size - 512)
        dbs, hbs, n = _VERITY_TRAILER.unpack(f.read(_VERITY_TRAILER.size))
        layer_file = False
        data_size = size
        if dbs == BLOCK and hbs == BLOCK and n > 0 and n * BLOCK < size:
            params = replace(LAYER_VERITY, hash_offset=n * BLOCK, data_blocks=n)
            tree_len = verity.tree_blocks(params, n) * BLOCK
            if n * BLOCK + tree_len + BLOCK == size:
                layer_file = True
                data_size = n * BLOCK
        f.seek(data_size - 512)
        table, count = tarindex.SUPER.unpack(f.read(tarindex.SUPER.size))
        if table > data_size or table + 32 * count > data_size or count < 1:
            raise IntegrityError(
                f"{where}: tarfs superblock at offset {data_size - 512} says {count} inodes at "
                f"offset {table}, which does not fit the {data_size} data bytes"
            )
        with mmap.mmap(f.fileno(), data_size, access=mmap.ACCESS_READ) as blob:
            entries = _walk(blob, table, count, where)
    params = replace(LAYER_VERITY, hash_offset=data_size, data_blocks=data_size // BLOCK)
    tree = verity.build_tree(path, params, workers=workers)
    tree_ok = None
    if layer_file:
        with open(path, "rb") as f:
            f.seek(data_size)
            tree_ok = f.read(len(tree.tree)) == tree.tree
    return Inspection(layer_file, data_size, table, count, tree.root_hash, tree_ok, entries)


def _walk(blob: mmap.mmap, table: int, count: int, where: str) -> tuple[IndexEntry, ...]:
    def inode(ino: int) -> tuple[int, ...]:
        if not 1 <= ino <= count:
            raise IntegrityError(f"{where}: inode number {ino} outside 1..{count}")
        return tarindex.INODE.unpack_from(blob, table + 32 * (ino - 1))

    def entry(path: str, ino: int) -> IndexEntry:
        mode, flags, hmtime, uid, gid, lmtime, size, offset = inode(ino)
        target = None
        if mode & 0o170000 == stat.S_IFLNK:
            if offset + size > len(blob):
                raise IntegrityError(f"{where}: symlink {path!r} target is outside the data")
            target = _decode(blob[offset : offset + size])
        return IndexEntry(
            path,
            ino,
            mode,
            uid,
            gid,
            size,
            (hmtime & 0xF) << 32 | lmtime,
            offset,
            bool(flags & tarindex.FLAG_OPAQUE),
            target,
        )

    out = [entry("/", 1)]
    queue = deque([(out[0], "")])
    seen_dirs = {1}
    while queue:
        d, prefix = queue.popleft()
        if d.mode & 0o170000 != stat.S_IFDIR:
            continue
        if d.offset + d.size > len(blob):
            raise IntegrityError(f"{where}: directory {d.path!r} entries are outside the data")
        for i in range(d.size // 32):
            ino, name_off, name_len, _dtype = tarindex.DIRENT.unpack_from(blob, d.offset + 32 * i)
            if name_off + name_len > len(blob):
                raise IntegrityError(f"{where}: a name in {d.path!r} is outside the data")
            name = _decode(blob[name_off : name_off + name_len])
            child = entry(f"{prefix}/{name}", ino)
            out.append(child)
            if child.mode & 0o170000 == stat.S_IFDIR:
                if ino in seen_dirs:
                    raise IntegrityError(f"{where}: directory inode {ino} appears twice")
                seen_dirs.add(ino)
                queue.append((child, child.path))
    return tuple(out)
