"""The native block-hashing loop of dm-verity (``_blockhash.c``), built at first use.

:func:`hash_blocks` returns a function that hashes ``count`` blocks of a buffer in C (one call,
no Python per block, the GIL released so threads hash in parallel), or None when it cannot be
had: then :mod:`coco.integrity.verity` keeps its pure-Python loop, which gives the same bytes.

The library is compiled once with the system C compiler (``$CC``, else ``cc``) against the
libcrypto that Python's own ``hashlib`` uses, into ``$XDG_CACHE_HOME/coco/native/<digest>/``
(the digest covers the source, the libcrypto and the Python build, so any change builds anew),
written to a temporary name and renamed, so concurrent first uses are safe. Nothing is
downloaded. ``COCO_NATIVE=0`` disables it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from coco.files import cache_dir

_SOURCE = Path(__file__).with_name("_blockhash.c")
_lock = threading.Lock()
_loaded: list[Callable[..., int] | None] = []  # [] not tried yet; [None] not available

HashBlocks = Callable[[str, object, int, int, bytes, int, object, int], None]


def _libcrypto() -> str | None:
    """The path of the libcrypto this process's ``hashlib`` is linked with."""
    import _hashlib  # noqa: F401  (loads libcrypto into the process)

    with open("/proc/self/maps") as f:
        for line in f:
            path = line.rsplit(None, 1)[-1]
            if "/libcrypto.so" in path:
                return path
    return None


def _cache_dir() -> Path:
    return cache_dir("native")


def _build(target: Path, crypto: str) -> None:
    import subprocess
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC") or "cc"
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(_SOURCE), crypto],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> Callable[..., int] | None:
    if os.environ.get("COCO_NATIVE") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        crypto = _libcrypto()
        if crypto is None:
            return None
        h = hashlib.sha256(_SOURCE.read_bytes())
        h.update(f"\0{crypto}\0{os.stat(crypto).st_mtime_ns}\0{sys.version}".encode())
        target = _cache_dir() / h.hexdigest()[:32] / "blockhash.so"
        if not target.exists():
            _build(target, crypto)
        fn = ctypes.CDLL(str(target)).coco_hash_blocks
    except Exception:  # no compiler, no libcrypto, a failed build: the Python loop does it
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ctypes.c_char_p,  # digest name
        ctypes.c_void_p,  # buffer
        ctypes.c_size_t,  # block size
        ctypes.c_size_t,  # count
        ctypes.c_char_p,  # salt
        ctypes.c_size_t,  # salt length
        ctypes.c_int,  # salt first
        ctypes.c_void_p,  # out
        ctypes.c_size_t,  # digest size
    ]
    return fn  # type: ignore[no-any-return]


def native() -> Callable[..., int] | None:
    """The C function (built and loaded on the first call), or None."""
    with _lock:
        if not _loaded:
            _loaded.append(_load())
        return _loaded[0]


def address(buf: bytes | bytearray | memoryview | object) -> tuple[int, object]:
    """The address of ``buf`` and an object to keep alive while it is used: ``bytes`` or any
    writable buffer (bytearray, an ``ACCESS_COPY`` mmap: private pages, never copied unless
    written). Release the holder before closing an mmap."""
    if isinstance(buf, bytes):
        return ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value or 0, buf
    mv = memoryview(buf)  # type: ignore[arg-type]
    arr = (ctypes.c_char * mv.nbytes).from_buffer(mv)
    return ctypes.addressof(arr), arr
