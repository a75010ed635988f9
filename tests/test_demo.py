"""`coco demo` (what `make demo` runs), non-interactively on coco-local: the whole life of the
pod (the secret printed from inside it, out of `coco pod run`), the three refusals with their
reasons, exit 0, and nothing left behind (the services by pid, shims, mounts, sockets, the pods'
network namespaces, the work directories); the same clean-up when interrupted in the middle of
the pod's run; --keep leaves the services answering and says how to stop them; `auto` picks
coco-qemu where a pod VM can run and falls back to coco-local with a visible warning otherwise;
and once per run the whole flow on coco-qemu (pod VMs under TCG with the node's vTPM), with
the peer pod of step 6."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from coco.demo import run as demo
from coco.demo.session import Blocked, Session, stop_group
from tests.host.conftest import podvm_image, podvm_source  # noqa: F401  (the session's image)

TOOLS = ("containerd", "runc", "ctr", "docker-registry", "umoci", "busybox", "nsenter")
SECRET_LINE = "the secret, fetched inside the pod from 127.0.0.1:8006:"
DEMO = [sys.executable, "-m", "coco.cli.main", "demo"]
WIDE = {**os.environ, "COLUMNS": "400"}  # rich wraps piped output at COLUMNS
# where containerd 1.6 keeps per-pod state outside its own root and state (shim sockets, runc
# state) and where the CNI's pod network namespaces live: what the demo's pods add there must go
HOST_STATE = ("/run/containerd/s", "/run/containerd/runc/k8s.io", "/var/run/netns")


def _needs_the_node() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (scripts/install-system-deps)")
    if os.geteuid() != 0:
        pytest.skip("the demo's containerd needs root")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _host_state() -> set[str]:
    return {f"{d}/{n}" for d in HOST_STATE if Path(d).is_dir() for n in os.listdir(d)}


def _naming(dirs: list[str]) -> list[str]:
    """Command lines of processes that name one of ``dirs``."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            found += [cmd for d in dirs if f"{d}/" in cmd]
    return found


def _assert_nothing_left(doc: dict, before: set[str], pods: bool = True) -> None:
    """Nothing of the demo's is left; ``pods``: its clean-up ran after pods had run."""
    dirs = [doc["work_dir"], *doc["dirs"]]
    assert doc["services"] and not [s for s in doc["services"] if _alive(s["pid"])]
    assert not _naming(dirs)
    mounts = Path("/proc/self/mounts").read_text()
    assert not [d for d in dirs if d in mounts]
    assert not [d for d in dirs if Path(d).exists()]
    if not pods:  # no pod, or none whose state clean-up could attribute (--keep)
        return
    # what the pods made outside (network namespaces, shim sockets): gone, with nothing the
    # demo had to remove itself; each pod had both
    checked = doc["checked"]
    assert {p.rsplit("/", 1)[0] for p in checked} == {"/run/containerd/s", "/var/run/netns"}
    assert len(checked) >= 2 and len(checked) % 2 == 0
    assert not [p for p in checked if os.path.lexists(p)]
    assert doc["removed"] == []
    # (another containerd on this machine, a test fixture's, may add entries of its own there)
    assert not (_host_state() - before) & set(checked)


