"""The ``local`` sandbox (INSECURE): the guest services and the agent as processes on the host.

For development and CI on machines without virtualization; never a TEE, and it says so in the
log of every sandbox it starts. ``setpriv --pdeathsig KILL unshare --mount --pid --fork
--kill-child --mount-proc`` puts :mod:`.init` as pid 1 of a new PID and mount namespace: it
mounts private tmpfs over ``/run/kata-containers`` and ``/run/confidential-containers`` (so
nothing the agent writes reaches the host's), writes the initdata there as the pod VM's init does,
and runs ``coco aa serve``, ``coco cdh serve``, ``coco api-server serve`` and ``coco agent serve``
(on a Unix socket in the sandbox's state directory). When the shim dies, however it dies, the
kernel kills the namespace's pid 1 and with it every process inside, containers included; its
mounts go with the namespace.

Networks, as in a peer-pod VM: the AA and the CDH use the host's network (they reach the KBS and
the registries); the agent, hence every container, and the API server run in the pod's network
namespace (the sandbox spec's, from CNI; a private one with only ``lo`` when the spec names none),
so a container reaches its own pod's API server on ``127.0.0.1:8006`` and pods never share it.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from coco.host.podvm.pause import write_pause_bundle
from coco.host.runtime import SandboxError
from coco.host.runtime.sandbox import Sandbox, kill_if_same, start_time

log = logging.getLogger(__name__)

AGENT_SOCKET = "agent.sock"
NETNS = "coco.netns"  # the annotation the shim puts the pod's network namespace path in


def coco_command(configured: str = "") -> list[str]:
    """How to run ``coco``: the configured command, the script beside this Python, or PATH."""
    if configured:
        return configured.split()
    beside = Path(sys.executable).parent / "coco"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("coco")
    if found:
        return [found]
    return [sys.executable, "-c", "from coco.cli.main import entry; entry()"]


def pause_bundle(directory: Path) -> Path:
    """A pause bundle for the agent (what ``/pause_bundle`` is in the pod VM): ``config.json``
    and a ``rootfs`` with a static busybox that sleeps."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise SandboxError(
            "local sandbox: busybox not found (needed for the pause container): install the "
            "Debian package busybox-static, or set [hypervisor.local] pause_bundle"
        )
    return write_pause_bundle(directory, busybox)


class LocalSandbox(Sandbox):
    kind = "local"
    insecure = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def agent_socket(self) -> Path:
        return self.state_dir / AGENT_SOCKET

    def start(self, initdata: bytes | None, annotations: dict[str, str]) -> str:
        if self.proc is not None:
            raise SandboxError(f"local sandbox {self.sid}: already started")
        unshare = shutil.which("unshare")
        setpriv = shutil.which("setpriv")
        if unshare is None or setpriv is None:
            raise SandboxError("local sandbox: unshare and setpriv are needed (util-linux)")
        if len(str(self.agent_socket)) > 107:
            raise SandboxError(
                f"local sandbox {self.sid}: state dir {self.state_dir}: expected a path short "
                f"enough for a Unix socket, found {len(str(self.agent_socket))} bytes"
            )
        configured = self.config.sandbox.get("pause_bundle", "")
        pause = Path(configured) if configured else pause_bundle(self.state_dir / "pause_bundle")
        if initdata is not None:
            (self.state_dir / "initdata.toml").write_bytes(initdata)
        netns = annotations.get(NETNS, "")
        if netns and not Path(netns).exists():
            raise SandboxError(
                f"local sandbox {self.sid}: the pod's network namespace {netns}: expected a "
                "namespace file, found nothing there"
            )
        plan = {
            "coco": coco_command(self.config.coco),
            "netns": netns,
            "agent_socket": str(self.agent_socket),
            "pause_bundle": str(pause),
            "initdata": str(self.state_dir / "initdata.toml") if initdata is not None else "",
        }
        (self.state_dir / "plan.json").write_text(json.dumps(plan))
        cmd = [
            setpriv, "--pdeathsig", "KILL", "--",
            unshare, "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
            "--propagation", "private", "--",
            sys.executable, "-m", "coco.host.runtime.local.init", str(self.state_dir),
        ]  # fmt: skip
        log_path = self.state_dir / "sandbox.log"
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                cwd=self.state_dir,
            )
        self.save_state(pids=[[self.proc.pid, start_time(self.proc.pid)]])
        deadline = time.monotonic() + self.config.dial_timeout
        while not self.agent_socket.exists():
            if self.proc.poll() is not None:
                why = _tail(log_path)
                self.stop()
                raise SandboxError(
                    f"local sandbox {self.sid}: the guest services exited with status "
                    f"{self.proc.returncode} before the agent listened: {why or 'no output'}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise SandboxError(
                    f"local sandbox {self.sid}: the agent did not listen on {self.agent_socket} "
                    f"within {self.config.dial_timeout:g} s (log {log_path})"
                )
            time.sleep(0.05)
        return f"unix://{self.agent_socket}"

    def children(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def status(self) -> str:
        if self.proc is None:
            return "stopped"
        code = self.proc.poll()
        return "running" if code is None else f"failed: exited with status {code}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_if_same(self.proc.pid, start_time(self.proc.pid))
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.error("local sandbox %s: pid %d did not exit", self.sid, self.proc.pid)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def _tail(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


SANDBOX = LocalSandbox
