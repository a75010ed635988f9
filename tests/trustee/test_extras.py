"""Without an extra's package, the command that needs it says which extra to install, and binds
or creates nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trustee.conftest import free_port


def _coco_without(module: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from coco.cli.main import main\n"
        f"main({list(args)!r})\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=cwd)  # fmt: skip


@pytest.mark.parametrize(
    ("module", "extra", "storage"),
    [("httptools", "kbs", "memory://"), ("psycopg", "postgres", "postgresql://u@127.0.0.1:1/db")],
)
def test_missing_extra_is_one_line_naming_it(
    tmp_path: Path, module: str, extra: str, storage: str
) -> None:
    port = free_port()
    r = _coco_without(module, tmp_path, "kbs", "serve", "--listen", f"127.0.0.1:{port}",
                      "--insecure-http", "--storage", storage)  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert f"needs the Python package {module}" in r.stderr
    assert f"pip install 'confidential-containers[{extra}]'" in r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith("coco: error: ") and module in last
    assert r.stderr.count("error:") == 1 and "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []
