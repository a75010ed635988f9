"""Fixtures: real ``coco kbs serve`` processes on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

VECTORS = Path("/work/shared/vectors/trustee")
ALLOW_ALL = "package policy\n\ndefault allow := true\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KbsProcess:
    def __init__(self, args: list[str], url: str, log: Path, env: dict[str, str] | None = None):
        self.args = args
        self.url = url
        self.log = log
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, verify: object = False) -> KbsProcess:
        self.logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coco.cli.main", *self.args],
            stdout=self.logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(self.env or {})},
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"KBS exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1, verify=verify).status_code == 200:  # type: ignore[arg-type]
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"KBS did not come up: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.logf.close()
        self.proc = None

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start_kbs(tmp_path: Path) -> Iterator[Callable[..., KbsProcess]]:
    """Start ``coco kbs serve`` with the given extra arguments (quick form by default)."""
    procs: list[KbsProcess] = []

    def start(*extra: str, config: Path | None = None, port: int | None = None,
              storage: str | None = None, env: dict[str, str] | None = None) -> KbsProcess:  # fmt: skip
        port = port or free_port()
        n = len(procs)
        if config is not None:
            args = ["kbs", "serve", "--config", str(config)]
            scheme = "http"
            text = config.read_text()
            if "insecure_http = false" in text:
                scheme = "https"
        else:
            db = storage or f"sqlite://{tmp_path}/kbs.db"
            args = ["kbs", "serve", "--listen", f"127.0.0.1:{port}", "--insecure-http",
                    "--storage", db, *extra]  # fmt: skip
            scheme = "http"
        p = KbsProcess(args, f"{scheme}://127.0.0.1:{port}", tmp_path / f"kbs{n}.log", env)
        procs.append(p)
        return p.start()

    yield start
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def open_kbs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KbsProcess]:
    """One KBS with an open admin API (InsecureAllowAll) and SQLite storage, shared by a module."""
    d = tmp_path_factory.mktemp("kbs")
    port = free_port()
    p = KbsProcess(
        ["kbs", "serve", "--listen", f"127.0.0.1:{port}", "--insecure-http",
         "--storage", f"sqlite://{d}/kbs.db", "--session-storage", f"sqlite://{d}/kbs.db", "--max-body-mb", "1", "--max-header-kb", "64"],
        f"http://127.0.0.1:{port}",
        d / "kbs.log",
    )  # fmt: skip
    p.db = d / "kbs.db"  # type: ignore[attr-defined]
    yield p.start()
    p.stop()


PG_AVAILABLE = Path("/usr/lib/postgresql/15/bin/initdb").exists()
