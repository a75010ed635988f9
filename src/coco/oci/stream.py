"""Overlap reading a stream with its consumer, and read a stream of chunks as a file.

:func:`prefetch` runs an iterator in a reader thread feeding a bounded queue: the one reader
queue of ``coco image copy`` and ``pull`` (every blob), of the layer cipher (the AES stage) and
of genpolicy (every layer). Exceptions raised by the source (a digest mismatch at its end)
re-raise in the consumer; when the consumer stops early, or another layer failed (``cancel``),
the reader stops too and the consumer gets :class:`Cancelled`.

:class:`ChunkReader` is a read-only file over an iterator of chunks: what the decompressors of
:mod:`coco.oci.compression` read from.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
from collections.abc import Iterable, Iterator

from coco.errors import CocoError

TYPE_CHECKING = False  # typing stays unloaded in short processes
if TYPE_CHECKING:
    from typing import Any, TypeVar

    T = TypeVar("T")
_END = object()


class Cancelled(CocoError):
    """Another layer failed: this one stops quietly (the first error is the one reported)."""


class _Failure:
    """An exception of the reader, handed to the consumer (never confused with an item)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(
    it: Iterable[T],
    cancel: threading.Event | None = None,
    task: Any = None,
    *,
    stop: threading.Event | None = None,
    depth: int = 4,
    name: str = "coco-blob-reader",
) -> Iterator[T]:
    """Iterate ``it`` in a reader thread, at most ``depth`` items ahead of the consumer.

    ``cancel`` ends every stream of an operation; ``stop`` (made here when not given) ends this
    one, and is set when the consumer finishes or gives up. ``task`` (a progress task) advances by
    the length of each item handed over and is finished at the end.
    """
    q: queue.Queue[object] = queue.Queue(depth)
    halt = stop if stop is not None else threading.Event()
    never = threading.Event()
    cancelled = cancel if cancel is not None else never

    def put(item: object) -> bool:
        while not halt.is_set() and not cancelled.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for item in it:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer
            put(_Failure(e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    threading.Thread(target=reader, name=name, daemon=True).start()

    def consume() -> Iterator[T]:
        try:
            while True:
                if cancelled.is_set() or halt.is_set():
                    raise Cancelled
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                if task is not None:
                    task.advance(len(item))  # type: ignore[arg-type]
                yield item  # type: ignore[misc]
        finally:
            halt.set()
            if task is not None:
                task.finish()

    return consume()


class ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks (what the decompressors read from)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._it = chunks
        self._buf = memoryview(b"")
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            if self.eof:
                return 0
            try:
                self._buf = memoryview(next(self._it))
            except StopIteration:
                self.eof = True
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if not self._buf and not self.eof:
            try:
                chunk = next(self._it)
            except StopIteration:
                self.eof = True
                return b""
            if len(chunk) <= size:
                return chunk
            self._buf = memoryview(chunk)
        out = bytes(self._buf[:size])
        self._buf = self._buf[size:]
        return out

    def leftover(self) -> int:
        """Read to the end (so end-of-stream checks run); return how many bytes were left."""
        n = len(self._buf)
        self._buf = memoryview(b"")
        for chunk in self._it:
            n += len(chunk)
        self.eof = True
        return n
