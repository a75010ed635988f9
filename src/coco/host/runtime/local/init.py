"""Pid 1 of a ``local`` sandbox's PID and mount namespace (run by :mod:`coco.host.runtime.local`).

``python -m coco.host.runtime.local.init STATE_DIR`` reads ``STATE_DIR/plan.json``, mounts
private tmpfs over the guest's run directories, writes the initdata files where the pod VM's init
puts them, starts the AA (sample attester: the host is no TEE) and the CDH in the host's network,
then enters the pod's network namespace (the plan's ``netns``; a new one with ``lo`` up when
none) and starts the API server (``127.0.0.1:8006`` there) and the agent, and then reaps. It exits when the agent exits, or on SIGTERM after stopping the services; the kernel then
kills whatever is left in the namespace.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from coco.errors import CocoError
from coco.integrity.initdata import Initdata

RUN_DIRS = ("/run/kata-containers", "/run/confidential-containers")
INITDATA_DIR = Path("/run/confidential-containers/initdata")
AA_SOCKET = "/run/confidential-containers/attestation-agent/attestation-agent.sock"
CDH_SOCKET = "/run/confidential-containers/cdh.sock"
SERVICE_TIMEOUT = 60.0
API_SERVER = ("127.0.0.1", 8006)
CLONE_NEWNET = 0x40000000


def say(text: str) -> None:
    print(f"coco local sandbox: {text}", file=sys.stderr, flush=True)


def private_run_dirs() -> None:
    for path in RUN_DIRS:
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", path], check=True)


def write_initdata(path: str) -> set[str]:
    raw = Path(path).read_bytes()
    doc = Initdata.parse(raw, path)
    INITDATA_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = {**{k: v.encode() for k, v in doc.data.items()}, "initdata.toml": raw}
    for name, content in files.items():
        if "/" in name or name in ("", ".", ".."):
            raise CocoError(f"initdata {path}: data: {name!r} is not a plain file name")
        (INITDATA_DIR / name).write_bytes(content)
    return set(files)


def enter_network(netns: str) -> str:
    """Move this process (and so the children it starts next) into the pod's network namespace
    ``netns``, or into a new one with ``lo`` up when it is empty; what it entered."""
    libc = ctypes.CDLL(None, use_errno=True)
    if netns:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise CocoError(f"entering the pod's network namespace {netns}: {os.strerror(err)}")
        finally:
            os.close(fd)
        return netns
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise CocoError(f"creating the pod's network namespace: {os.strerror(err)}")
    r = subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if r.returncode != 0:
        raise CocoError(f"bringing lo up in the pod's network namespace: {r.stderr.strip()}")
    return "a new network namespace"


def _listening(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=1).close()
    except OSError:
        return False
    return True


def start(
    coco: list[str], name: str, args: list[str], listen: str | tuple[str, int] | None
) -> subprocess.Popen:
    """Start ``coco ARGS``; wait until it listens on ``listen`` (a path or a TCP address)."""
    proc = subprocess.Popen([*coco, *args], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + SERVICE_TIMEOUT
    while listen is not None and not (
        _listening(listen) if isinstance(listen, tuple) else os.path.exists(listen)
    ):
        if proc.poll() is not None:
            raise CocoError(f"coco {name} exited with status {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise CocoError(f"coco {name} did not listen on {listen} within {SERVICE_TIMEOUT} s")
        time.sleep(0.05)
    say(f"{name} started (pid {proc.pid})")
    return proc


def main(state_dir: str) -> int:
    state = Path(state_dir)
    plan = json.loads((state / "plan.json").read_text())
    coco = plan["coco"]
    netns = plan.get("netns", "")
    stopping = False

    def on_term(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    say("INSECURE: this sandbox runs the guest on the host; it is not a TEE")
    private_run_dirs()
    files = write_initdata(plan["initdata"]) if plan["initdata"] else set()
    aa = ["aa", "serve", "--tee", "sample", "--attestation_sock", f"unix://{AA_SOCKET}"]
    if "initdata.toml" in files:
        aa += ["--initdata-toml", str(INITDATA_DIR / "initdata.toml")]
    if "aa.toml" in files:
        aa += ["--config-file", str(INITDATA_DIR / "aa.toml")]
    cdh = ["cdh", "serve", "--socket", f"unix://{CDH_SOCKET}"]
    if "cdh.toml" in files:
        cdh += ["--config", str(INITDATA_DIR / "cdh.toml")]
    agent_toml = state / "agent.toml"
    agent_toml.write_text(f"pause_bundle = {json.dumps(plan['pause_bundle'])}\n")
    agent = ["agent", "serve", "--config", str(agent_toml)]
    agent += ["--server-addr", f"unix://{plan['agent_socket']}"]
    if "policy.rego" in files:
        agent += ["--policy", str(INITDATA_DIR / "policy.rego")]
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start(coco, "aa", aa, AA_SOCKET))
        procs.append(start(coco, "cdh", cdh, CDH_SOCKET))
        say(f"the API server, the agent and the containers: network of {enter_network(netns)}")
        bind = f"{API_SERVER[0]}:{API_SERVER[1]}"
        api = ["api-server", "serve", "--bind", bind, "--cdh-addr", f"unix://{CDH_SOCKET}",
               "--aa-addr", f"unix://{AA_SOCKET}"]  # fmt: skip
        procs.append(start(coco, "api-server", api, API_SERVER))
        procs.append(start(coco, "agent", agent, None))
    except CocoError as e:
        say(f"error: {e}")
        stop(procs)
        return 1
    agent_proc = procs[-1]
    while not stopping:
        try:  # pid 1 reaps every orphan of the namespace
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.1)
            continue
        if pid == agent_proc.pid:
            agent_proc.returncode = os.waitstatus_to_exitcode(status)
            say(f"the agent exited with status {agent_proc.returncode}")
            break
    stop(procs)
    return 0


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        if proc.returncode is None and proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 5
    for proc in reversed(procs):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
