"""The CRI container log format, read and followed.

A runtime writes each container's stdout and stderr to ``<log directory>/<log path>``, one record a
line: ``<RFC 3339 time> <stdout|stderr> <P|F> <text>``. ``P`` marks a partial line (the runtime
split a long line, or the process wrote no newline yet), ``F`` the line's last piece. A
:class:`LogReader` turns the bytes written so far into whole lines with their stream, keeping an
incomplete record (or a ``P`` piece) until the rest arrives.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LogLine:
    stream: str  # "stdout" or "stderr"
    text: bytes  # without the newline
    time: str


def parse_record(record: bytes) -> tuple[str, str, bool, bytes] | None:
    """(time, stream, full, text) of one record, or None for a line that is not a record."""
    parts = record.split(b" ", 3)
    if len(parts) < 3 or parts[1] not in (b"stdout", b"stderr") or parts[2] not in (b"P", b"F"):
        return None
    text = parts[3] if len(parts) == 4 else b""
    return parts[0].decode("ascii", "replace"), parts[1].decode(), parts[2] == b"F", text


@dataclass
class LogReader:
    """Reads a CRI log file from where it stopped last time."""

    path: Path
    offset: int = 0
    _buf: bytes = b""
    _partial: dict[str, bytes] = field(default_factory=dict)

    def read(self, *, final: bool = False) -> Iterator[LogLine]:
        """The whole lines written since the last call; ``final``: also what is still partial."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        self.offset += len(data)
        self._buf += data
        *records, self._buf = self._buf.split(b"\n")
        for rec in records:
            parsed = parse_record(rec)
            if parsed is None:
                continue
            time, stream, full, text = parsed
            if not full:
                self._partial[stream] = self._partial.get(stream, b"") + text
                continue
            yield LogLine(stream, self._partial.pop(stream, b"") + text, time)
        if final:
            parsed = parse_record(self._buf) if self._buf else None
            self._buf = b""
            if parsed is not None:  # a record cut short: what it has is the line's end
                self._partial[parsed[1]] = self._partial.get(parsed[1], b"") + parsed[3]
            for stream, text in sorted(self._partial.items()):
                yield LogLine(stream, text, "")
            self._partial.clear()


def read_all(path: Path) -> list[LogLine]:
    return list(LogReader(path).read(final=True))
