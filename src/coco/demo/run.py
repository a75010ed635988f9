"""The demo's script: the life of a confidential pod, steps 1 to 7 of issue 16, in order.

Each step builds on the ones before; one that fails or is blocked skips those that need it, and
the demo exits 0 only when every step did what it should.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coco.demo import owner, peerpods, pod, workload
from coco.demo.session import (
    Blocked,
    DemoError,
    Session,
    StepResult,
    interrupt_on_signals,
    stop_pids,
    write_json,
)

LOCAL, QEMU, REMOTE = "coco-local", "coco-qemu", "coco-remote"
PEER_PODS_NEED_QEMU = "a peer pod is the pod VM of coco-qemu, which does not run here"
QEMU_TOOLS = ("qemu-system-x86_64", "swtpm", "tpm2_createprimary")
BUILD_TOOLS = ("mmdebstrap", "mke2fs", "depmod")  # coco podvm build (when no image is given)
VM_MEMORY_MIB = 1024  # coco-qemu's default_memory


@dataclass
class Options:
    runtime_class: str = "auto"  # auto | coco-qemu | coco-local
    peer_pods: bool | None = None  # None: where coco-qemu's pod VM runs
    json_path: Path | None = None
    keep: bool = False
    podvm_image: Path | None = None  # None: coco podvm build (cached)


def coco_command() -> list[str]:
    beside = Path(sys.executable).parent / "coco"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "coco.cli.main"]


def qemu_blocker(podvm_image: Path | None) -> str | None:
    """Why a pod VM cannot run here, or None. Cheap (well under a second): the tools, root, the
    memory, and QEMU making the pod VM's machine (q35, TCG or KVM) and quitting; a whole boot
    (35-70 s under TCG) is left to the pod itself, whose failure the demo reports."""
    from coco.host.podvm.boot import detect_accel

    tools = QEMU_TOOLS + (() if podvm_image else BUILD_TOOLS)
    missing = [
        t
        for t in tools
        if shutil.which(t) is None and shutil.which(t, path="/usr/sbin:/sbin") is None
    ]
    if missing:
        return f"{', '.join(missing)} not installed (scripts/install-system-deps)"
    if os.geteuid() != 0:
        return "the pod VM image build and containerd need root"
    available = _mem_available_mib()
    if available is not None and available < VM_MEMORY_MIB + 512:
        return f"{available} MiB of memory available, a pod VM needs {VM_MEMORY_MIB} MiB and more"
    qmp = '{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n'
    accel = detect_accel()
    try:
        probe = subprocess.run(
            ["qemu-system-x86_64", "-machine", "q35", "-accel", accel, "-nodefaults",
             "-no-user-config", "-display", "none", "-S", "-qmp", "stdio"],
            input=qmp, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"qemu-system-x86_64 did not make a q35 machine under {accel} within 30 s"
    if probe.returncode != 0:
        lines = [ln for ln in probe.stderr.splitlines() if ln.strip()] or ["no output"]
        return f"qemu-system-x86_64 cannot make a q35 machine under {accel}: {lines[-1]}"
    return None


def _mem_available_mib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def choose_runtime_class(
    session: Session, wanted: str, podvm_image: Path | None = None,
    blocker: Callable[[Path | None], str | None] = qemu_blocker,
) -> str:  # fmt: skip
    if wanted == LOCAL:
        session.warn("coco-local runs the guest on this host: INSECURE, not a TEE (asked for)")
        return LOCAL
    why = blocker(podvm_image)
    if why is None:
        session.say(f"coco-qemu: pod VMs under QEMU ({_accel()}) with a vTPM from swtpm")
        return QEMU
    if wanted == QEMU:
        raise Blocked(f"coco-qemu: {why}")
    session.warn(
        f"coco-qemu cannot run here ({why}): falling back to coco-local, which runs the guest "
        "on this host: INSECURE, not a TEE"
    )
    return LOCAL


def _accel() -> str:
    from coco.host.podvm.boot import detect_accel

    return "KVM" if detect_accel() == "kvm" else "TCG, no KVM here"


def main(opts: Options) -> int:
    interrupt_on_signals()
    work = Path(tempfile.mkdtemp(prefix="coco-demo-"))
    session = Session(work, coco=coco_command())
    started = time.monotonic()
    interrupted = False
    leftovers: list[str] = []
    facts: dict[str, object] = {"work_dir": str(work)}
    try:
        _steps(session, opts, facts)
    except KeyboardInterrupt:
        interrupted = True
        session.console.print("[bold red]interrupted: stopping everything the demo started[/]")
    finally:
        facts["services"] = [{"name": v.name, "pid": v.proc.pid} for v in session.services]
        facts["dirs"] = [str(d) for d in session.dirs]
        if opts.keep and not interrupted:
            _print_keep(session)
        else:
            with session.step("7", "Clean-up", "Stopping everything the demo started.") as s:
                leftovers = session.close(before_after=lambda: _stop_strays(session))
                leftovers += _leftovers(session.dirs)
                facts["checked"], facts["removed"] = session.checked, session.removed
                if leftovers:
                    raise DemoError("left behind: " + "; ".join(leftovers))
                for d in session.dirs:
                    shutil.rmtree(d, ignore_errors=True)
                s.detail = "no process, mount, socket or file left"
                session.say(s.detail)
    total = time.monotonic() - started
    session.console.print(session.table())
    ok = not interrupted and all(s.status in ("ok", "off") for s in session.steps)
    session.console.print(
        f"[bold {'green' if ok else 'red'}]demo {'passed' if ok else 'did not pass'}[/] "
        f"in {total:.1f} s"
    )
    if opts.json_path is not None:
        write_json(opts.json_path, session, {"passed": ok, "seconds": round(total, 3), **facts})
    return 0 if ok else (130 if interrupted else 1)


def _steps(session: Session, opts: Options, facts: dict[str, object]) -> None:
    c = session
    with c.step(
        "1", "Owner side",
        "The owner runs a Key Broker Service (KBS): it holds the keys and secrets and releases "
        "them only to a guest whose evidence it trusts. A registry holds images; the node runs "
        "containerd with coco's runtime installed and, for pod VMs, a vTPM the owner enrols.",
    ) as s:  # fmt: skip
        rc = choose_runtime_class(c, opts.runtime_class, opts.podvm_image)
        kbs = owner.start_kbs(c)
        registry = owner.start_registry(c)
        image = owner.podvm_image(c, opts.podvm_image) if rc == QEMU else None
        caa_dir = peerpods.short_dir(c) if rc == QEMU and opts.peer_pods is not False else None
        ctrd = owner.start_containerd(
            c, registry, workload.pause_image(registry), image,
            remote_socket=caa_dir / "hv.sock" if caa_dir else None,
        )  # fmt: skip
        vtpm = None
        s.facts = {"kbs": kbs.url, "registry": registry, "containerd": ctrd.endpoint,
                   "runtime_class": rc}  # fmt: skip
        if image is not None:
            vtpm = owner.enrol_vtpm(c, ctrd)
            owner.configure_qemu(c, ctrd, vtpm)
            s.facts["podvm_image"] = str(image)
        s.detail = f"KBS {kbs.url}, registry {registry}, containerd {ctrd.address}, {rc}"
    if not c.ok("1"):
        return _skip_rest(c, "1")

    with c.step(
        "2", "The workload",
        "An application image made from nothing on this machine: busybox and a script that "
        "prints a secret it asks the guest for. It is signed, its layer encrypted with a key "
        "that only the KBS keeps, and pushed.",
    ) as s:  # fmt: skip
        layout = workload.build_images(c)
        w = workload.encrypt_sign_push(c, kbs, registry, layout)
        s.facts = {"image": w.image, "digest": w.digest}
        s.detail = f"{w.image} signed and encrypted; key, secret and signature policy in the KBS"
    if not c.ok("2"):
        return _skip_rest(c, "2")

    with c.step(
        "3", "The pod",
        "A Kubernetes Pod, its agent policy generated from the image, and its initdata (the "
        "guest's configuration and that policy) whose digest the KBS will require.",
    ) as s:  # fmt: skip
        p = pod.prepare(c, ctrd, w, rc, kbs, registry)
        if rc == LOCAL:
            pod.trust_sample(c, kbs)
        pod.upload_resource_policy(c, kbs, p, allow_sample=rc == LOCAL)
        s.detail = f"runtime class {rc}"
        s.facts = {"runtime_class": rc, "initdata_digest": p.digest_b64}
    if not c.ok("3"):
        return _skip_rest(c, "3")

    with c.step(
        "4", "Inside",
        "coco pod run asks containerd for the pod, as a kubelet does: containerd pulls the "
        "image's manifest and config, and coco's snapshotter leaves its encrypted layer to the "
        "guest. coco's shim starts the sandbox; the guest attests to the KBS, pulls and decrypts "
        "the image itself (signature checked), and the container prints the secret it fetched "
        "from the guest's API.",
    ) as s:  # fmt: skip
        code, out, err = pod.pod_run(c, ctrd, p, p.yaml)
        line = next((ln for ln in out.splitlines() if workload.SECRET_LINE in ln), "")
        if code != 0 or not line:
            why = pod.reason(err) if err.strip() else f"exit {code} and no output"
            raise DemoError(f"the pod did not print its secret: {why}")
        if w.secret not in line:
            raise DemoError(f"the pod printed {line!r}, not the secret the KBS holds")
        c.say(f"from inside the pod: {line}", "bold green")
        plain = owner.plaintext_on_host(ctrd, workload.SCRIPT_NAME)
        if plain:
            raise DemoError(f"the image's plaintext is on the host: {plain[0]}")
        c.say(f"and on the host, under containerd's and the snapshotter's roots: no "
              f"{workload.SCRIPT_NAME}, the layer was never unpacked here")  # fmt: skip
        s.detail, s.facts = line, {"secret_line": line}
    if not c.ok("4"):
        return _skip_rest(c, "4")
    _refusals(c, ctrd, p, w)
    _peer_pods(c, opts, rc, (kbs, registry, ctrd), p, w, (caa_dir, image, vtpm))


def _refusals(c: Session, ctrd: owner.Containerd, p: pod.Pod, w: workload.Workload) -> None:
    with c.step(
        "5a", "Refusal: an altered pod",
        "The host changes the container's command after the policy was generated: the agent "
        "in the guest holds CreateContainer against the policy and refuses it.",
    ) as s:  # fmt: skip
        path = pod.altered(c, p, "pod-altered", ["/bin/sh", "-c", "cat /etc/passwd"])
        _refused(
            c, s, ctrd, p, path, "the agent policy's denial", r"blocked by policy: (rule args.*)"
        )

    with c.step(
        "5b", "Refusal: evidence without the pod's initdata",
        "The host gives the guest other initdata (one more line): its evidence carries another "
        "digest, the KBS refuses the keys, and the pod does not start.",
    ) as s:  # fmt: skip
        other = p.initdata.read_text() + '"note.txt" = "changed by the host"\n'
        path = pod.with_initdata(c, p, "pod-other-initdata", other)
        _refused(c, s, ctrd, p, path, "the KBS's refusal",
                 r"refused by the KBS resource policy: (.*initdata digest.*)")  # fmt: skip

    with c.step(
        "5c", "Refusal: a tampered layer",
        "One byte of the encrypted layer is changed in the registry's storage: the guest's pull "
        "checks every digest and refuses it; nothing runs.",
    ) as s:  # fmt: skip
        blob = owner.registry_blob(c, w.layer_digest)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        c.say(f"flipped one byte of {w.layer_digest} in {blob}")
        try:
            _refused(c, s, ctrd, p, p.yaml, "the guest's digest check",
                     r"(layer \S+ \S+ digest mismatch.*)")  # fmt: skip
        finally:
            data[len(data) // 2] ^= 0xFF
            blob.write_bytes(bytes(data))
            c.say("and put it back as it was")


def _refused(
    c: Session, s: StepResult, ctrd: owner.Containerd, p: pod.Pod, path: Path, who: str,
    expected: str,
) -> None:  # fmt: skip
    """Run the pod of ``path``: it must not start, and ``coco pod run``'s error must match the
    regular expression ``expected``, whose group is the step's summary."""
    code, out, err = pod.pod_run(c, ctrd, p, path)
    line = pod.reason(err) if err.strip() else f"exit {code} and no output"
    if code == 0 or workload.SECRET_LINE in out:
        raise DemoError(f"the pod ran (exit {code}): expected {who}")
    found = re.search(expected, line)
    if found is None:
        raise DemoError(f"expected {who}, got: {line}")
    c.say(f"refused, as it should be: {pod.cause(line)}", "bold yellow")
    s.detail = f"{who}: {pod.cause(found.group(1))}"
    s.facts = {"reason": line, "exit": code}


