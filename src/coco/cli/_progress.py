"""What the CLI shows while long work runs: rich bars per blob and a spinner, on a terminal only.

Nothing is drawn when stderr is piped or ``--quiet`` is given, and rich is imported only when
something is drawn.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


def on_terminal(quiet: bool = False, stream: TextIO | None = None) -> bool:
    """Whether progress is wanted: not ``quiet`` and ``stream`` (stderr) is a terminal."""
    s = stream or sys.stderr
    return not quiet and hasattr(s, "isatty") and s.isatty()


class RichProgress:
    """A :class:`coco.oci.copy.Progress` drawing one bar per blob on ``stream`` (a terminal)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(file=stream or sys.stderr),
            transient=False,
        )
        self._lock = threading.Lock()

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def task(self, description: str, total: int | None) -> _Task:
        with self._lock:
            tid = self._progress.add_task(description[:60], total=total)
        return _Task(self._progress, tid)


class _Task:
    def __init__(self, progress: Progress, tid: TaskID) -> None:
        self._p = progress
        self._tid = tid

    def advance(self, n: int) -> None:
        self._p.advance(self._tid, n)

    def finish(self) -> None:
        """Nothing to do: a finished blob's bar shows how far it got."""


@contextlib.contextmanager
def bars(quiet: bool) -> Iterator[RichProgress | None]:
    """Per-blob bars on a terminal (``None`` when piped or quiet): ``progress=`` of a copy/pull."""
    if not on_terminal(quiet):
        yield None
        return
    with RichProgress() as progress:
        yield progress


@contextlib.contextmanager
def busy(message: str) -> Iterator[None]:
    """A spinner on stderr while long work runs, only when stderr is a terminal."""
    if not on_terminal():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield
