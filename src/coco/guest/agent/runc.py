"""``runc`` as the agent drives it: create/start/exec/kill/pause/resume/delete/state/events.

The container's stdio is runc's own (pipes the agent holds the other ends of), or, with a
terminal, a pty whose master runc hands over on a console socket. runc's error messages go to a
JSON log file as well, so a failure is reported from there, not from the container's stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

from coco.guest.agent.errors import AgentError


class RuncError(AgentError):
    """runc refused or failed; the message is runc's own last error line."""


class Runc:
    def __init__(self, exe: str, root: str) -> None:
        self.exe = exe
        self.root = root

    async def _run(
        self,
        args: Sequence[str],
        *,
        what: str,
        stdio: tuple[int, int, int] | None = None,
        log: Path | None = None,
        timeout: float = 60.0,
    ) -> bytes:
        cmd = [self.exe, "--root", self.root]
        if log is not None:
            cmd += ["--log", str(log), "--log-format", "json"]
        cmd += list(args)
        kw: dict = {}
        if stdio is None:
            kw = {"stdin": asyncio.subprocess.DEVNULL, "stdout": asyncio.subprocess.PIPE,
                  "stderr": asyncio.subprocess.PIPE}  # fmt: skip
        else:
            kw = {"stdin": stdio[0], "stdout": stdio[1], "stderr": stdio[2]}
        try:
            proc = await asyncio.create_subprocess_exec(*cmd, **kw)
        except OSError as e:
            raise RuncError(f"{what}: cannot run {self.exe}: {e.strerror or e}") from None
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuncError(f"{what}: runc did not finish within {timeout:.0f} s") from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            raise
        if proc.returncode != 0:
            msg = _last_error(log) or (err or b"").decode(errors="replace").strip()
            msg = " ".join(msg.split()) or f"exit status {proc.returncode}"
            raise RuncError(f"{what}: {msg}")
        return out or b""

    async def create(
        self, cid: str, bundle: Path, stdio: tuple[int, int, int], console_socket: str | None
    ) -> int:
        pid_file = bundle / "init.pid"
        args = ["create", "--bundle", str(bundle), "--pid-file", str(pid_file)]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self._run([*args, cid], what=f"container {cid}: runc create", stdio=stdio,
                        log=bundle / "runc.log")  # fmt: skip
        return _read_pid(pid_file, cid)

    async def start(self, cid: str) -> None:
        await self._run(["start", cid], what=f"container {cid}: runc start")

    async def exec(
        self,
        cid: str,
        exec_id: str,
        process: dict,
        work: Path,
        stdio: tuple[int, int, int],
        console_socket: str | None,
    ) -> int:
        work.mkdir(parents=True, exist_ok=True)
        spec = work / f"exec-{exec_id}.json"
        pid_file = work / f"exec-{exec_id}.pid"
        spec.write_text(json.dumps(process))
        args = ["exec", "--detach", "--pid-file", str(pid_file), "--process", str(spec)]
        if console_socket:
            args += ["--console-socket", console_socket]
        try:
            await self._run([*args, cid], what=f"container {cid}: exec {exec_id}", stdio=stdio,
                            log=work / f"exec-{exec_id}.log")  # fmt: skip
            return _read_pid(pid_file, cid)
        finally:
            for p in (spec, pid_file, work / f"exec-{exec_id}.log"):
                with contextlib.suppress(OSError):
                    p.unlink()

    async def kill(self, cid: str, sig: int, *, all_processes: bool = False) -> None:
        args = ["kill", *(["--all"] if all_processes else []), cid, str(sig)]
        await self._run(args, what=f"container {cid}: runc kill")

    async def pause(self, cid: str) -> None:
        await self._run(["pause", cid], what=f"container {cid}: runc pause")

    async def resume(self, cid: str) -> None:
        await self._run(["resume", cid], what=f"container {cid}: runc resume")

    async def delete(self, cid: str) -> None:
        await self._run(["delete", "--force", cid], what=f"container {cid}: runc delete")

    async def state(self, cid: str) -> dict | None:
        try:
            out = await self._run(["state", cid], what=f"container {cid}: runc state")
        except RuncError:
            return None
        try:
            return json.loads(out)
        except ValueError:
            return None

    async def stats(self, cid: str) -> dict:
        out = await self._run(["events", "--stats", cid], what=f"container {cid}: runc events")
        try:
            return json.loads(out).get("data", {})
        except ValueError:
            raise RuncError(f"container {cid}: runc events: output is not JSON") from None

    async def pids(self, cid: str) -> list[int]:
        out = await self._run(["ps", "--format", "json", cid], what=f"container {cid}: runc ps")
        try:
            return [int(p) for p in json.loads(out) or []]
        except (ValueError, TypeError):
            raise RuncError(f"container {cid}: runc ps: output is not a JSON list") from None


def _read_pid(path: Path, cid: str) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError) as e:
        raise RuncError(f"container {cid}: runc wrote no usable pid file {path}: {e}") from None


def _last_error(log: Path | None) -> str:
    if log is None:
        return ""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("error", "fatal"):
            return str(entry.get("msg", ""))
    return ""


class ConsoleSocket:
    """A unix socket runc connects to, to hand over the pty master (``--console-socket``)."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="coco-agent-console-")
        self.path = os.path.join(self._dir, "console.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(1)
        self._sock.setblocking(False)

    async def receive(self) -> int:
        """The master fd runc sends (waits for runc to connect)."""
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self._sock)
        with conn:
            conn.setblocking(True)
            _, fds, _, _ = await asyncio.to_thread(socket.recv_fds, conn, 4096, 1)
        if not fds:
            raise AgentError("runc connected to the console socket but sent no pty")
        return fds[0]

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)