@pytest.fixture
def host_state() -> Iterator[set[str]]:
    _needs_the_node()
    yield _host_state()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_lives_the_pod_refuses_three_times_and_leaves_nothing(
    tmp_path: Path, host_state: set[str]
) -> None:
    log = tmp_path / "demo.json"
    out = subprocess.run(
        [*DEMO, "--runtime-class", "coco-local", "--json", str(log)],
        capture_output=True, text=True, timeout=850, stdin=subprocess.DEVNULL, env=WIDE,
    )  # fmt: skip
    text = out.stdout + out.stderr
    doc = json.loads(log.read_text())
    status = {s["number"]: s for s in doc["steps"]}
    assert (out.returncode, doc["passed"]) == (0, True), text[-6000:]
    assert "WARNING: coco-local runs the guest on this host: INSECURE" in out.stdout
    assert [s["status"] for s in doc["steps"]] == ["ok"] * 7 + ["off", "ok"]
    # the secret the KBS released, printed by the container, out of `coco pod run`
    secret = status["4"]["facts"]["secret_line"].removeprefix(SECRET_LINE).strip()
    assert re.fullmatch(r"[a-z2-7]{16}", secret), status["4"]
    assert f"    {SECRET_LINE} {secret}\n" in out.stdout  # coco pod run's output, indented
    # the three refusals, each with the reason a user sees
    assert status["5a"]["detail"] == (
        "the agent policy's denial: rule args: OCI.Process.Args expected 1 arguments, got 3 "
        "arguments"
    )
    assert "CreateContainerRequest is blocked by policy" in status["5a"]["facts"]["reason"]
    assert status["5b"]["detail"] == (
        "the KBS's refusal: the evidence does not carry the pod's initdata digest"
    )
    assert "refused with 401 PolicyDeny" in status["5b"]["facts"]["reason"]
    assert re.fullmatch(
        r"the guest's digest check: layer 1/1 sha256:[0-9a-f]{12}…: digest mismatch: expected "
        r"sha256:[0-9a-f]{12}…, got sha256:[0-9a-f]{12}…",
        status["5c"]["detail"],
    ), status["5c"]
    assert all(status[n]["facts"]["exit"] != 0 for n in ("5a", "5b", "5c"))
    assert out.stdout.count("refused, as it should be: ") == 3
    refusals = out.stdout.split("5a. Refusal")[1].split("coco demo: summary")[0]
    assert SECRET_LINE not in refusals
    # peer pods: off by default here, with the reason said
    assert status["6"]["detail"].startswith("off by default: ")
    assert "coco demo: summary" in out.stdout and "demo passed in" in out.stdout
    _assert_nothing_left(doc, host_state)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_interrupted_in_the_pods_run_stops_everything(
    tmp_path: Path, host_state: set[str]
) -> None:
    """Ctrl-C (SIGINT to the demo's process group, as a terminal sends it) while `coco pod run`
    runs the pod: step 4 says it was interrupted, clean-up runs, the exit status is 130."""
    log = tmp_path / "demo.json"
    proc = subprocess.Popen(
        [*DEMO, "--runtime-class", "coco-local", "--json", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        start_new_session=True, env=WIDE,
    )  # fmt: skip
    seen: list[str] = []
    state = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            found = re.search(r"local sandbox state: (\S+)", line)
            state = Path(found[1]) if found else state
            if line.startswith("$ coco pod run "):
                break
        assert state is not None, "".join(seen)[-4000:]
        deadline = time.monotonic() + 120
        while not list(state.glob("*/agent.sock")):  # the pod's guest is up: press Ctrl-C
            assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)[-4000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=300)
    finally:
        stop_group(proc)
    text = "".join(seen) + rest
    doc = json.loads(log.read_text())
    status = {s["number"]: s["status"] for s in doc["steps"]}
    assert proc.returncode == 130, text[-4000:]
    assert (status["4"], status["7"], doc["passed"]) == ("interrupted", "ok", False), text[-4000:]
    assert "interrupted: stopping everything the demo started" in text
    _assert_nothing_left(doc, host_state)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_keep_leaves_the_services_answering(tmp_path: Path, host_state: set[str]) -> None:
    log = tmp_path / "demo.json"
    out = subprocess.run(
        [*DEMO, "--runtime-class", "coco-local", "--keep", "--json", str(log)],
        capture_output=True, text=True, timeout=850, stdin=subprocess.DEVNULL,
        env=WIDE,
    )  # fmt: skip
    doc = json.loads(log.read_text())
    stop = next((ln for ln in out.stdout.splitlines() if ln.startswith("stop them")), "")
    try:
        assert (out.returncode, doc["passed"]) == (0, True), out.stdout[-6000:]
        assert [s["number"] for s in doc["steps"]][-1] != "7"  # no clean-up step
        names = {s["name"] for s in doc["services"]}
        assert names == {"kbs", "docker-registry", "snapshotter", "containerd", "keyprovider"}
        assert all(_alive(s["pid"]) for s in doc["services"])
        facts = {s["number"]: s["facts"] for s in doc["steps"]}["1"]
        ctr = ["ctr", "--address", facts["containerd"].removeprefix("unix://"), "version"]
        assert subprocess.run(ctr, capture_output=True).returncode == 0
        import urllib.request

        with urllib.request.urlopen(f"{facts['kbs']}/readyz", timeout=10) as r:
            assert r.status == 200
        for s in doc["services"]:
            assert f"{s['name']}: pid {s['pid']}, " in out.stdout
    finally:
        # what the demo printed for the user, run as they would
        assert stop.startswith("stop them and remove their files with: kill -TERM -"), stop
        subprocess.run(["sh", "-c", stop.split(": ", 1)[1]], timeout=60, check=False)
        for s in doc["services"]:  # never outlive the test, whatever the command did
            if _alive(s["pid"]):
                os.killpg(s["pid"], signal.SIGKILL)
    _assert_nothing_left(doc, host_state, pods=False)  # its pods went with `coco pod run`


def _session(tmp_path: Path) -> tuple[Session, Console]:
    console = Console(record=True, width=1000)
    return Session(tmp_path, console=console, coco=["coco"]), console


def test_auto_falls_back_to_coco_local_with_a_visible_warning(tmp_path: Path) -> None:
    session, console = _session(tmp_path)
    blocker = "qemu-system-x86_64 not installed (scripts/install-system-deps)"
    assert demo.choose_runtime_class(session, "auto", blocker=lambda _: blocker) == demo.LOCAL
    said = console.export_text()
    assert said.startswith(f"WARNING: coco-qemu cannot run here ({blocker}): ")
    assert "falling back to coco-local, which runs the guest on this host: INSECURE" in said
    assert session.events == [{"warning": said.removeprefix("WARNING: ").strip()}]
    # asked for by name, the same blocker fails the step instead
    with pytest.raises(Blocked, match=rf"^coco-qemu: {re.escape(blocker)}$"):
        demo.choose_runtime_class(session, "coco-qemu", blocker=lambda _: blocker)


