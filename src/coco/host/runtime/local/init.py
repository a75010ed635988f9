"""Pid 1 of a ``local`` sandbox's PID and mount namespace (run by :mod:`coco.host.runtime.local`).

``python -m coco.host.runtime.local.init STATE_DIR`` reads ``STATE_DIR/plan.json``, mounts
private tmpfs over the guest's run directories, writes the initdata files where the pod VM's init
puts them, starts the AA (sample attester: the host is no TEE), the CDH and the agent, and then
reaps. It exits when the agent exits, or on SIGTERM after stopping the services; the kernel then
kills whatever is left in the namespace.
"""

from __future__ import annotations

import json
import os
import signal
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


def start(coco: list[str], name: str, args: list[str], socket: str | None) -> subprocess.Popen:
    proc = subprocess.Popen([*coco, *args], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + SERVICE_TIMEOUT
    while socket is not None and not os.path.exists(socket):
        if proc.poll() is not None:
            raise CocoError(f"coco {name} exited with status {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise CocoError(f"coco {name} did not listen on {socket} within {SERVICE_TIMEOUT} s")
        time.sleep(0.05)
    say(f"{name} started (pid {proc.pid})")
    return proc


def main(state_dir: str) -> int:
    state = Path(state_dir)
    plan = json.loads((state / "plan.json").read_text())
    coco = plan["coco"]
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
