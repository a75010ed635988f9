"""A container process as the agent tracks it: its pid, its exit, its stdio ends.

Without a terminal the agent holds the write end of stdin and the read ends of stdout and stderr;
with one, the pty master serves stdin and both output streams (the shim reads only stdout). The
agent is the processes' child subreaper, so it reaps them itself (a pidfd tells it when) and
reports ``128 + signal`` for a process killed by a signal, as agents >= 3.32 do.

Reads follow upstream: up to ``len`` bytes, empty data = end of stream; once the process has
exited, a stream that stays open (a child still holds it) is drained for at most 500 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import struct
import termios
import time

log = logging.getLogger(__name__)

DRAIN_SECONDS = 0.5
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt the orphaned container processes runc leaves behind (True when it worked)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except OSError:
        return False


def exit_code(status: int) -> int:
    """A wait status as the agent reports it: the exit code, or 128 + the signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 255


class Stream:
    """One readable fd (stdout, stderr or the pty master)."""

    def __init__(self, fd: int, proc: Process) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.proc = proc
        self.eof = False
        self.lock = asyncio.Lock()

    async def read(self, n: int) -> bytes:
        async with self.lock:
            return await self._read(max(1, n))

    async def _read(self, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        while True:
            if self.eof or self.fd < 0:
                return b""
            try:
                data = os.read(self.fd, n)
            except BlockingIOError:
                data = None
            except OSError as e:  # EIO: the pty's other side is gone
                if e.errno not in (errno.EIO, errno.EBADF):
                    log.info("process %s: read: %s", self.proc.exec_id, e)
                self.eof = True
                return b""
            if data is not None:
                if not data:
                    self.eof = True
                return data
            readable = loop.create_future()
            loop.add_reader(self.fd, _wake, readable)
            try:
                if self.proc.exited.is_set():
                    left = self.proc.exited_at + DRAIN_SECONDS - time.monotonic()
                    if left <= 0:
                        self.eof = True
                        return b""
                    await asyncio.wait([readable], timeout=left)
                else:
                    exited = asyncio.ensure_future(self.proc.exited.wait())
                    try:
                        await asyncio.wait([readable, exited], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        exited.cancel()
            finally:
                if self.fd >= 0:
                    loop.remove_reader(self.fd)
                readable.cancel()

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        self.eof = True


class Process:
    """A process of a container: the init process (``exec_id`` = container id) or an exec."""

    def __init__(
        self,
        exec_id: str,
        *,
        init: bool,
        stdin: int | None,
        stdout: int | None,
        stderr: int | None,
        tty: int | None,
    ) -> None:
        self.exec_id = exec_id
        self.init = init
        self.pid = 0
        self.tty = tty
        self._stdin = tty if tty is not None else stdin
        self.stdout = Stream(tty, self) if tty is not None else _maybe(stdout, self)
        self.stderr = None if tty is not None else _maybe(stderr, self)
        self.exited = asyncio.Event()
        self.exited_at = 0.0
        self.code: int | None = None
        self._pidfd = -1

    def watch(self, pid: int) -> None:
        """Start watching ``pid`` (a child of ours once runc exits) for its exit."""
        self.pid = pid
        loop = asyncio.get_running_loop()
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError as e:  # already reaped by someone else, or gone
            log.warning("process %s: pid %d: cannot watch it: %s", self.exec_id, pid, e)
            self._reaped(255)
            return
        loop.add_reader(self._pidfd, self._check_exit)
        self._check_exit()

    def _check_exit(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # not our child (no subreaper): learn only that it is gone
            if not os.path.exists(f"/proc/{self.pid}"):
                self._reaped(255)
            return
        if pid == self.pid:
            self._reaped(exit_code(status))

    def _reaped(self, code: int) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if not self.exited.is_set():
            self.code = code
            self.exited_at = time.monotonic()
            self.exited.set()
            log.info("process %s (pid %d) exited: %d", self.exec_id, self.pid, code)

    def stream(self, stdout: bool) -> Stream | None:
        if self.tty is not None:
            return self.stdout
        return self.stdout if stdout else self.stderr

    async def write(self, data: bytes) -> int:
        if self._stdin is None:
            raise OSError(errno.EBADF, "stdin is closed")
        view = memoryview(data)
        loop = asyncio.get_running_loop()
        while view:
            try:
                n = os.write(self._stdin, view)
                view = view[n:]
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_writer(self._stdin, _wake, ready)
                try:
                    await ready
                finally:
                    loop.remove_writer(self._stdin)
        return len(data)

    def close_stdin(self) -> None:
        if self._stdin is not None and self.tty is None:
            with contextlib.suppress(OSError):
                os.close(self._stdin)
        elif self.tty is not None:  # a terminal: send EOF (^D)
            with contextlib.suppress(OSError):
                os.write(self.tty, b"\x04")
        self._stdin = None

    def resize(self, rows: int, cols: int) -> None:
        if self.tty is None:
            raise OSError(errno.ENOTTY, "no tty")
        fcntl.ioctl(self.tty, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def signal(self, sig: int) -> None:
        """Send ``sig``; a process already gone is not an error (ESRCH ignored)."""
        if self.exited.is_set() or self.pid <= 0:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def handles(self, sig: int) -> bool:
        """Whether the process has a handler for ``sig`` (SigCgt in /proc/<pid>/status)."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("SigCgt:"):
                        return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
        except (OSError, ValueError):
            pass
        return False

    def close(self) -> None:
        """Release every fd (the process is done with)."""
        if self.tty is None and self._stdin is not None:
            with contextlib.suppress(OSError):
                os.close(self._stdin)
        self._stdin = None
        for s in (self.stdout, self.stderr):
            if s is not None:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(s.fd)
                s.close()
        if self._pidfd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _maybe(fd: int | None, proc: Process) -> Stream | None:
    return Stream(fd, proc) if fd is not None else None


def make_pipes(terminal: bool) -> tuple[tuple[int, int, int] | None, dict]:
    """Child-side stdio for runc and the agent's ends (``None`` child stdio with a terminal:
    runc gets /dev/null and the pty comes over the console socket)."""
    if terminal:
        null = os.open(os.devnull, os.O_RDWR)
        return (null, null, null), {"stdin": None, "stdout": None, "stderr": None}
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    for fd in (in_w, out_r, err_r):
        os.set_inheritable(fd, False)
    return (in_r, out_w, err_w), {"stdin": in_w, "stdout": out_r, "stderr": err_r}


def close_fds(fds: tuple[int, ...] | list[int]) -> None:
    for fd in set(fds):
        if fd is not None and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
