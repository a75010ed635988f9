"""Rego evaluation in warm worker processes, each bounded in time and memory.

A resource or attestation policy is owner-supplied code run on client-supplied input: one that
never ends (``count([x | some x in numbers.range(1, 100000000)])``) must not freeze the KBS, eat
the machine or keep SIGTERM from stopping it. A thread cannot be stopped, a process can, so the
Trustee evaluates in worker processes (``python -m coco.trustee.policy_engine``): started once and
kept warm (an evaluation costs one pipe round trip), each with an address-space limit
(``RLIMIT_AS``, counted from what the worker holds when it is ready). A worker that runs past the
time limit is killed and replaced; one that hits the memory limit dies (rego-cpp aborts on
``bad_alloc``) and is replaced; the evaluation then fails with :class:`PolicyLimitError` naming
the policy and the limit. Workers exit with their server (end of stdin, or their parent gone).

:meth:`PolicyEngine.evaluate` blocks its caller (call it from a thread, never on an event loop)
and is safe to call from many threads; at most ``workers`` evaluations run at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coco.errors import CocoError, RegoError
from coco.rego import RegoPolicy

__all__ = ["PolicyEngine", "PolicyLimitError", "PolicyLimits"]

_BOOT_TIMEOUT = 60.0  # a worker's start (interpreter + rego-cpp) is not counted in the limit
_READY = b"R"


@dataclass(frozen=True)
class PolicyLimits:
    """``[policy_engine]`` of kbs-config.toml: ``timeout_sec``, ``memory_limit_mb``, ``workers``."""

    timeout_sec: float = 3.0
    memory_limit_mb: int = 1024
    workers: int = 2


class PolicyLimitError(RegoError):
    """An evaluation stopped at the time or memory limit (or its worker died)."""


class _Worker:
    def __init__(self, memory_limit_mb: int) -> None:
        self.stderr = tempfile.TemporaryFile(prefix="coco-policy-worker-")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coco.trustee.policy_engine", str(memory_limit_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            close_fds=True,
        )
        self.ready = False
        self.known: set[str] = set()
        self.killed = False

    def read(self, n: int, deadline: float) -> bytes | None:
        """``n`` bytes from the worker, or None at the deadline or its end."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def kill(self) -> None:
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.close()

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if f is not None:
                    f.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.stderr.close()

    def died_of_memory(self) -> bool:
        """Whether the worker ended on a failed allocation (or was killed by the OOM killer)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        code = self.proc.returncode
        if code == -signal.SIGKILL and not self.killed:
            return True
        self.stderr.seek(0)
        return code == -signal.SIGABRT and b"bad_alloc" in self.stderr.read(65536)


class PolicyEngine:
    """A pool of policy worker processes: :meth:`evaluate` is ``RegoPolicy.evaluate``, bounded."""

    def __init__(self, limits: PolicyLimits | None = None) -> None:
        self.limits = limits or PolicyLimits()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max(1, self.limits.workers))
        self._closed = False

    def start(self) -> None:
        """Start one worker now, so the first evaluation finds it warm."""
        with self._lock:
            if not self._idle and not self._closed:
                w = _Worker(self.limits.memory_limit_mb)
                self._all.add(w)
                self._idle.append(w)

    def close(self) -> None:
        """Stop every worker (evaluations under way fail)."""
        with self._lock:
            self._closed = True
            workers, self._all, self._idle = list(self._all), set(), []
        for w in workers:
            w.kill()

    def evaluate(
        self,
        policy: RegoPolicy,
        input_doc: Any,
        data: Mapping[str, Any] | None = None,
        rules: Sequence[str] = (),
    ) -> dict[str, Any]:
        """``policy.evaluate(input_doc, data, rules)`` in a worker, within the limits."""
        names = list(rules or policy.rules)
        key = hashlib.sha256(json.dumps(policy.spec(), sort_keys=True).encode()).hexdigest()
        try:
            message = {"key": key, "input": input_doc, "data": data or {}, "rules": names}
            json.dumps(message)
        except (TypeError, ValueError) as e:
            raise policy.error(f"{policy.where}: input: expected a JSON document: {e}") from None
        with self._slots:
            worker = self._take()
            try:
                reply = self._ask(worker, policy, key, message)
            except BaseException:
                self._drop(worker)
                raise
            self._give_back(worker)
        if "error" in reply:
            raise policy.error(str(reply["error"]))
        result = reply.get("ok")
        return result if isinstance(result, dict) else {}

    # ------------------------------------------------------------------------------ workers

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise PolicyLimitError("policy engine: the server is stopping")
            if self._idle:
                return self._idle.pop()
            w = _Worker(self.limits.memory_limit_mb)
            self._all.add(w)
            return w

    def _give_back(self, w: _Worker) -> None:
        with self._lock:
            if self._closed:
                w.kill()
            else:
                self._idle.append(w)

    def _drop(self, w: _Worker) -> None:
        with self._lock:
            self._all.discard(w)
        w.kill()

    def _ask(
        self, w: _Worker, policy: RegoPolicy, key: str, message: dict[str, Any]
    ) -> dict[str, Any]:
        """Send ``message`` (and the policy, if this worker has not compiled it); the reply."""
        where = policy.where
        if not w.ready:
            if w.read(1, time.monotonic() + _BOOT_TIMEOUT) != _READY:
                raise PolicyLimitError(f"{where}: the policy worker process did not start")
            w.ready = True
        reply = self._round_trip(
            w, where, message if key in w.known else {**message, "policy": policy.spec()}
        )
        if reply.get("unknown"):  # the worker forgot it: send the policy along
            reply = self._round_trip(w, where, {**message, "policy": policy.spec()})
        w.known.add(key)
        return reply

    def _round_trip(self, w: _Worker, where: str, message: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(message, separators=(",", ":")).encode()
        assert w.proc.stdin is not None
        try:
            w.proc.stdin.write(len(body).to_bytes(4, "big") + body)
            w.proc.stdin.flush()
        except OSError:
            raise PolicyLimitError(f"{where}: the policy worker process is gone") from None
        limits = self.limits
        deadline = time.monotonic() + limits.timeout_sec
        head = w.read(4, deadline)
        raw = w.read(int.from_bytes(head, "big"), deadline + 5) if head else None
        if raw is None:
            if time.monotonic() >= deadline:
                w.kill()
                raise PolicyLimitError(
                    f"{where}: evaluation stopped: it ran longer than the limit of "
                    f"{limits.timeout_sec:g} s (policy_engine.timeout_sec)"
                )
            if w.died_of_memory():
                raise PolicyLimitError(
                    f"{where}: evaluation stopped: it needed more than the memory limit of "
                    f"{limits.memory_limit_mb} MiB (policy_engine.memory_limit_mb)"
                )
            raise PolicyLimitError(
                f"{where}: evaluation failed: the policy worker process ended "
                f"(exit status {w.proc.returncode})"
            )
        reply = json.loads(raw)
        if reply.get("memory"):
            w.kill()
            raise PolicyLimitError(
                f"{where}: evaluation stopped: it needed more than the memory limit of "
                f"{limits.memory_limit_mb} MiB (policy_engine.memory_limit_mb)"
            )
        return reply


# ---------------------------------------------------------------------------------- worker


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def _worker_main(memory_limit_mb: int) -> None:
    import resource

    out = os.dup(1)  # replies go here; fd 1 (where rego-cpp may print) goes nowhere
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    # Counted from here: rego-cpp reserves a large address range when it loads.
    limit = _vm_size() + memory_limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    inp = sys.stdin.buffer
    policies: OrderedDict[str, RegoPolicy] = OrderedDict()

    def send(reply: dict[str, Any]) -> None:
        data = json.dumps(reply, separators=(",", ":")).encode()
        view = memoryview(len(data).to_bytes(4, "big") + data)
        while view:
            view = view[os.write(out, view) :]

    os.write(out, _READY)
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        body = inp.read(int.from_bytes(head, "big"))
        try:
            req = json.loads(body)
            key = req["key"]
            policy = policies.get(key)
            if policy is None:
                spec = req.get("policy")
                if spec is None:
                    send({"unknown": True})
                    continue
                policy = RegoPolicy(
                    spec["text"],
                    spec["where"],
                    package=spec["package"],
                    rules=spec["rules"],
                    modules=spec["modules"],
                )
                policies[key] = policy
                while len(policies) > 32:
                    policies.popitem(last=False)
            send({"ok": policy.evaluate(req["input"], req["data"], req["rules"])})
        except MemoryError:
            send({"memory": True})
        except CocoError as e:
            send({"error": str(e)})
        except (KeyError, TypeError, ValueError) as e:
            send({"error": f"policy worker: malformed request: {e}"})


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]))