def _peer_pods(
    c: Session, opts: Options, rc: str, node: tuple[owner.Kbs, str, owner.Containerd],
    p: pod.Pod, w: workload.Workload, vm: tuple[Path | None, Path | None, Path | None],
) -> None:  # fmt: skip
    title = "Peer pods"
    caa_dir, image, vtpm = vm
    if opts.peer_pods is False:
        c.skip("6", title, "off (--peer-pods=false)", status="off")
        return
    if rc != QEMU or caa_dir is None or image is None or vtpm is None:
        if opts.peer_pods is None:
            c.skip("6", title, f"off by default: {PEER_PODS_NEED_QEMU}", status="off")
        else:
            with c.step("6", title, "The same pod on coco-remote."):
                raise Blocked(PEER_PODS_NEED_QEMU)
        return
    with c.step(
        "6", title,
        "The same pod (image, secret, guest configuration) on coco-remote: coco's shim asks a "
        "cloud-api-adaptor for the pod's VM instead of starting one; the CAA boots the pod VM "
        "image in peer-pod mode and the shim reaches the agent through the CAA's proxy. In the "
        "VM the forwarder puts the containers into the pod's network namespace, so the agent "
        "policy, hence the initdata and its digest, differ: the owner adds that digest to the "
        "resource policy.",
    ) as s:  # fmt: skip
        kbs, registry, ctrd = node
        c.say(peerpods.LIBVIRT_NOTE)
        remote = pod.prepare(c, ctrd, w, REMOTE, kbs, registry, name="pod-remote",
                             extra_settings=peerpods.network_namespace())  # fmt: skip
        pod.upload_resource_policy(c, kbs, p, allow_sample=False, also=(remote,))
        peerpods.start_caa(c, caa_dir, image, vtpm, VM_MEMORY_MIB)
        peerpods.configure_remote(c, ctrd)
        code, out, err = pod.pod_run(c, ctrd, remote, remote.yaml)
        line = next((ln for ln in out.splitlines() if workload.SECRET_LINE in ln), "")
        if code != 0 or not line:
            why = pod.reason(err) if err.strip() else f"exit {code} and no output"
            raise DemoError(f"the peer pod did not print its secret: {why}")
        if w.secret not in line:
            raise DemoError(f"the peer pod printed {line!r}, not the secret the KBS holds")
        c.say(f"from inside the peer pod: {line}", "bold green")
        left = peerpods.vms_left(caa_dir)
        if left:
            raise DemoError(f"the CAA still has the pod's VM after the pod went: {left}")
        c.say("the pod removed, the CAA deleted its VM")
        s.detail = f"coco-remote (CAA, provider qemu): {line}"
        s.facts = {"secret_line": line, "provider": "qemu", "runtime_class": REMOTE}


