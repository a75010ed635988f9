"""dm-verity hash trees, byte for byte as ``veritysetup format`` (cryptsetup 2.x) writes them.

The tree is computed over whole data blocks. Each hash is ``H(salt || block)`` (format 1) or
``H(block || salt)`` (format 0, Chrome OS). Hashes are packed into hash blocks; in format 1 every
hash takes the next power of two of its size, in format 0 they are packed back to back, and the unused
tail of a hash block is zero. Level 0 (hashes of data blocks) is stored last, the level with a
single block first; the root hash is the hash of that single block (or of the only data block when
there is just one). With a superblock, 512 bytes describing the parameters are written at the hash
offset and the tree starts on the next hash-block boundary; without one, the tree starts at hash
block ``hash_offset // hash_block_size``.

Level 0 dominates the cost. The block loop runs in C when :mod:`coco.integrity._native` can build
it (one thread per core, each reading its own range of the file 1 MiB at a time with ``pread``
and hashing it while it is in the cache); otherwise in
Python, large inputs by several processes over ``mmap`` slices of the file (one per core, the
calling process included). Both give the same bytes.

Public API: :class:`VerityParams`, :class:`VerityTree`, :class:`Superblock`, :func:`build_tree`,
:func:`format_file`, :func:`verify`, :func:`report`.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from coco.errors import VerityError, VerityMismatchError
from coco.integrity import _native

if TYPE_CHECKING:  # uuid loads only for a superblock (a few ms of start-up otherwise)
    import uuid as uuidlib

__all__ = [
    "HASH_ALGORITHMS",
    "Superblock",
    "VerityParams",
    "VerityTree",
    "build_tree",
    "format_file",
    "read_superblock",
    "report",
    "tree_blocks",
    "verify",
]

HASH_ALGORITHMS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")
SUPERBLOCK_SIZE = 512
MAX_SALT_SIZE = 256
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 512 * 1024
_SB_MAGIC = b"verity\0\0"
_SB_VERSION = 1
_SB = struct.Struct("<8sII16s32sIIQH6s256s168s")
assert _SB.size == SUPERBLOCK_SIZE

#: inputs at least this large are hashed by several processes
PARALLEL_THRESHOLD = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class VerityParams:
    """The options of ``veritysetup format``; defaults are veritysetup's, except the salt.

    ``data_blocks`` ``None`` means: as many whole blocks as the data file holds. ``uuid`` is only
    used with a superblock; ``None`` there means a random one is made by :func:`format_file`.
    """

    hash_name: str = "sha256"
    data_block_size: int = 4096
    hash_block_size: int = 4096
    salt: bytes = b""
    hash_type: int = 1
    hash_offset: int = 0
    data_blocks: int | None = None
    superblock: bool = True
    uuid: uuidlib.UUID | None = None

    def __post_init__(self) -> None:
        if self.hash_name not in HASH_ALGORITHMS:
            raise VerityError(
                f"hash algorithm: expected one of {', '.join(HASH_ALGORITHMS)}, "
                f"found {self.hash_name!r}"
            )
        for what, bs in (
            ("data block size", self.data_block_size),
            ("hash block size", self.hash_block_size),
        ):
            if (
                not isinstance(bs, int)
                or bs < MIN_BLOCK_SIZE
                or bs > MAX_BLOCK_SIZE
                or bs & (bs - 1)
            ):
                raise VerityError(
                    f"{what}: expected a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}, "
                    f"found {bs}"
                )
        if self.hash_type not in (0, 1):
            raise VerityError(f"format (hash type): expected 0 or 1, found {self.hash_type}")
        if len(self.salt) > MAX_SALT_SIZE:
            raise VerityError(
                f"salt: expected at most {MAX_SALT_SIZE} bytes, found {len(self.salt)}"
            )
        if self.hash_offset < 0 or self.hash_offset % 512:
            raise VerityError(
                f"hash offset: expected a non-negative multiple of 512, found {self.hash_offset}"
            )
        if self.data_blocks is not None and self.data_blocks < 1:
            raise VerityError(f"data blocks: expected at least 1, found {self.data_blocks}")

    @property
    def digest_size(self) -> int:
        return hashlib.new(self.hash_name).digest_size


@dataclass(frozen=True, slots=True)
class _Geometry:
    """Where each level of the tree lives, in hash blocks from the start of the hash file."""

    digest_size: int
    stride: int  # bytes a hash takes inside a hash block
    per_block: int  # hashes per hash block
    area_block: int  # first hash block of the tree
    level_start: tuple[int, ...]  # index 0 = the level that hashes the data blocks
    level_size: tuple[int, ...]

    @property
    def hash_blocks(self) -> int:
        return sum(self.level_size)


def _geometry(p: VerityParams, data_blocks: int) -> _Geometry:
    ds = p.digest_size
    bits = (p.hash_block_size // ds).bit_length() - 1
    per_block = 1 << bits
    stride = (1 << (ds - 1).bit_length()) if p.hash_type == 1 else ds
    if p.superblock:
        area_block = -(-(p.hash_offset + SUPERBLOCK_SIZE) // p.hash_block_size)
    else:
        area_block = p.hash_offset // p.hash_block_size
    levels = 0
    while bits * levels < 64 and (data_blocks - 1) >> (bits * levels):
        levels += 1
    starts = [0] * levels
    sizes = [0] * levels
    pos = area_block
    for i in range(levels - 1, -1, -1):
        shift = (i + 1) * bits
        sizes[i] = (data_blocks + (1 << shift) - 1) >> shift
        starts[i] = pos
        pos += sizes[i]
    return _Geometry(ds, stride, per_block, area_block, tuple(starts), tuple(sizes))


def tree_blocks(params: VerityParams, data_blocks: int) -> int:
    """How many hash blocks the tree of ``data_blocks`` data blocks takes."""
    return _geometry(params, data_blocks).hash_blocks


@dataclass(frozen=True, slots=True)
class VerityTree:
    """A computed tree: the resolved parameters, the root hash and the tree bytes (top level first)."""

    params: VerityParams
    root_hash: bytes
    tree: bytes
    hash_blocks: int
    hash_area_offset: int

    @property
    def data_blocks(self) -> int:
        assert self.params.data_blocks is not None
        return self.params.data_blocks

    @property
    def hash_device_size(self) -> int:
        return self.hash_area_offset + self.hash_blocks * self.params.hash_block_size


@dataclass(frozen=True, slots=True)
class Superblock:
    """The 512-byte on-disk verity superblock (version 1)."""

    hash_type: int
    uuid: uuidlib.UUID
    hash_name: str
    data_block_size: int
    hash_block_size: int
    data_blocks: int
    salt: bytes

    def to_bytes(self) -> bytes:
        return _SB.pack(
            _SB_MAGIC,
            _SB_VERSION,
            self.hash_type,
            self.uuid.bytes,
            self.hash_name.encode(),
            self.data_block_size,
            self.hash_block_size,
            self.data_blocks,
            len(self.salt),
            b"",
            self.salt,
            b"",
        )

    @classmethod
    def parse(cls, raw: bytes, where: str) -> Superblock:
        """Parse 512 bytes; raise :class:`VerityError` naming ``where`` when they are not one."""
        if len(raw) < SUPERBLOCK_SIZE:
            raise VerityError(
                f"{where}: expected a {SUPERBLOCK_SIZE}-byte verity superblock, "
                f"found {len(raw)} bytes"
            )
        (magic, version, htype, uid, alg, dbs, hbs, nblocks, salt_size, _p1, salt, _p2) = (
            _SB.unpack(raw[:SUPERBLOCK_SIZE])
        )
        if magic != _SB_MAGIC:
            raise VerityError(f"{where}: expected the verity superblock magic, found {magic!r}")
        if version != _SB_VERSION:
            raise VerityError(f"{where}: expected superblock version 1, found {version}")
        if salt_size > MAX_SALT_SIZE:
            raise VerityError(f"{where}: salt size {salt_size} exceeds {MAX_SALT_SIZE}")
        name = alg.rstrip(b"\0")
        try:
            hash_name = name.decode("ascii").lower()
        except UnicodeDecodeError:
            raise VerityError(f"{where}: hash algorithm is not ASCII: {name!r}") from None
        import uuid as uuidlib

        sb = cls(htype, uuidlib.UUID(bytes=uid), hash_name, dbs, hbs, nblocks, salt[:salt_size])
        try:  # reuse the parameter checks
            sb.params(0)
        except VerityError as e:
            raise VerityError(f"{where}: {e}") from None
        return sb

    def params(self, hash_offset: int) -> VerityParams:
        return VerityParams(
            hash_name=self.hash_name,
            data_block_size=self.data_block_size,
            hash_block_size=self.hash_block_size,
            salt=self.salt,
            hash_type=self.hash_type,
            hash_offset=hash_offset,
            data_blocks=self.data_blocks,
            superblock=True,
            uuid=self.uuid,
        )


# ---------------------------------------------------------------------------------------------
# hashing


def _digest_native(
    fn: Callable[..., int], addr: int, bs: int, count: int, salt: bytes, htype: int, name: str
) -> bytes | None:
    """The native loop over ``count`` blocks at address ``addr``; None if OpenSSL refused."""
    size = hashlib.new(name).digest_size
    out = bytearray(count * size)
    out_addr, holder = _native.address(out)
    salt_first = 1 if htype == 1 else 0
    rc = fn(name.encode(), addr, bs, count, salt, len(salt), salt_first, out_addr, size)
    del holder
    return bytes(out) if rc == 0 else None


def _digest_buffer(
    buf: memoryview | bytes, start: int, bs: int, count: int, salt: bytes, htype: int, name: str
) -> bytes:
    """Hashes of ``count`` blocks of ``bs`` bytes of ``buf`` from ``start``, concatenated."""
    fn = _native.native() if isinstance(buf, bytes) else None
    if fn is not None and count:
        addr, holder = _native.address(buf)
        found = _digest_native(fn, addr + start, bs, count, salt, htype, name)
        del holder
        if found is not None:
            return found
    return _digest_python(buf, start, bs, count, salt, htype, name)


def _digest_python(
    buf: memoryview | bytes, start: int, bs: int, count: int, salt: bytes, htype: int, name: str
) -> bytes:
    """:func:`_digest_buffer` in Python (the fallback, and the reference in the tests)."""
    mv = memoryview(buf)
    end = start + count * bs
    if htype == 1 and salt:
        copy = hashlib.new(name, salt).copy
        out = []
        append = out.append
        for off in range(start, end, bs):
            h = copy()
            h.update(mv[off : off + bs])
            append(h.digest())
        return b"".join(out)
    new = getattr(hashlib, name)
    if htype == 1 or not salt:
        return b"".join([new(mv[off : off + bs]).digest() for off in range(start, end, bs)])
    out = []
    for off in range(start, end, bs):
        h = new(mv[off : off + bs])
        h.update(salt)
        out.append(h.digest())
    return b"".join(out)


def _digest_file_range(
    path: str, start: int, bs: int, count: int, salt: bytes, htype: int, name: str
) -> bytes:
    length = start + count * bs  # explicit: a block device has no st_size for mmap to use
    with open(path, "rb") as f, mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ) as mm:
        if hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_SEQUENTIAL)
        return _digest_buffer(mm, start, bs, count, salt, htype, name)


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_READ = 1 << 20  # bytes one native call hashes: read into a buffer that stays in the CPU cache


def _digest_file_native(
    fn: Callable[..., int], path: str, bs: int, count: int, p: VerityParams, n: int
) -> bytes | None:
    """Level 0 in C: ``n`` threads over contiguous ranges of the file, each reading its range
    with ``pread`` into its own 1 MiB buffer, hashed while it is still in the cache (a mapping of
    the file cost a fifth more CPU in page faults and unmapping), into its part of one output."""
    size = hashlib.new(p.hash_name).digest_size
    out = bytearray(count * size)
    out_addr, out_holder = _native.address(out)
    name, salt, salt_first = p.hash_name.encode(), p.salt, 1 if p.hash_type == 1 else 0
    per = max(1, _READ // bs)  # blocks per read
    refused: list[bool] = []
    errors: list[BaseException] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def work(first: int, last: int) -> None:
        buf = bytearray(per * bs)
        addr, holder = _native.address(buf)
        view = memoryview(buf)
        try:
            block = first
            while block < last and not errors and not refused:
                k = min(per, last - block)
                got, want = 0, k * bs
                while got < want:
                    r = os.preadv(fd, [view[got:want]], block * bs + got)
                    if r == 0:
                        raise VerityError(
                            f"{path}: expected {count * bs} bytes of data, found it ends at "
                            f"{block * bs + got}"
                        )
                    got += r
                rc = fn(
                    name, addr, bs, k, salt, len(salt), salt_first, out_addr + block * size, size
                )
                if rc != 0:
                    refused.append(True)
                block += k
        except BaseException as e:  # re-raised by the calling thread
            errors.append(e)
        finally:
            view.release()
            del holder

    try:
        if n <= 1 or count * bs < PARALLEL_THRESHOLD:
            work(0, count)
        else:
            cuts = [count * i // n for i in range(n + 1)]
            threads = [
                threading.Thread(target=work, args=(cuts[i], cuts[i + 1])) for i in range(1, n)
            ]
            for t in threads:
                t.start()
            work(0, cuts[1])
            for t in threads:
                t.join()
    finally:
        os.close(fd)
        del out_holder
    if errors:
        raise errors[0]
    return None if refused else bytes(out)


def _digest_file(path: str, bs: int, count: int, p: VerityParams, workers: int | None) -> bytes:
    """Hashes of the first ``count`` blocks of the file, on several cores when it is large."""
    n = _default_workers() if workers is None else max(1, workers)
    n = min(n, count)
    fn = _native.native()
    if fn is not None:
        found = _digest_file_native(fn, path, bs, count, p, n)
        if found is not None:
            return found
    if n <= 1 or count * bs < PARALLEL_THRESHOLD:
        return _digest_file_range(path, 0, bs, count, p.salt, p.hash_type, p.hash_name)
    # contiguous ranges; the calling process takes the first, the pool the others
    cuts = [count * i // n for i in range(n + 1)]
    import multiprocessing  # only here: importing them costs start-up time for small inputs
    from concurrent.futures import ProcessPoolExecutor

    # fork is cheapest, but forking a process that runs other threads can inherit a held lock
    method = "fork" if threading.active_count() == 1 else "forkserver"
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=n - 1, mp_context=ctx) as pool:
        futures = [
            pool.submit(
                _digest_file_range,
                path,
                cuts[i] * bs,
                bs,
                cuts[i + 1] - cuts[i],
                p.salt,
                p.hash_type,
                p.hash_name,
            )
            for i in range(1, n)
        ]
        first = _digest_file_range(path, 0, bs, cuts[1], p.salt, p.hash_type, p.hash_name)
        return b"".join([first, *(f.result() for f in futures)])


def _pack(digests: bytes, g: _Geometry, hbs: int) -> bytes:
    """Lay hashes out in hash blocks: each padded to the stride, each block zero-filled."""
    ds = g.digest_size
    if g.stride != ds:
        pad = bytes(g.stride - ds)
        digests = b"".join(digests[i : i + ds] + pad for i in range(0, len(digests), ds))
    chunk = g.per_block * g.stride
    if chunk == hbs:
        return digests + bytes(-len(digests) % hbs)
    parts = []
    for i in range(0, len(digests), chunk):
        piece = digests[i : i + chunk]
        parts.append(piece + bytes(hbs - len(piece)))
    return b"".join(parts)


def _unpack_entry(level: bytes, index: int, g: _Geometry, hbs: int) -> bytes:
    block, slot = divmod(index, g.per_block)
    off = block * hbs + slot * g.stride
    return level[off : off + g.digest_size]


# ---------------------------------------------------------------------------------------------
# public operations


def _size(path: Path, what: str) -> int:
    """Size of a regular file or block device; anything else is refused."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        if stat.S_ISBLK(st.st_mode):
            with open(path, "rb") as f:
                return f.seek(0, os.SEEK_END)
    except OSError as e:
        raise VerityError(f"{what} {path}: cannot read it: {e.strerror}") from None
    raise VerityError(f"{what} {path}: expected a regular file or a block device")


