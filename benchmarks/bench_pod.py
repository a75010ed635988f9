"""Pod start benchmark: from ``coco pod run`` to the first line of the app container's output, on
``coco-local`` (and ``coco-qemu`` with ``--qemu`` or ``COCO_BENCH_QEMU=1``: a TCG pod VM, about a
minute a pod), against the same pod on ``runc``; and the memory of the shim and the guest per pod.

What runs: the test suite's containerd fixture (Debian's containerd 1.6 with its own root, state
and sockets, coco's handlers installed by ``coco runtime install``, coco's snapshotter, the tests'
in-namespace CNI plugin) and its busybox and pause images in a ``docker-registry`` on loopback.
The pod is one busybox container: ``echo``, then a short sleep (the memory is read meanwhile),
exit 0; the coco pods carry the initdata of the tests (a CDH that may pull from the plain-HTTP
registry, an allow-all agent policy).

How the time is split. The phases come from ``ctr events`` (containerd's event stream, read for
the whole run; each event carries the time its publisher stamped: containerd for
``/containers/create``, the shim for ``/tasks/create`` and ``/tasks/start``), the start times of
the processes in /proc, and the lines ``coco pod run`` prints, stamped when read:

* ``cli+image``: ``coco pod run`` starts to its "creating pod" line (CLI start-up, the host side
  of the image: a config read for a guest pull, a pull and unpack for runc if not cached);
* ``sandbox``: from there to the pause container's ``/tasks/start`` (RunPodSandbox: netns and
  CNI, the shim, the guest or VM, the agent's CreateSandbox, the pause container);
* ``guest/VM``: inside the sandbox phase, the first process the shim starts (qemu; the local
  guest's init) to the pause container's ``/tasks/create`` (for qemu: the VM's boot to an
  answering agent, with CreateSandbox and the pause container; for local: the guest services'
  start);
* ``pull+create``: the app's ``/containers/create`` (CRI CreateContainer done) to its
  ``/tasks/create`` (the shim's Create: the agent's CreateContainer, which pulls the image in the
  guest; runc: ``runc create`` on the image the host unpacked);
* ``start``: ``/tasks/create`` to ``/tasks/start`` of the app;
* ``to output``: to the first line through ``coco pod run`` (CRI log file, its 0.1 s polling).

The remainder (``other``) is the time between phases: CRI calls, the pod's status, the
container's CRI create. Memory: RSS and PSS (smaps_rollup) of the shim process, and the sum over
its descendants (local: the guest's init, AA, CDH, API server, agent and the container; qemu:
swtpm and qemu, whose RSS includes the guest memory it touched); runc's shim beside.

    .venv/bin/python benchmarks/bench_pod.py [--rounds 3] [--qemu [--qemu-rounds 1]
                                             [--podvm-image DIR]]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import start_registry
from tests.host.containerd_fixture import Containerd, CriImages, containerd, test_images
from tests.host.test_pod_local import _initdata as local_initdata
from tests.host.test_remote_sandbox import _initdata as remapped_initdata

COCO = [sys.executable, "-m", "coco.cli.main"]
SLEEP = 3  # seconds the app sleeps after its first line: the memory is read meanwhile
PHASES = ("cli+image", "sandbox", "guest/VM", "pull+create", "start", "to output", "other", "total")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Dirs:
    """What the fixtures ask of pytest's tmp_path_factory: numbered directories under a root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str, numbered: bool = True) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))


# ------------------------------------------------------------------------------ observation


_EVENT = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:\.(\d+))? ([+-]\d{4}) \S+ (\S+) (/\S+) ?(.*)$"
)


@dataclass
class Event:
    at: float  # epoch seconds
    topic: str
    body: dict