def _skip_rest(c: Session, after: str) -> None:
    titles = {"2": "The workload", "3": "The pod", "4": "Inside", "5": "Three refusals",
              "6": "Peer pods"}  # fmt: skip
    for n, t in titles.items():
        if int(n) > int(after):
            c.skip(n, t, f"step {after} did not succeed")


def _stop_strays(session: Session) -> None:
    """Shims outlive containerd by design: stop those of ours it left, by pid."""
    strays = _processes_naming(session.dirs)
    if strays:
        session.say(f"stopping {len(strays)} process(es) containerd left: {strays}")
        stop_pids(strays)


def _processes_naming(dirs: list[Path]) -> list[int]:
    """Processes (not this one) whose command line names one of ``dirs``."""
    me, found = os.getpid(), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(_names(cmd, d) for d in dirs):
            found.append(int(pid))
    return found


def _names(text: str, d: Path) -> bool:
    """Whether ``text`` names ``d`` or a path under it."""
    return f"{d}/" in text or f"{d} " in text + " "


def _leftovers(dirs: list[Path]) -> list[str]:
    mounts = [m.split()[1] for m in Path("/proc/self/mounts").read_text().splitlines()]
    found = [f"mount {m}" for m in mounts if any(_names(m, d) for d in dirs)]
    for pid in _processes_naming(dirs):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # it has just gone
        found.append(f"process {pid}: {cmd[:120]}")
    return found


def _print_keep(session: Session) -> None:
    session.console.rule("[bold cyan]7. Kept running (--keep)")
    for s in session.services:
        session.say(f"{s.name}: pid {s.proc.pid}, {s.reach or 'running'}; log {s.log}")
    groups = " ".join(f"-{s.proc.pid}" for s in reversed(session.services))
    session.say(f"work directory: {session.work}")
    session.say(
        f"stop them and remove their files with: kill -TERM {groups}; sleep 5; "
        f"rm -rf {' '.join(str(d) for d in session.dirs)}"
    )
