"""Overlap reading a blob with its consumer: a reader thread feeding a bounded queue.

Used by ``coco image copy`` and ``coco image pull`` for every blob they stream. Exceptions raised
by the source (a digest mismatch at its end) re-raise in the consumer; when the consumer stops
early, or another layer failed (``cancel``), the reader stops too and the consumer gets
:class:`Cancelled`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any

from coco.errors import CocoError

_END = object()


class Cancelled(CocoError):
    """Another layer failed: this one stops quietly (the first error is the one reported)."""


def prefetch(
    it: Iterator[bytes],
    cancel: threading.Event,
    task: Any = None,
    *,
    stop: threading.Event | None = None,
    depth: int = 4,
) -> Iterator[bytes]:
    """Iterate ``it`` in a reader thread, at most ``depth`` chunks ahead of the consumer.

    ``cancel`` ends every stream of an operation; ``stop`` (made here when not given) ends this
    one, and is set when the consumer finishes or gives up. ``task`` (a progress task) advances by
    each chunk handed over and is finished at the end.
    """
    q: queue.Queue[object] = queue.Queue(depth)
    halt = stop if stop is not None else threading.Event()

    def put(item: object) -> bool:
        while not halt.is_set() and not cancel.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for chunk in it:
                if not put(chunk):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer
            put(e)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    threading.Thread(target=reader, name="coco-blob-reader", daemon=True).start()

    def consume() -> Iterator[bytes]:
        try:
            while True:
                if cancel.is_set() or halt.is_set():
                    raise Cancelled
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, bytes)
                if task is not None:
                    task.advance(len(item))
                yield item
        finally:
            halt.set()
            if task is not None:
                task.finish()

    return consume()