class Events:
    """``ctr events`` of one containerd, read in a thread; stopped by pid."""

    def __init__(self, ctrd: Containerd) -> None:
        self.proc = subprocess.Popen(
            ["ctr", "--address", str(ctrd.address), "events"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.seen: list[Event] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = _EVENT.match(line.strip())
            if not m:
                continue
            day, frac, tz, _ns, topic, body = m.groups()
            at = datetime.datetime.strptime(f"{day} {tz}", "%Y-%m-%d %H:%M:%S %z").timestamp()
            at += float(f"0.{frac}") if frac else 0.0
            try:
                parsed = json.loads(body) if body else {}
            except ValueError:
                parsed = {}
            self.seen.append(Event(at, topic, parsed))

    def since(self, t: float) -> list[Event]:
        return [e for e in list(self.seen) if e.at >= t - 0.5]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


BTIME = _boot_time()
TICK = os.sysconf("SC_CLK_TCK")


def started_at(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return BTIME + int(fields[19]) / TICK


def cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def descendants(pid: int) -> list[int]:
    out, stack = [], children(pid)
    while stack:
        p = stack.pop()
        out.append(p)
        stack += children(p)
    return out


def shims(ctrd: Containerd, kind: str) -> list[int]:
    """Shim processes of this containerd: ``coco`` (the daemon, ``python -m
    coco.host.runtime.shim``) or ``runc``."""
    needle = "coco.host.runtime.shim" if kind == "coco" else "containerd-shim-runc-v2"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            cmd = cmdline(int(entry))
            if needle in cmd and str(ctrd.address) in cmd and " start" not in cmd:
                found.append(int(entry))
    return found


def memory(pid: int) -> tuple[float, float]:
    """RSS and PSS in MB (0, 0 for a process that is gone)."""
    rss = pss = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss / 1024, pss / 1024


# ------------------------------------------------------------------------------ one pod


@dataclass
class Result:
    phases: dict[str, float] = field(default_factory=dict)
    mem: dict[str, tuple[float, float]] = field(default_factory=dict)


def pod_yaml(d: Path, name: str, image: str, handler: str, initdata: str | None) -> Path:
    notes = (
        f"  annotations:\n    io.katacontainers.config.hypervisor.cc_init_data: {initdata}\n"
        if initdata
        else ""
    )
    p = d / f"{name}.yaml"
    p.write_text(
        f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n{notes}"
        f"spec:\n  runtimeClassName: {handler}\n  terminationGracePeriodSeconds: 1\n"
        f"  containers:\n  - name: app\n    image: {image}\n"
        f'    command: ["/bin/sh", "-c", "echo first line from {name}; sleep {SLEEP}"]\n'
    )
    return p


def one_pod(ctrd: Containerd, events: Events, images: CriImages, work: Path, name: str,
            handler: str, initdata: str | None) -> Result:  # fmt: skip
    d = work / name
    d.mkdir(parents=True)
    pod = pod_yaml(d, name, images.busybox, handler, initdata)
    lines: list[tuple[float, str, str]] = []
    first = threading.Event()
    kind = "runc" if handler == "runc" else "coco"
    before = set(shims(ctrd, kind))
    t0 = time.time()
    proc = subprocess.Popen(
        [*COCO, "pod", "run", str(pod), "--runtime-endpoint", ctrd.endpoint, "--tls-verify=false",
         "--log-root", str(d / "logs"), "--state-dir", str(d / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def read(stream, tag: str) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            lines.append((time.time(), tag, line.rstrip("\n")))
            if tag == "out":
                first.set()

    readers = [threading.Thread(target=read, args=(s, t), daemon=True)
               for s, t in ((proc.stdout, "out"), (proc.stderr, "err"))]  # fmt: skip
    for r in readers:
        r.start()
    res = Result()
    spawned: dict[int, float] = {}  # the shim's descendants and when they started
    shim: int | None = None
    try:
        deadline = time.monotonic() + 1800
        while not first.is_set():  # watch the shim and what it starts (qemu, the local guest)
            if proc.poll() is not None or time.monotonic() > deadline:
                first.wait(1)
                break
            if shim is None:
                new = [p for p in shims(ctrd, kind) if p not in before]
                shim = new[0] if new else None
            if shim is not None:
                for p in descendants(shim):
                    if p not in spawned and (s := started_at(p)) is not None:
                        spawned[p] = s
            time.sleep(0.05)
        if not first.is_set():
            raise SystemExit(f"{name}: no output: " + "\n".join(x[2] for x in lines)[-3000:])
        time.sleep(1)  # the app sleeps: the pod as it runs
        if shim is not None:
            res.mem["shim"] = memory(shim)
            rest = [memory(p) for p in descendants(shim)]
            res.mem["guest"] = (sum(m[0] for m in rest), sum(m[1] for m in rest))
            qemu = [p for p in descendants(shim) if "qemu-system" in cmdline(p)]
            if qemu:
                res.mem["qemu"] = memory(qemu[0])
        code = proc.wait(600)
        if code != 0:
            raise SystemExit(f"{name}: coco pod run exited {code}: "
                             + "\n".join(x[2] for x in lines if x[1] == "err")[-3000:])  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(120)
    for r in readers:
        r.join(5)
    t_out = next(t for t, tag, _ in lines if tag == "out")
    t_cri = next(t for t, tag, x in lines if tag == "err" and "creating pod" in x)
    ev = events.since(t0)
    created = {
        e.body.get("id"): e.body.get("image", "") for e in ev if e.topic == "/containers/create"
    }
    sid = next(i for i, img in created.items() if img == ctrd.pause_image)
    app = next(i for i, img in created.items() if img != ctrd.pause_image)

    def at(topic: str, cid: str) -> float:
        for e in ev:
            if e.topic == topic and cid in (e.body.get("container_id"), e.body.get("id")):
                return e.at
        raise SystemExit(f"{name}: no {topic} event for {cid[:12]}")

    sb_create, sb_start = at("/tasks/create", sid), at("/tasks/start", sid)
    app_made, app_create, app_start = (
        at("/containers/create", app), at("/tasks/create", app), at("/tasks/start", app),
    )  # fmt: skip
    qemu_at = [s for p, s in spawned.items() if "qemu-system" in cmdline(p)]
    guest_from = min(qemu_at) if qemu_at else (min(spawned.values()) if spawned else None)
    ph = res.phases
    ph["cli+image"] = t_cri - t0
    ph["sandbox"] = sb_start - t_cri
    if guest_from is not None and kind == "coco":
        ph["guest/VM"] = sb_create - guest_from
    ph["pull+create"] = app_create - app_made
    ph["start"] = app_start - app_create
    ph["to output"] = t_out - app_start
    ph["total"] = t_out - t0
    ph["other"] = ph["total"] - sum(
        ph[k] for k in ("cli+image", "sandbox", "pull+create", "start", "to output")
    )
    return res


# ------------------------------------------------------------------------------ runs


@contextlib.contextmanager
def qemu_config(ctrd: Containerd, image: Path) -> Iterator[None]:
    """coco-qemu's runtime config: the image, TCG-sized timeouts, a short state dir; restored."""
    path = ctrd.base / "coco" / "configuration-qemu.toml"
    installed = path.read_text()
    path.write_text(
        f'[hypervisor.qemu]\nimage = "{image}"\nboot_timeout = 900\n\n'
        "[agent.kata]\ndial_timeout = 900\ncreate_container_timeout = 900\n\n"
        f'[runtime]\nstate_dir = "{ctrd.coco_state}"\n'
    )
    try:
        yield
    finally:
        path.write_text(installed)


def summary(name: str, rs: list[Result]) -> None:
    keys = [k for k in PHASES if all(k in r.phases for r in rs)]
    med = {k: statistics.median(r.phases[k] for r in rs) for k in keys}
    print(f"{name:10s}" + "".join(f"{med.get(k, float('nan')):>12.2f}" if k in med else f"{'-':>12s}"
                                  for k in PHASES))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--rounds", type=int, default=3, help="pods per runtime class (coco-local, runc)"
    )
    ap.add_argument("--qemu", action="store_true", default=bool(os.environ.get("COCO_BENCH_QEMU")),
                    help="also coco-qemu (or COCO_BENCH_QEMU=1); ~1 min a pod under TCG")  # fmt: skip
    ap.add_argument("--qemu-rounds", type=int, default=1)
    ap.add_argument(
        "--podvm-image", type=Path, help="the pod VM image (default: coco podvm build's)"
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("containerd needs root")
    src = Path(__file__).resolve().parents[1] / "src"  # time the code, not the byte compiler
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    image = None
    if args.qemu:
        if args.podvm_image is not None:
            image = args.podvm_image.absolute()
        else:
            from coco.host.podvm.build import build

            print("the pod VM image (coco podvm build, cached) ...", flush=True)
            image = build().dir
    print(f"load average at start: {load()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pod-", dir="/var/tmp"))
    results: dict[str, list[Result]] = {}
    try:
        with contextlib.ExitStack() as es:
            reg = es.enter_context(start_registry(tmp / "registry"))
            images = test_images.__wrapped__(Dirs(tmp), reg)
            ctrd = es.enter_context(
                contextlib.contextmanager(containerd.__wrapped__)(Dirs(tmp), images)
            )
            events = Events(ctrd)
            es.callback(events.stop)
            host = images.busybox.split("/")[0]
            local = local_initdata(host, deny="")
            qemu = base64.b64encode(gzip.compress(remapped_initdata(host))).decode()
            work = tmp / "pods"
            plan = [("coco-local", local), ("runc", None)]
            # one pod of each first, not counted: containerd's first pull, caches, page cache
            for handler, initdata in plan:
                one_pod(ctrd, events, images, work, f"warm-{handler}", handler, initdata)
            for r in range(args.rounds):
                for handler, initdata in plan if r % 2 == 0 else plan[::-1]:
                    res = one_pod(ctrd, events, images, work, f"p{r}-{handler}", handler, initdata)
                    results.setdefault(handler, []).append(res)
                    print(f"  {handler} round {r + 1}: first line after {res.phases['total']:.2f} s "
                          f"(load {load()})", flush=True)  # fmt: skip
            if image is not None:
                with qemu_config(ctrd, image):
                    for r in range(args.qemu_rounds):
                        try:
                            res = one_pod(ctrd, events, images, work, f"q{r}", "coco-qemu", qemu)
                        except (SystemExit, Exception) as e:  # the other numbers still count
                            print(f"  coco-qemu round {r + 1} failed: {e}", flush=True)
                            break
                        results.setdefault("coco-qemu", []).append(res)
                        print(f"  coco-qemu round {r + 1}: first line after "
                              f"{res.phases['total']:.2f} s (load {load()})", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nseconds, median of the rounds; load average now {load()}")
    print(f"{'':10s}" + "".join(f"{k:>12s}" for k in PHASES))
    for name, rs in results.items():
        summary(name, rs)
    base = [r.phases["total"] for r in results.get("runc", [])]
    runc = statistics.median(base) if base else float("nan")
    for name, rs in results.items():
        if name != "runc" and base:
            t = statistics.median(r.phases["total"] for r in rs)
            print(f"{name}: {t:.2f} s to the first line = {t / runc:.1f} x runc ({runc:.2f} s)")
    print("\nmemory per pod (MB, median), RSS / PSS:")
    for name, rs in results.items():
        parts = []
        for k in ("shim", "guest", "qemu"):
            got = [r.mem[k] for r in rs if k in r.mem]
            if got:
                rss = statistics.median(m[0] for m in got)
                pss = statistics.median(m[1] for m in got)
                label = {"shim": "shim", "guest": "its descendants", "qemu": "of which qemu"}[k]
                parts.append(f"{label} {rss:.0f} / {pss:.0f}")
        print(f"  {name:10s} " + ", ".join(parts))


if __name__ == "__main__":
    main()
