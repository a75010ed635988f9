"""The demo's bookkeeping: steps with their times, the commands it runs, the processes it starts.

A :class:`Session` prints each step as it begins (a rule with its title and a sentence for a
newcomer), each command it runs (``$ coco ...``) and that command's output, indented. A step ends
``ok``, ``failed`` (it did not do what it should), ``blocked`` (a part it needs is missing here:
the reason says which), ``skipped`` (an earlier step it builds on did not succeed) or ``off``
(not asked for, or not on by default here: the reason says why). Every
process the demo starts is registered with :meth:`Session.spawn` and stopped by its pid (its own
process group: SIGTERM, then SIGKILL) by :meth:`Session.close`, which also runs the clean-up
callbacks in reverse order; SIGTERM and SIGHUP are turned into KeyboardInterrupt so that Ctrl-C,
a kill and a failure all end there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from coco.errors import CocoError


class DemoError(CocoError):
    """A demo step did not do what it should."""


class Blocked(DemoError):
    """A part the step needs does not exist or cannot run on this machine."""


@dataclass
class StepResult:
    number: str
    title: str
    status: str = "skipped"  # ok | failed | blocked | skipped | off | interrupted
    seconds: float = 0.0
    detail: str = ""
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    reach: str = ""


class Session:
    def __init__(self, work: Path, *, console: Console | None = None, coco: list[str]) -> None:
        self.work = work
        self.dirs = [work]  # every directory the demo made: clean-up removes them, checks them
        self.checked: list[str] = []  # paths outside them that clean-up looked at,
        self.removed: list[str] = []  # and those of them it found there and removed
        self.console = console or Console(highlight=False)
        self.coco = coco
        self.steps: list[StepResult] = []
        self.services: list[Service] = []
        self._cleanups: list[tuple[str, Callable[[], None]]] = []
        self._after: list[tuple[str, Callable[[], None]]] = []
        self.events: list[dict[str, Any]] = []

    # -- output -----------------------------------------------------------------------------
    def say(self, text: str, style: str = "") -> None:
        self.console.print(f"[{style}]{text}[/]" if style else text, markup=bool(style))
        self.events.append({"say": text})

    def warn(self, text: str) -> None:
        self.console.print(f"[bold yellow]WARNING: {text}[/]")
        self.events.append({"warning": text})

    def show(self, text: str) -> None:
        for line in text.rstrip().splitlines():
            self.console.print("    " + line, markup=False, highlight=False, style="dim")

    # -- steps ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, number: str, title: str, intro: str) -> Iterator[StepResult]:
        result = StepResult(number, title)
        self.steps.append(result)
        self.console.rule(f"[bold cyan]{number}. {title}")
        self.say(intro)
        start = time.monotonic()
        try:
            yield result
            result.status = "ok"
        except Blocked as e:
            result.status, result.detail = "blocked", str(e)
            self.console.print(f"[bold magenta]BLOCKED: {e}[/]")
        except DemoError as e:
            result.status, result.detail = "failed", str(e)
            self.console.print(f"[bold red]FAILED: {e}[/]")
        except KeyboardInterrupt:
            result.status = "interrupted"
            raise
        except Exception as e:  # a bug or an unexpected answer: the step failed, say how
            result.status, result.detail = "failed", f"{type(e).__name__}: {e}"
            self.console.print(f"[bold red]FAILED: {result.detail}[/]")
        finally:
            result.seconds = time.monotonic() - start
            self.events.append(
                {"step": number, "title": title, "status": result.status,
                 "seconds": round(result.seconds, 3), "detail": result.detail,
                 "facts": result.facts}
            )  # fmt: skip

    def skip(self, number: str, title: str, why: str, status: str = "skipped") -> None:
        self.steps.append(StepResult(number, title, status, 0.0, why))
        self.console.rule(f"[dim]{number}. {title}")
        self.say(why if why.startswith(status) else f"{status}: {why}", "dim")
        self.events.append({"step": number, "title": title, "status": status, "detail": why})

    def ok(self, *numbers: str) -> bool:
        return all(s.status == "ok" for s in self.steps if s.number.split(".")[0] in numbers)

    # -- commands ---------------------------------------------------------------------------
    def shown(self, argv: list[str]) -> str:
        n = len(self.coco)
        if argv[:n] == self.coco:
            argv = ["coco", *argv[n:]]
        return " ".join(shlex.quote(a) for a in argv)

    def run(
        self,
        argv: list[str],
        *,
        check: bool = True,
        env: dict[str, str] | None = None,
        show: bool = True,
        timeout: float = 600,
        what: str = "",
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` (``coco`` arguments when it starts with ``coco``), print it and its
        output; ``check``: a non-zero exit is a DemoError carrying the last line of stderr."""
        if argv and argv[0] == "coco":
            argv = [*self.coco, *argv[1:]]
        self.console.print(f"[dim]$ {self.shown(argv)}[/]")
        started = time.monotonic()
        try:
            proc = _run(argv, timeout, {**os.environ, **env} if env else None, self.show)
        except subprocess.TimeoutExpired:
            raise DemoError(f"{what or self.shown(argv)}: no answer within {timeout:g} s") from None
        except FileNotFoundError:
            raise Blocked(f"{argv[0]} is not installed (scripts/install-system-deps)") from None
        self.events.append(
            {"run": self.shown(argv), "exit": proc.returncode,
             "seconds": round(time.monotonic() - started, 3)}
        )  # fmt: skip
        if show:
            self.show(proc.stdout + proc.stderr)
        if check and proc.returncode != 0:
            raise DemoError(
                f"{what or self.shown(argv)}: exit {proc.returncode}: {last_line(proc)}"
            )
        return proc

    # -- processes --------------------------------------------------------------------------
    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        ready: Callable[[], bool],
        env: dict[str, str] | None = None,
        timeout: float = 60,
        reach: str = "",
    ) -> Service:
        """Start a long-running process in its own process group, logging to the work dir, and
        wait until ``ready()``; it is stopped by :meth:`close`."""
        if argv and argv[0] == "coco":
            argv = [*self.coco, *argv[1:]]
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        self.console.print(f"[dim]$ {self.shown(argv)} &[/]")
        try:
            with log.open("ab") as out:
                proc = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, **env} if env else None, start_new_session=True,
                )  # fmt: skip
        except FileNotFoundError:
            raise Blocked(f"{argv[0]} is not installed (scripts/install-system-deps)") from None
        service = Service(name, proc, log, reach)
        self.services.append(service)
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                raise DemoError(f"{name} exited with status {proc.returncode}: {tail(log)}")
            if time.monotonic() > deadline:
                raise DemoError(f"{name} was not ready within {timeout:g} s: {tail(log)}")
            time.sleep(0.05)
        self.say(f"{name} is running (pid {proc.pid}){': ' + reach if reach else ''}")
        return service

    def on_close(self, what: str, fn: Callable[[], None], *, after: bool = False) -> None:
        """Run ``fn`` at :meth:`close`: before the services stop, or ``after`` they have."""
        (self._after if after else self._cleanups).append((what, fn))

    def close(self, before_after: Callable[[], None] = lambda: None) -> list[str]:
        """Stop everything (clean-ups in reverse order, the services by pid, ``before_after``,
        then the clean-ups that need the services stopped); return what could not be undone."""
        problems = _run_all(self._cleanups)
        for service in reversed(self.services):
            stop_group(service.proc)
        self.services.clear()
        before_after()
        return problems + _run_all(self._after)

    # -- summary ----------------------------------------------------------------------------
    def table(self) -> Table:
        t = Table(title="coco demo: summary", title_style="bold")
        t.add_column("step")
        t.add_column("result")
        t.add_column("time", justify="right")
        t.add_column("what happened")
        colour = {
            "ok": "green",
            "failed": "red",
            "blocked": "magenta",
            "skipped": "dim",
            "off": "dim",
            "interrupted": "red",
        }
        for s in self.steps:
            t.add_row(
                f"{s.number}. {s.title}",
                f"[{colour[s.status]}]{s.status}[/]",
                f"{s.seconds:.1f} s",
                s.detail,
            )
        return t