def _resolve(data_path: Path, p: VerityParams) -> VerityParams:
    size = _size(data_path, "data file")
    have = size // p.data_block_size
    if p.data_blocks is None:
        if have < 1:
            raise VerityError(
                f"data file {data_path}: expected at least one {p.data_block_size}-byte block, "
                f"found {size} bytes"
            )
        return replace(p, data_blocks=have)
    if p.data_blocks > have:
        raise VerityError(
            f"data file {data_path}: {p.data_blocks} blocks of {p.data_block_size} bytes asked, "
            f"the file holds {have} ({size} bytes)"
        )
    return p


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_overlap(data_path: Path, hash_path: Path | None, p: VerityParams, g: _Geometry) -> None:
    if hash_path is None or not _same_file(data_path, hash_path):
        return
    assert p.data_blocks is not None
    data_end = p.data_blocks * p.data_block_size
    hash_start = p.hash_offset if p.superblock else g.area_block * p.hash_block_size
    hash_end = (g.area_block + g.hash_blocks) * p.hash_block_size
    if hash_start < data_end and hash_end > hash_start:
        raise VerityError(
            f"{hash_path}: the hash area [{hash_start}, {hash_end}) overlaps the data area "
            f"[0, {data_end}); use a hash offset of at least {data_end}"
        )


