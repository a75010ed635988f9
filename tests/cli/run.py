"""Run the real ``coco`` entry point in this process and capture what it writes (the tests' stand-in
for click's CliRunner): exit code, stdout (text and bytes) and stderr."""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass


@dataclass
class Result:
    exit_code: int
    stdout_bytes: bytes
    stderr: str

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode()

    @property
    def output(self) -> str:
        """stdout then stderr (stderr is empty when a command succeeds quietly)."""
        return self.stdout + self.stderr


def invoke(argv: list[str]) -> Result:
    from coco.cli.main import main

    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            out.flush()
    assert sys.stdout is not out
    return Result(code, raw.getvalue(), err.getvalue())
