"""Snapshot every file of a directory tree, to assert that a failed write changed nothing."""

from __future__ import annotations

from pathlib import Path


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }
