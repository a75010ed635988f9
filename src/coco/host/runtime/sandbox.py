"""The :class:`Sandbox` interface: where a pod's agent runs, and how the shim reaches it.

A sandbox kind is a folder beside this module (``local``, ``qemu``, ``remote``) whose package
exports ``SANDBOX``, a :class:`Sandbox` subclass. The shim calls :meth:`Sandbox.start` with the
pod's initdata and gets the agent's ttRPC address back; :meth:`Sandbox.stop` ends it. Each sandbox
keeps what a cleanup needs in ``sandbox.json`` in its state directory, so that ``shim delete``
after a crash (:func:`cleanup`) can stop what the dead shim left, without the shim's memory.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import signal
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from coco.host.runtime import SandboxError
from coco.host.runtime.config import KINDS, RuntimeConfig

log = logging.getLogger(__name__)

STATE_FILE = "sandbox.json"


class Sandbox(ABC):
    """One pod's sandbox. ``state_dir`` is private to it and removed by :meth:`stop`."""

    kind: str = ""
    insecure: bool = False

    def __init__(self, sid: str, state_dir: Path, config: RuntimeConfig) -> None:
        self.sid = sid
        self.state_dir = state_dir
        self.config = config
        self.pid = os.getpid()  # what containerd is told (kata: the VM's pid, remote: the shim's)

    @abstractmethod
    def start(self, initdata: bytes | None, annotations: dict[str, str]) -> str:
        """Start the sandbox with ``initdata`` (TOML bytes, or None) and return the agent's
        ttRPC address. Blocking; on failure nothing is left running."""

    @abstractmethod
    def stop(self) -> None:
        """Stop everything the sandbox started and remove its state directory. Idempotent."""

    @abstractmethod
    def status(self) -> str:
        """``running``, ``stopped`` or ``failed: <why>``."""

    def children(self) -> list[int]:
        """Pids of the child processes the sandbox waits for itself (the shim must not reap)."""
        return []

    # -- state a later cleanup can use ----------------------------------------------------------
    def save_state(self, **extra: Any) -> None:
        state = {"kind": self.kind, "sid": self.sid, **extra}
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.rename(self.state_dir / STATE_FILE)

    @classmethod
    def cleanup(cls, state_dir: Path, state: dict[str, Any], config: RuntimeConfig) -> None:
        """Stop what a dead shim's sandbox left (``state`` is its ``sandbox.json``)."""
        for pid, start in state.get("pids", []):
            kill_if_same(pid, start)
        shutil.rmtree(state_dir, ignore_errors=True)


def sandbox_class(kind: str) -> type[Sandbox]:
    if kind not in KINDS:
        raise SandboxError(f"sandbox kind {kind!r}: expected one of {', '.join(KINDS)}")
    module = importlib.import_module(f"coco.host.runtime.{kind}")
    return module.SANDBOX


def make(config: RuntimeConfig, sid: str) -> Sandbox:
    """The configured sandbox for pod ``sid``, its state directory created (mode 0700)."""
    cls = sandbox_class(config.kind)
    state_dir = config.state_dir / sid
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if cls.insecure:
        log.warning(
            "sandbox %s: the %s sandbox is INSECURE: the guest runs on the host, not in a TEE",
            sid,
            cls.kind,
        )
    return cls(sid, state_dir, config)


def cleanup(config: RuntimeConfig, sid: str) -> bool:
    """After a crash: stop what sandbox ``sid`` left behind; False when there was nothing."""
    state_dir = config.state_dir / sid
    try:
        state = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        if state_dir.is_dir():
            shutil.rmtree(state_dir, ignore_errors=True)
            return True
        return False
    sandbox_class(state.get("kind", config.kind)).cleanup(state_dir, state, config)
    return True


# -- processes by pid, never by name ----------------------------------------------------------------
def start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks (``/proc/PID/stat`` field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def kill_if_same(pid: int, start: int | None, grace: float = 5.0) -> None:
    """SIGTERM ``pid`` (its process group when it leads one), SIGKILL after ``grace`` s, if it
    is still the process that started at ``start``."""
    if start is None or start_time(pid) != start:
        return
    group = os.getpgid(pid) == pid if _alive(pid) else False
    _signal(pid, signal.SIGTERM, group)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if start_time(pid) != start or _zombie(pid):
            return
        time.sleep(0.05)
    _signal(pid, signal.SIGKILL, group)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _signal(pid: int, sig: int, group: bool) -> None:
    with contextlib.suppress(OSError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