def _run(
    argv: list[str],
    timeout: float,
    env: dict[str, str] | None,
    show: Callable[[str], None],
    grace: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` that, interrupted, gives the command ``grace`` seconds to clean up
    after its own Ctrl-C (``coco pod run`` removes its pod), shows what it said, then kills it."""
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    ) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except KeyboardInterrupt:
            with contextlib.suppress(ProcessLookupError):  # it may not have had it (SIGTERM)
                proc.send_signal(signal.SIGINT)
            try:
                out, err = proc.communicate(timeout=grace)
                show(out + err)
            finally:
                proc.kill()
            raise
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _run_all(cleanups: list[tuple[str, Callable[[], None]]]) -> list[str]:
    """Run (and forget) ``cleanups`` in reverse order, all of them; what failed, and why."""
    problems = []
    for what, fn in reversed(cleanups):
        try:
            fn()
        except Exception as e:  # keep going: everything else must still be undone
            problems.append(f"{what}: {e}")
    cleanups.clear()
    return problems


def stop_group(proc: subprocess.Popen[Any], grace: float = 10) -> None:
    """SIGTERM the process group led by ``proc`` (started with ``start_new_session``), then
    SIGKILL it if the leader has not exited within ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def stop_pids(pids: list[int], grace: float = 10) -> None:
    """SIGTERM each of ``pids``, then SIGKILL those still there after ``grace`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _running(p)]
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def interrupt_on_signals() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, so clean-up runs."""

    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started ignoring it


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no output"


def tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:400] if lines else "no output"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    return check


def write_json(path: Path, session: Session, extra: dict[str, Any]) -> None:
    doc = {
        "steps": [
            {"number": s.number, "title": s.title, "status": s.status,
             "seconds": round(s.seconds, 3), "detail": s.detail, "facts": s.facts}
            for s in session.steps
        ],
        "events": session.events,
        **extra,
    }  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


__all__ = ["Blocked", "DemoError", "Session", "StepResult", "free_port", "listening"]
