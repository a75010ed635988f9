"""A throwaway swtpm (socket mode) for tests and benchmarks: ``with start_swtpm(dir) as tcti``."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of loopback ports")


def _try_start(state: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port_pair()
    proc = subprocess.Popen(
        [
            "swtpm", "socket", "--tpm2",
            "--tpmstate", f"dir={state}",
            "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--flags", "not-need-init,startup-clear",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"swtpm exited: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"swtpm:host=127.0.0.1,port={port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("swtpm did not start listening")


@contextlib.contextmanager
def start_swtpm(state: Path) -> Iterator[str]:
    """A fresh TPM with its state in ``state`` (created); yields its TCTI string.

    Retried, since another process may take the port pair between the probe and the bind."""
    state.mkdir(parents=True)
    for attempt in range(3):
        try:
            proc, tcti = _try_start(state)
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        yield tcti
    finally:
        proc.terminate()
        proc.wait(timeout=5)