def test_auto_picks_coco_qemu_where_a_pod_vm_can_run(tmp_path: Path) -> None:
    session, console = _session(tmp_path)
    assert demo.choose_runtime_class(session, "auto", blocker=lambda _: None) == demo.QEMU
    assert "WARNING" not in console.export_text()


def test_the_qemu_probe_names_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real probe on a PATH without QEMU's tools (mke2fs and depmod are still found in
    /usr/sbin, as the build finds them)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    why = demo.qemu_blocker(None)
    assert why is not None and why.startswith("qemu-system-x86_64, swtpm, tpm2_createprimary")
    assert "mmdebstrap" in why  # no image given: the build's tools are needed too
    assert "mmdebstrap" not in (demo.qemu_blocker(tmp_path) or "")


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_demo_on_coco_qemu_lives_the_pod_in_a_vm_with_a_vtpm(
    tmp_path: Path,
    host_state: set[str],
    podvm_image,  # noqa: F811
) -> None:
    """Once per run: the same flow on coco-qemu (a TCG pod VM per pod, its vTPM a copy of the
    node's, whose AK the demo enrolled in the KBS): the secret is released only to evidence whose
    init_data is PCR 8 extended with the pod's initdata digest, which only a vTPM quote carries
    (the sample evidence's claim is the digest itself); the guest pulls the image from 10.0.2.2
    under its own name; the three refusals as on coco-local; step 6, the same pod on
    coco-remote through `coco cloud-api-adaptor serve qemu` (a copy of the node's vTPM), prints
    the same secret; nothing left, the CAA, QEMU and swtpm included. The pod VM image is the
    session's (tests/host's fixture, cached by content)."""
    if demo.qemu_blocker(podvm_image.dir) is not None:
        pytest.skip(f"coco-qemu cannot run here: {demo.qemu_blocker(podvm_image.dir)}")
    log = tmp_path / "demo.json"
    out = subprocess.run(
        [*DEMO, "--runtime-class", "coco-qemu", "--podvm-image", str(podvm_image.dir),
         "--json", str(log)],
        capture_output=True, text=True, timeout=2300, stdin=subprocess.DEVNULL, env=WIDE,
    )  # fmt: skip
    text = out.stdout + out.stderr
    doc = json.loads(log.read_text())
    status = {s["number"]: s for s in doc["steps"]}
    assert (out.returncode, doc["passed"]) == (0, True), text[-6000:]
    assert [s["status"] for s in doc["steps"]] == ["ok"] * 9
    assert "WARNING" not in out.stdout  # (coco runtime install still says coco-local is INSECURE)
    assert status["1"]["facts"]["runtime_class"] == "coco-qemu"
    assert "its attestation key, now trusted by the KBS's TPM verifier" in out.stdout
    assert "-----BEGIN PUBLIC KEY-----" in out.stdout
    # the initdata the guest is told: the registry reached at 10.0.2.2, the image keeps its name
    assert re.search(
        r'\n    prefix = "127\.0\.0\.1:\d+"\n    location = "10\.0\.2\.2:\d+"\n', out.stdout
    )
    pcr8 = re.search(r"the guest's vTPM carries it in PCR 8, extended once with it at boot: "
                     r"([0-9a-f]{64})", out.stdout)  # fmt: skip
    assert pcr8 is not None and f'ae.init_data == "{pcr8[1]}"' in out.stdout
    secret = status["4"]["facts"]["secret_line"].removeprefix(SECRET_LINE).strip()
    assert re.fullmatch(r"[a-z2-7]{16}", secret), status["4"]
    assert f"    {SECRET_LINE} {secret}\n" in out.stdout
    assert status["5a"]["detail"].startswith("the agent policy's denial: rule args: ")
    assert status["5b"]["detail"] == (
        "the KBS's refusal: the evidence does not carry the pod's initdata digest"
    )
    assert "refused with 401 PolicyDeny" in status["5b"]["facts"]["reason"]
    assert status["5c"]["detail"].startswith("the guest's digest check: layer 1/1 sha256:")
    assert out.stdout.count("refused, as it should be: ") == 3
    # peer pods: the same pod on coco-remote, its VM from the CAA (a copy of the enrolled vTPM,
    # the same initdata in PCR 8), prints the same secret; the CAA deleted the VM
    assert status["6"]["facts"]["secret_line"] == status["4"]["facts"]["secret_line"]
    assert status["6"]["detail"].startswith("coco-remote (CAA, provider qemu): ")
    assert f"from inside the peer pod: {SECRET_LINE} {secret}\n" in out.stdout
    assert out.stdout.count(f"    {SECRET_LINE} {secret}\n") == 2  # both pods' output
    assert re.search(r'\n    remote_hypervisor_socket = "(/tmp/cd-pp-\w+)/hv\.sock"\n', out.stdout)
    caa = [s for s in doc["services"] if s["name"] == "cloud-api-adaptor"]
    assert len(caa) == 1
    caa_dir = next(d for d in doc["dirs"] if "/cd-pp-" in d)
    _assert_nothing_left(doc, host_state)  # the CAA by pid, its dir, QEMU and swtpm naming it
    assert not Path(caa_dir).exists()
