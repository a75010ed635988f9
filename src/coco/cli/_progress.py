"""What the CLI draws on a terminal: rich bars per blob and a spinner while long work runs, and
the readable form of ``coco image inspect`` (a summary and a layer table).

Nothing is drawn when the stream is piped or ``--quiet`` is given, and rich is imported only when
something is drawn.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

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


def print_image_table(view: dict[str, Any]) -> None:
    """``coco image inspect`` on a terminal: the skopeo fields as lines, then one row a layer."""
    import re

    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    platform = "/".join(str(view[k]) for k in ("Os", "Architecture", "Variant") if view.get(k))
    labels = view.get("Labels") or {}
    rows = [
        ("Name", view.get("Name", "")),
        ("Digest", view["Digest"]),
        ("Tags", ", ".join(view["RepoTags"])),
        ("Created", view.get("Created") or ""),
        ("Platform", platform),
        ("Labels", "\n".join(f"{k}={v}" for k, v in labels.items())),
        ("Env", "\n".join(view.get("Env") or [])),
    ]
    for key, value in rows:
        if value:
            summary.add_row(key, str(value))
    console.print(summary)
    layers = Table(box=box.SIMPLE_HEAD, title=f"Layers ({len(view['LayersData'])})")
    layers.title_justify = "left"
    layers.add_column("#", justify="right")
    layers.add_column("Digest", no_wrap=True)
    layers.add_column("Size", justify="right", no_wrap=True)
    layers.add_column("Type", no_wrap=True)
    for i, layer in enumerate(view["LayersData"], 1):
        kind = re.search(r"tar.*$", layer["MIMEType"])  # tar+gzip, tar.gzip, tar+zstd+encrypted
        mime = kind.group(0) if kind else layer["MIMEType"]
        short = layer["Digest"][:19]  # sha256: and 12 hex digits, as docker shows image ids
        layers.add_row(str(i), short, _human(layer["Size"]), mime)
    console.print(layers)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
