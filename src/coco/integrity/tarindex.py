"""The tarfs index that tardev appends to a layer tar, byte for byte as the reference tarindex.

The guest kernel's ``tar`` filesystem serves files straight out of the tar bytes; the index tells
it where they are: an inode table (32 bytes an inode, root = 1), directory entries (32 bytes each),
the targets of symlinks too long for their tar header, the entry names, then zero padding and a
4096-byte trailer block whose bytes at ``4096 - 512`` hold ``u64 inode_table_offset, u64
inode_count``. All integers are little-endian.

The tree is built in tar order: each entry overwrites what was at its path (children included),
``.wh.NAME`` turns NAME into a character device (an overlay whiteout), ``.wh..wh..opq`` marks its
directory opaque, hardlinks to regular files share the inode, paths are cleaned of ``.``, ``..``
and empty parts. Numbering is breadth-first with names in byte order. Two quirks of the reference
are kept on purpose, because the root hash covers them: the padding before the trailer counts
the string area twice, and long symlink targets are laid out in tar order while their offsets are
handed out in breadth-first order.

``version=1`` reproduces the older tarindex, which leaves out symlinks whose target does not fit
the tar header.

Tar reading is strict: a truncated archive, a header with a bad checksum or a malformed number,
a malformed PAX record, or an entry type the index cannot represent raise :class:`TarIndexError`
naming the entry and its offset.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from coco.errors import TarIndexError

__all__ = [
    "BLOCK",
    "IndexStats",
    "TarEntry",
    "append_index",
    "index_tar",
    "read_tar",
]

log = logging.getLogger(__name__)

BLOCK = 4096
TRAILER_OFFSET = BLOCK - 512  # where the 16-byte superblock sits inside the trailer block

S_IFMT = 0o170000
S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000
S_IFCHR = 0o020000
S_IFBLK = 0o060000
S_IFIFO = 0o010000
S_IFSOCK = 0o140000
_DT = {S_IFIFO: 1, S_IFCHR: 2, S_IFDIR: 4, S_IFBLK: 6, S_IFREG: 8, S_IFLNK: 10, S_IFSOCK: 12}
FLAG_OPAQUE = 1

INODE = struct.Struct("<HBBIIIQQ")
DIRENT = struct.Struct("<QQQB7x")
SUPER = struct.Struct("<QQ")

_WHITEOUT = b".wh."
_OPAQUE = b".wh..wh..opq"
_MAX_META = 1 << 20  # GNU long names / PAX records larger than this are refused
_GLOBAL = b"g"  # PAX global header: metadata only, no file; skipped like the reference does
_UNSUPPORTED = "an entry type the tarfs index cannot represent"


# ---------------------------------------------------------------------------------------------
# tar reading


@dataclass(frozen=True, slots=True)
class TarEntry:
    """One member as the index sees it (long names and PAX merged in)."""

    header_offset: int
    data_offset: int
    type: bytes  # one byte
    path: bytes
    link: bytes | None  # resolved link target (long link, PAX linkpath or header field)
    header_link: bytes  # the header's own linkname field, up to its first NUL
    mode: int | None  # None: the mode field does not parse
    uid: int
    gid: int
    mtime: int
    size: int
    devmajor: int | None
    devminor: int | None


def _field_str(raw: bytes) -> bytes:
    nul = raw.find(b"\0")
    return raw if nul < 0 else raw[:nul]


def _octal(raw: bytes, what: str, where: str) -> int:
    text = _field_str(raw).strip(b" \t\n\r\x0b\x0c")
    digits = text[1:] if text[:1] == b"+" else text
    if not digits or any(c not in b"01234567" for c in digits):
        raise TarIndexError(f"{where}: {what}: expected an octal number, found {raw!r}")
    return int(digits, 8)


def _number(raw: bytes, what: str, where: str) -> int:
    """Octal, or GNU base-256 when the high bit of the first byte is set."""
    if raw[0] & 0x80:
        if len(raw) == 8:
            value = raw[0] ^ 0x80
            rest = raw[1:]
        else:
            value = 0
            rest = raw[-8:]
        for b in rest:
            value = (value << 8) | b
        return value & 0xFFFFFFFFFFFFFFFF
    return _octal(raw, what, where)


def _pax_records(data: bytes, where: str) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos:].strip(b"\0") == b"":
            break
        sp = data.find(b" ", pos)
        if sp < 0 or not data[pos:sp].isdigit():
            raise TarIndexError(f"{where}: PAX record at byte {pos}: expected '<length> key=value'")
        length = int(data[pos:sp])
        rec = data[pos : pos + length]
        if length <= sp - pos + 1 or len(rec) != length or not rec.endswith(b"\n"):
            raise TarIndexError(
                f"{where}: PAX record at byte {pos}: length {length} does not fit the record"
            )
        key, eq, value = rec[sp - pos + 1 : -1].partition(b"=")
        if not eq:
            raise TarIndexError(f"{where}: PAX record at byte {pos}: expected key=value")
        out[key] = value
        pos += length
    return out


def _read_exact(f: BinaryIO, n: int, where: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TarIndexError(f"{where}: truncated: expected {n} bytes, found {len(data)}")
    return data


def read_tar(f: BinaryIO, total: int, name: str = "tar") -> Iterator[TarEntry]:
    """Yield the members of the tar in ``f`` (``total`` bytes), long names and PAX merged in.

    GNU ``L``/``K`` and PAX ``x`` members describe the next member; PAX ``g`` members are skipped.
    """
    pos = 0
    long_name: bytes | None = None
    long_link: bytes | None = None
    pax: dict[bytes, bytes] | None = None
    pending_at = -1
    while True:
        f.seek(pos)
        header = f.read(512)
        if not header:
            break
        where = f"{name}: header at offset {pos}"
        if len(header) != 512:
            raise TarIndexError(f"{where}: truncated: expected 512 bytes, found {len(header)}")
        if header.count(0) == 512:
            break
        stored = _octal(header[148:156], "checksum", where)
        computed = sum(header[:148]) + sum(header[156:]) + 8 * 32
        if stored != computed:
            raise TarIndexError(
                f"{where}: checksum mismatch: header says {stored}, computed {computed}"
            )
        typ = header[156:157]
        hsize = _number(header[124:136], "size", where)
        is_ustar = header[257:263] == b"ustar\0" and header[263:265] == b"00"
        is_gnu = header[257:265] == b"ustar  \0"
        data_off = pos + 512
        size = hsize
        if pax is not None and b"size" in pax:
            if not pax[b"size"].isdigit():
                raise TarIndexError(f"{where}: PAX size is not a number: {pax[b'size']!r}")
            pax_size = int(pax[b"size"])
            if hsize == 0:
                size = pax_size
            elif pax_size != hsize:
                raise TarIndexError(
                    f"{where}: PAX size {pax_size} disagrees with the header size {hsize}"
                )
        nxt = data_off + _round512(size)
        if nxt > total:
            raise TarIndexError(
                f"{where}: truncated: the entry's {size} data bytes (padded to {nxt - data_off}) "
                f"run past the end of the archive ({total} bytes)"
            )
        if (is_ustar or is_gnu) and typ in (b"L", b"K", b"x"):
            if size > _MAX_META:
                raise TarIndexError(f"{where}: {size}-byte extension header is too large")
            f.seek(data_off)
            data = _read_exact(f, size, where)
            if typ == b"L":
                if long_name is not None:
                    raise TarIndexError(f"{where}: two GNU long names for one member")
                long_name = data[:-1] if data.endswith(b"\0") else data
            elif typ == b"K":
                if long_link is not None:
                    raise TarIndexError(f"{where}: two GNU long link names for one member")
                long_link = data[:-1] if data.endswith(b"\0") else data
            else:
                if pax is not None:
                    raise TarIndexError(f"{where}: two PAX headers for one member")
                pax = _pax_records(data, where)
            pending_at = pos
            pos = nxt
            continue
        if is_ustar:
            prefix = _field_str(header[345:500])
            hname = _field_str(header[0:100])
            hpath = prefix + b"/" + hname if prefix else hname
        else:
            hpath = _field_str(header[0:100])
        path = long_name if long_name is not None else (pax or {}).get(b"path", hpath)
        header_link = _field_str(header[157:257])
        if long_link is not None:
            link: bytes | None = long_link
        elif pax is not None and b"linkpath" in pax:
            link = pax[b"linkpath"]
        else:
            link = header_link or None
        try:
            mode: int | None = _octal(header[100:108], "mode", where)
        except TarIndexError:
            mode = None
        devmajor = devminor = None
        if (is_ustar or is_gnu) and typ in (b"3", b"4"):
            try:
                devmajor = _octal(header[329:337], "devmajor", where) & 0xFFFFFFFF
                devminor = _octal(header[337:345], "devminor", where) & 0xFFFFFFFF
            except TarIndexError:
                devmajor = devminor = None
        yield TarEntry(
            header_offset=pos,
            data_offset=data_off,
            type=typ,
            path=path,
            link=link,
            header_link=header_link,
            mode=mode,
            uid=_number(header[108:116], "uid", where),
            gid=_number(header[116:124], "gid", where),
            mtime=_number(header[136:148], "mtime", where),
            size=size,
            devmajor=devmajor,
            devminor=devminor,
        )
        long_name = long_link = None
        pax = None
        pending_at = -1
        pos = nxt
    if pending_at >= 0:
        raise TarIndexError(
            f"{name}: extension header at offset {pending_at} describes a member that never comes"
        )


def _round512(n: int) -> int:
    return (n + 511) & ~511


# ---------------------------------------------------------------------------------------------
# the tree


class _Node:
    __slots__ = (
        "children",
        "flags",
        "gid",
        "ino",
        "mode",
        "mtime",
        "offset",
        "size",
        "uid",
    )

    def __init__(self, mode: int = 0) -> None:
        self.mode = mode
        self.flags = 0
        self.uid = 0
        self.gid = 0
        self.mtime = 0
        self.size = 0
        self.offset = 0
        self.children: dict[bytes, _Node] = {}
        self.ino = 0


def _clean(path: bytes) -> list[bytes] | None:
    """Path components with empty parts, ``.`` and ``..`` resolved; None if it escapes the root."""
    out: list[bytes] = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not out:
                return None
            out.pop()
        else:
            out.append(part)
    return out


@dataclass(slots=True)
class _Tree:
    name: str
    version: int
    root: _Node = field(default_factory=lambda: _Node(S_IFDIR | 0o555))
    specials: list[bytes] = field(default_factory=list)  # long symlink targets, in tar order
    skipped: int = 0

    def _walk(self, parts: list[bytes], where: str) -> _Node:
        """The node at ``parts``, creating mode-0 nodes for whatever is missing.

        Entries below a regular file are refused: a regular file can be hardlinked, and a
        hardlink placed below itself would make the tree a cycle (the reference loops forever).
        Entries below other non-directories are kept, invisible, as the reference keeps them.
        """
        node = self.root
        for i, part in enumerate(parts):
            if (node.mode & S_IFMT) == S_IFREG:
                raise TarIndexError(
                    f"{where}: path goes through "
                    f"{b'/'.join(parts[:i]).decode(errors='replace') or '/'!r}, a regular file"
                )
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Node()
            node = child
        return node

    def _place(self, parts: list[bytes], node: _Node, where: str) -> None:
        if not parts:
            self.root = node
            return
        parent = self._walk(parts[:-1], where)
        if (parent.mode & S_IFMT) == S_IFREG:
            raise TarIndexError(f"{where}: the parent of {parts[-1]!r} is a regular file")
        parent.children[parts[-1]] = node

    def add(self, e: TarEntry) -> None:
        where = (
            f"{self.name}: entry {e.path.decode(errors='replace')!r} at offset {e.header_offset}"
        )
        t = e.type
        if t == _GLOBAL:
            log.warning("%s: PAX global header skipped", where)
            return
        if t not in (b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6"):
            raise TarIndexError(f"{where}: type {t!r} is {_UNSUPPORTED}")
        if e.mode is None:
            raise TarIndexError(f"{where}: mode: expected an octal number")
        if t == b"1":
            self._hardlink(e, where)
            return
        # first what the entry is (some are skipped), then where it goes, as the reference does
        perms = e.mode & 0o777
        size = offset = 0
        special: bytes | None = None
        if t in (b"0", b"\0"):
            mode, size, offset = S_IFREG | perms, e.size, e.data_offset
        elif t == b"5":
            mode = S_IFDIR | perms
        elif t == b"6":
            mode = S_IFIFO | perms
        elif t in (b"3", b"4"):
            if e.devmajor is None or e.devminor is None:
                return self._skip(where, "device without major/minor numbers")
            mode = (S_IFCHR if t == b"3" else S_IFBLK) | perms
            offset = e.devminor | (e.devmajor << 32)
        else:  # symlink
            if not e.link:
                return self._skip(where, "symlink without a target")
            mode, size = S_IFLNK | perms, len(e.link)
            if e.link == e.header_link:
                offset = e.header_offset + 157
            elif self.version == 1:
                return self._skip(where, "symlink target longer than the tar header (v1)")
            else:
                special = e.link  # laid out in the string area; offset given when writing
        parts = _clean(e.path)
        if parts is None:
            return self._skip(where, "path escapes the root")
        if parts and parts[-1] == _OPAQUE:
            self._walk(parts[:-1], where).flags |= FLAG_OPAQUE
            return None
        if parts and parts[-1].startswith(_WHITEOUT):
            victim = self._walk([*parts[:-1], parts[-1][len(_WHITEOUT) :]], where)
            victim.children = {}
            victim.mode = (victim.mode & ~S_IFMT) | S_IFCHR
            victim.size = 0
            victim.offset = 0
            return None
        # overwrite in place: a hardlink sharing this node sees the new content too
        node = self._walk(parts, where)
        node.mode, node.size, node.offset = mode, size, offset
        node.uid, node.gid, node.mtime = e.uid & 0xFFFFFFFF, e.gid & 0xFFFFFFFF, e.mtime
        node.flags = 0
        node.children = {}
        if special is not None:
            self.specials.append(special)
        return None

    def _skip(self, where: str, why: str) -> None:
        log.warning("%s: %s; skipped", where, why)
        self.skipped += 1

    def _hardlink(self, e: TarEntry, where: str) -> None:
        # the reference order: resolve the target (creating what is missing), check it is a
        # file, and only then look at the new name
        if not e.link:
            log.warning("%s: hardlink without a target; skipped", where)
            self.skipped += 1
            return
        tparts = _clean(e.link)
        if tparts is None:
            log.warning("%s: hardlink target escapes the root; skipped", where)
            self.skipped += 1
            return
        target = self._walk(tparts, where)
        if (target.mode & S_IFMT) != S_IFREG:
            log.warning("%s: hardlink target is not a regular file; skipped", where)
            self.skipped += 1
            return
        parts = _clean(e.path)
        if parts is None:
            log.warning("%s: path escapes the root; skipped", where)
            self.skipped += 1
            return
        if target.children:  # pragma: no cover - _walk never puts entries below a file
            raise TarIndexError(f"{where}: hardlink target has entries below it")
        self._place(parts, target, where)


@dataclass(frozen=True, slots=True)
class IndexStats:
    """What :func:`build_index` produced."""

    tar_size: int  # C: where the inode table starts
    inodes: int
    index_size: int  # bytes appended after the tar, trailer block included
    skipped: int


def _bfs(root: _Node) -> list[_Node]:
    order: list[_Node] = []
    queue = deque([root])
    while queue:
        node = queue.popleft()
        order.append(node)
        queue.extend(node.children[k] for k in sorted(node.children))
    return order


def build_index(tree: _Tree, tar_size: int) -> tuple[bytes, IndexStats]:
    """The bytes to append after a ``tar_size``-byte tar: tables, strings, padding, trailer."""
    order = _bfs(tree.root)
    n = 0
    for node in order:
        if not node.ino:
            n += 1
            node.ino = n
    cursor = tar_size + INODE.size * n
    dirs = []
    for node in order:
        if (node.mode & S_IFMT) == S_IFDIR:
            node.offset = cursor
            node.size = DIRENT.size * len(node.children)
            cursor += node.size
            dirs.append(node)
    dirent_end = cursor
    sym_cursor = dirent_end
    inodes = bytearray()
    written: set[int] = set()
    for node in order:
        if node.ino in written:
            continue
        written.add(node.ino)
        if (node.mode & S_IFMT) == S_IFLNK and node.offset == 0:
            node.offset = sym_cursor
            sym_cursor += node.size
        inodes += INODE.pack(
            node.mode & 0xFFFF,
            node.flags,
            (node.mtime >> 32) & 0xF,
            node.uid,
            node.gid,
            node.mtime & 0xFFFFFFFF,
            node.size,
            node.offset,
        )
    name_cursor = sym_cursor
    dirents = bytearray()
    names = bytearray()
    for d in dirs:
        for key in sorted(d.children):
            child = d.children[key]
            dirents += DIRENT.pack(
                child.ino, name_cursor, len(key), _DT.get(child.mode & S_IFMT, 0)
            )
            name_cursor += len(key)
            names += key
    targets = b"".join(tree.specials)
    body = bytes(inodes) + bytes(dirents) + targets + bytes(names)
    # the reference adds the string lengths to an end that already includes them
    end = name_cursor + len(targets) + len(names)
    padded = -(-end // BLOCK) * BLOCK
    out = bytearray(body)
    out += bytes(padded - tar_size - len(out))
    trailer = bytearray(BLOCK)
    SUPER.pack_into(trailer, TRAILER_OFFSET, tar_size, n)
    out += trailer
    return bytes(out), IndexStats(tar_size, n, len(out), tree.skipped)


def index_tar(
    f: BinaryIO, total: int, *, name: str = "tar", version: int = 2
) -> tuple[bytes, IndexStats]:
    """Read the tar in ``f`` and return the index to append and its statistics."""
    if version not in (1, 2):
        raise TarIndexError(f"tarindex version: expected 1 or 2, found {version}")
    tree = _Tree(name, version)
    for entry in read_tar(f, total, name):
        tree.add(entry)
    return build_index(tree, total)


def append_index(path: str | os.PathLike[str], *, version: int = 2) -> IndexStats:
    """Append the tarfs index to the tar file at ``path`` in place (what tarindex does)."""
    with open(path, "r+b") as f:
        total = os.fstat(f.fileno()).st_size
        index, stats = index_tar(f, total, name=os.fspath(path), version=version)
        f.seek(total)
        f.write(index)
    return stats
