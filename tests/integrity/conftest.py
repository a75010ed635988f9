"""Shared helpers for the integrity tests: the real peers (veritysetup) and the vectors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

VECTORS = Path("/work/shared/vectors/tarfs")
ZERO_SALT = "00" * 32


def veritysetup(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("veritysetup")
    if exe is None:  # the bar is a real peer: fail loudly rather than skip
        pytest.fail("veritysetup (cryptsetup-bin) is not installed")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, check=False)


def root_of(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith("Root hash:"):
            return line.split("\t")[-1].strip()
    raise AssertionError(f"no Root hash line in {stdout!r}")


@pytest.fixture
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(f"test vectors missing: {VECTORS}")
    return VECTORS


def run_main(argv: list[str]) -> tuple[int, str]:
    """Run the real ``coco`` entry point; return (exit code, stderr)."""
    import contextlib
    import io

    from coco.cli.main import main

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = int(e.code or 0)
    return code, err.getvalue()