def build_tree(
    data_path: str | os.PathLike[str],
    params: VerityParams,
    *,
    workers: int | None = None,
    _hash_path: Path | None = None,
) -> VerityTree:
    """Compute the tree and root hash of ``data_path`` without writing anything."""
    data_path = Path(data_path)
    p = _resolve(data_path, params)
    assert p.data_blocks is not None
    g = _geometry(p, p.data_blocks)
    _check_overlap(data_path, _hash_path, p, g)
    hbs = p.hash_block_size
    leaf = _digest_file(os.fspath(data_path), p.data_block_size, p.data_blocks, p, workers)
    levels: list[bytes] = []
    digests = leaf
    for _ in range(len(g.level_size)):
        packed = _pack(digests, g, hbs)
        levels.append(packed)
        digests = _digest_buffer(
            packed, 0, hbs, len(packed) // hbs, p.salt, p.hash_type, p.hash_name
        )
    # after the loop ``digests`` is the hash of the single top block, or of the single data block
    root = digests
    return VerityTree(
        params=p,
        root_hash=root,
        tree=b"".join(reversed(levels)),
        hash_blocks=g.hash_blocks,
        hash_area_offset=g.area_block * hbs,
    )


def format_file(
    data_path: str | os.PathLike[str],
    hash_path: str | os.PathLike[str],
    params: VerityParams,
    *,
    workers: int | None = None,
) -> VerityTree:
    """Write the tree (and the superblock unless disabled) to ``hash_path``, as veritysetup does.

    ``hash_path`` is created (mode 0600) when missing and only ever grown; bytes outside the
    superblock and the tree are left as they were. It may be ``data_path`` itself. On failure a
    file this call created is removed.
    """
    data_path, hash_path = Path(data_path), Path(hash_path)
    if params.superblock and params.uuid is None:
        import uuid as uuidlib

        params = replace(params, uuid=uuidlib.uuid4())
    tree = build_tree(data_path, params, workers=workers, _hash_path=hash_path)
    p = tree.params
    created = not hash_path.exists()
    try:
        fd = os.open(hash_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise VerityError(f"hash file {hash_path}: cannot open it: {e.strerror}") from None
    try:
        with os.fdopen(fd, "r+b") as f:
            if p.superblock:
                assert p.uuid is not None
                sb = Superblock(
                    p.hash_type,
                    p.uuid,
                    p.hash_name,
                    p.data_block_size,
                    p.hash_block_size,
                    tree.data_blocks,
                    p.salt,
                )
                f.seek(p.hash_offset)
                f.write(sb.to_bytes())
            f.seek(tree.hash_area_offset)
            f.write(tree.tree)
            f.seek(0, os.SEEK_END)
            # veritysetup grows the file to the end of the hash area unless that area is empty
            if (tree.hash_blocks or p.superblock) and f.tell() < tree.hash_device_size:
                f.truncate(tree.hash_device_size)
    except BaseException:
        if created:
            hash_path.unlink(missing_ok=True)
        raise
    return tree


def read_superblock(hash_path: str | os.PathLike[str], hash_offset: int = 0) -> Superblock:
    """Read and parse the superblock at ``hash_offset`` of ``hash_path``."""
    hash_path = Path(hash_path)
    try:
        with open(hash_path, "rb") as f:
            f.seek(hash_offset)
            raw = f.read(SUPERBLOCK_SIZE)
    except OSError as e:
        raise VerityError(f"hash file {hash_path}: cannot read it: {e.strerror}") from None
    return Superblock.parse(raw, f"hash file {hash_path} at offset {hash_offset}")


def verify(
    data_path: str | os.PathLike[str],
    hash_path: str | os.PathLike[str],
    root_hash: bytes,
    params: VerityParams,
    *,
    workers: int | None = None,
) -> VerityParams:
    """Check data and tree against ``root_hash``; return the parameters used.

    With ``params.superblock`` the parameters come from the superblock at ``params.hash_offset``.
    Checks go from the root down, the way the kernel trusts them: the top hash block against the
    root, each hash block against its entry in the level above, then each data block against its
    entry in level 0. The first block that does not match raises :class:`VerityMismatchError`
    naming it (level, index, byte offset in its file).
    """
    data_path, hash_path = Path(data_path), Path(hash_path)
    if params.superblock:
        sb = read_superblock(hash_path, params.hash_offset)
        params = sb.params(params.hash_offset)
    p = _resolve(data_path, params)
    assert p.data_blocks is not None
    if len(root_hash) != p.digest_size:
        raise VerityError(
            f"root hash: expected {p.digest_size} bytes for {p.hash_name}, found {len(root_hash)}"
        )
    g = _geometry(p, p.data_blocks)
    hbs = p.hash_block_size
    tree_off = g.area_block * hbs
    tree_len = g.hash_blocks * hbs
    try:
        with open(hash_path, "rb") as f:
            f.seek(tree_off)
            tree = f.read(tree_len)
    except OSError as e:
        raise VerityError(f"hash file {hash_path}: cannot read it: {e.strerror}") from None
    if len(tree) != tree_len:
        raise VerityError(
            f"hash file {hash_path}: expected {tree_len} bytes of hash tree at offset {tree_off}, "
            f"found {len(tree)}"
        )
    nlev = len(g.level_size)
    # levels[i] = stored bytes of level i (0 = leaves' level)
    levels = []
    for i in range(nlev):
        off = (g.level_start[i] - g.area_block) * hbs
        levels.append(tree[off : off + g.level_size[i] * hbs])

    def hash_blocks(buf: bytes) -> bytes:
        return _digest_buffer(buf, 0, hbs, len(buf) // hbs, p.salt, p.hash_type, p.hash_name)

    if nlev:
        top = hash_blocks(levels[nlev - 1])
        if top != root_hash:
            raise VerityMismatchError(
                f"hash file {hash_path}: hash block at offset "
                f"{g.level_start[nlev - 1] * hbs} (level {nlev - 1}, the top) does not match "
                f"the root hash: expected {root_hash.hex()}, found {top.hex()}"
            )
    for i in range(nlev - 1, 0, -1):
        child = levels[i - 1]
        got = hash_blocks(child)
        _compare(
            got,
            levels[i],
            g,
            hbs,
            lambda j, i=i: (
                f"hash file {hash_path}: hash block at offset {(g.level_start[i - 1] + j) * hbs} "
                f"(level {i - 1}, index {j})"
            ),
            f"hash file {hash_path}: level {i}",
        )
    leaf = _digest_file(os.fspath(data_path), p.data_block_size, p.data_blocks, p, workers)
    if nlev:
        _compare(
            leaf,
            levels[0],
            g,
            hbs,
            lambda j: f"data file {data_path}: data block {j} at offset {j * p.data_block_size}",
            f"hash file {hash_path}: level 0",
        )
    elif leaf != root_hash:
        raise VerityMismatchError(
            f"data file {data_path}: data block 0 at offset 0 does not match the root hash: "
            f"expected {root_hash.hex()}, found {leaf.hex()}"
        )
    return p


def _compare(
    got: bytes,
    parent: bytes,
    g: _Geometry,
    hbs: int,
    where_child: Callable[[int], str],
    where_parent: str,
) -> None:
    if _pack(got, g, hbs) == parent:
        return
    ds = g.digest_size
    for j in range(len(got) // ds):
        want = _unpack_entry(parent, j, g, hbs)
        have = got[j * ds : (j + 1) * ds]
        if want != have:
            raise VerityMismatchError(
                f"{where_child(j)} does not match its hash: expected {want.hex()}, "
                f"found {have.hex()}"
            )
    raise VerityMismatchError(  # all hashes match: the unused area is not zero
        f"{where_parent}: the unused area of a hash block is not zero"
    )


def report(tree: VerityTree, hash_path_display: str) -> str:
    """The lines ``veritysetup format`` prints, for ``tree`` written to ``hash_path_display``."""
    p = tree.params
    uuid = str(p.uuid) if p.superblock and p.uuid is not None else ""
    lines = [
        f"VERITY header information for {hash_path_display}",
        f"UUID:            \t{uuid}",
        f"Hash type:       \t{p.hash_type}",
        f"Data blocks:     \t{tree.data_blocks}",
        f"Data block size: \t{p.data_block_size}",
        f"Hash blocks:     \t{tree.hash_blocks}",
        f"Hash block size: \t{p.hash_block_size}",
        f"Hash algorithm:  \t{p.hash_name}",
        f"Salt:            \t{p.salt.hex() if p.salt else '-'}",
        f"Root hash:      \t{tree.root_hash.hex()}",
    ]
    if p.hash_offset == 0:
        lines.append(f"Hash device size: \t{tree.hash_device_size} [bytes]")
    return "\n".join(lines) + "\n"
