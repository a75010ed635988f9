"""Progress display for long copies: rich bars on a terminal, nothing when output is piped."""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)


class RichProgress:
    """A :class:`coco.oci.copy.Progress` drawing one bar per blob on ``stream`` (a terminal)."""

    def __init__(self, stream: TextIO | None = None) -> None:
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


def wants_progress(quiet: bool, stream: TextIO | None = None) -> bool:
    s = stream or sys.stderr
    return not quiet and hasattr(s, "isatty") and s.isatty()
