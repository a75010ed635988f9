"""A process's stdio: containerd's fifos on one side, the agent's stream calls on the other.

Output: ``ReadStdout``/``ReadStderr`` (32 KiB per call, long polls) until the agent answers empty
data (EOF), written to the stdout/stderr fifo; with no fifo the data is read and dropped so the
process never blocks on a full pipe. With a terminal only stdout is read (the pty carries both).
Input: the stdin fifo read and sent with ``WriteStdin``; at its EOF, ``CloseStdin``.
Fifos are opened in threads: opening one blocks until containerd opens the other end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from coco.rpc import RpcError
from coco.rpc.protos import agent_pb2

log = logging.getLogger(__name__)

CHUNK = 32 * 1024


async def _open(path: str, flags: int) -> int:
    return await asyncio.to_thread(os.open, path, flags | os.O_CLOEXEC)


async def copy_out(agent, method: str, cid: str, exec_id: str, path: str) -> None:
    """Copy one output stream until EOF; errors end the copy (and are logged)."""
    fd = await _open(path, os.O_WRONLY) if path else -1
    try:
        while True:
            try:
                reply = await getattr(agent, method)(
                    agent_pb2.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=CHUNK),
                    timeout=None,
                )
            except RpcError as e:
                log.debug("%s %s/%s ended: %s", method, cid, exec_id, e)
                return
            if not reply.data:
                return
            if fd >= 0:
                try:
                    await asyncio.to_thread(_write_all, fd, reply.data)
                except OSError as e:  # the reader went away: keep draining the process
                    log.info("%s %s/%s: fifo %s: %s", method, cid, exec_id, path, e)
                    os.close(fd)
                    fd = -1
    finally:
        if fd >= 0:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def copy_in(agent, cid: str, exec_id: str, path: str) -> None:
    """Copy the stdin fifo to the process until its EOF, then CloseStdin."""
    fd = await _open(path, os.O_RDONLY)
    try:
        while True:
            data = await asyncio.to_thread(os.read, fd, CHUNK)
            if not data:
                break
            await agent.WriteStdin(
                agent_pb2.WriteStreamRequest(container_id=cid, exec_id=exec_id, data=data)
            )
        await agent.CloseStdin(agent_pb2.CloseStdinRequest(container_id=cid, exec_id=exec_id))
    except RpcError as e:
        log.info("stdin of %s/%s: %s", cid, exec_id, e)
    finally:
        os.close(fd)


class Stdio:
    """The copiers of one process; :meth:`outputs_done` waits until both outputs hit EOF."""

    def __init__(self, stdin: str, stdout: str, stderr: str, terminal: bool) -> None:
        self.stdin, self.stdout, self.stderr, self.terminal = stdin, stdout, stderr, terminal
        self._out: list[asyncio.Task] = []
        self._in: asyncio.Task | None = None

    def start(self, agent, cid: str, exec_id: str) -> None:
        self._out.append(
            asyncio.create_task(copy_out(agent, "ReadStdout", cid, exec_id, self.stdout))
        )
        if not self.terminal:
            self._out.append(
                asyncio.create_task(copy_out(agent, "ReadStderr", cid, exec_id, self.stderr))
            )
        if self.stdin:
            self._in = asyncio.create_task(copy_in(agent, cid, exec_id, self.stdin))

    async def outputs_done(self) -> None:
        if self._out:
            await asyncio.gather(*self._out, return_exceptions=True)

    def close(self) -> None:
        for task in [*self._out, self._in]:
            if task is not None and not task.done():
                task.cancel()

    async def close_stdin(self) -> None:
        if self._in is not None and not self._in.done():
            self._in.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._in
