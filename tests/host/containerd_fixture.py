"""Fixtures: a real containerd (Debian's 1.6) with its own config, root, state and sockets.

``containerd`` (session scope) starts ``containerd --config`` with everything under a temporary
directory: root, state, the gRPC socket (the ttRPC one beside it), CNI config, the registry hosts
directory. coco's runtime handlers are added by ``coco runtime install`` (the shim linked into
``<dir>/bin``, on containerd's PATH; the local sandbox's state in a short directory under /tmp).
Its CRI plugin has ``restrict_oom_score_adj = true`` (runc cannot set the pause container's -998
here), the sandbox (pause) image from the session ``open_registry``, and pod networking from a
CNI plugin of the tests' own (``coco-test-veth``): a veth pair whose both ends stay inside the
pod's network namespace, an address from 10.250.0.0/16 on ``eth0``; nothing is added to the
host's network (no bridge, no address, no route).

Images: ``test_images`` pushes a busybox image (``busybox-static``, with the applets as symlinks)
and the pause image to ``open_registry``; containerd pulls them over plain HTTP through its
``hosts.toml``.

coco's snapshotter (``coco snapshotter serve``, root and socket under the directory) runs beside
it as the CRI snapshotter (``coco runtime install --snapshotter``): ordinary images are unpacked
by it, images with encrypted layers are left to the guest.

At the end every pod left is stopped and removed, containerd is stopped by pid, shims it started
that outlived it are stopped by pid, then the snapshotter, and mounts left under the directory are
unmounted.
containerd 1.6 still writes some state under ``/run/containerd`` (runc state, shim sockets) and
pod network namespaces under ``/var/run/netns``; removing the pods removes those.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Registry
from tests.imagekit import tar_layer, write_image

_CNI_PLUGIN = r'''#!{python}
"""coco-test-veth: a CNI plugin that keeps the pod's network inside the pod's namespace."""
import hashlib, json, os, subprocess, sys

cmd = os.environ.get("CNI_COMMAND", "")
conf = json.loads(sys.stdin.read() or "{{}}")
version = conf.get("cniVersion", "0.4.0")
if cmd == "VERSION":
    print(json.dumps({{"cniVersion": version, "supportedVersions": ["0.3.0", "0.3.1", "0.4.0"]}}))
    sys.exit(0)
if cmd != "ADD":
    sys.exit(0)  # DEL, CHECK: the namespace and its links go away with the pod
netns, ifname = os.environ["CNI_NETNS"], os.environ.get("CNI_IFNAME", "eth0")
h = hashlib.sha256(os.environ["CNI_CONTAINERID"].encode()).digest()
addr = f"10.250.{{h[0]}}.{{2 + h[1] % 250}}"

def ip(*args):
    subprocess.run(["nsenter", f"--net={{netns}}", "ip", *args], check=True, capture_output=True)

ip("link", "add", ifname, "type", "veth", "peer", "name", "peer0")
ip("addr", "add", f"{{addr}}/16", "dev", ifname)
ip("link", "set", ifname, "up")
ip("link", "set", "peer0", "up")
print(json.dumps({{
    "cniVersion": version,
    "interfaces": [{{"name": ifname, "sandbox": netns}}],
    "ips": [{{"version": "4", "address": f"{{addr}}/16", "interface": 0}}],
}}))
'''


@dataclass
class Containerd:
    base: Path
    config: Path
    root: Path
    state: Path
    address: Path  # the gRPC socket
    log: Path
    pid: int
    cni_conf_dir: Path
    cni_bin_dir: Path
    pause_image: str
    coco_state: Path  # the local sandbox's state_dir (short: its sockets live there)
    snapshotter: Snapshotter | None = None  # coco's snapshotter, the CRI snapshotter

    @property
    def endpoint(self) -> str:
        return f"unix://{self.address}"

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", str(self.address), *args],
            check=check,
            capture_output=True,
            text=True,
        )


def _accepting(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``path`` now."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


@dataclass
class Snapshotter:
    """``coco snapshotter serve`` as the fixture runs it; restartable by the tests."""

    socket: Path
    root: Path
    containerd_address: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "coco.cli.main", "snapshotter", "serve", "--socket",
                 str(self.socket), "--root", str(self.root), "--containerd-address",
                 str(self.containerd_address)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while not _accepting(self.socket):  # not the file alone: a stopped one may leave it
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"coco snapshotter did not start: {self.log.read_text()[-2000:]}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@dataclass
class CriImages:
    busybox: str  # 127.0.0.1:PORT/coco-test/busybox:1 (Entrypoint none, Cmd /bin/sh)
    pause: str


def _busybox_layer() -> bytes:
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        pytest.skip("busybox-static is not installed")
    applets = ["sh", "sleep", "echo", "cat", "env", "hostname", "ls", "id", "pwd", "printf",
               "true", "false", "ip", "touch", "test", "kill", "wc", "mkdir"]  # fmt: skip
    files: dict[str, bytes | str | None] = {"bin/busybox": Path(busybox).read_bytes()}
    for a in applets:
        files[f"bin/{a}"] = "->busybox"
    files["etc/passwd"] = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
    files["etc/group"] = "root:x:0:\nnobody:x:65534:\n"
    files["tmp/"] = None
    return tar_layer(files, mode=0o755)


def _push(path: Path, tag: str, dest: str) -> None:
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            "--dest-tls-verify=false",
            f"oci:{path}:{tag}",
            f"docker://{dest}",
        ],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="session")
def test_images(tmp_path_factory: pytest.TempPathFactory, open_registry: Registry) -> CriImages:
    """busybox and pause images in ``open_registry``."""
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    base = tmp_path_factory.mktemp("cri-images")
    layer = _busybox_layer()
    write_image(base / "busybox", [layer], tag="1")
    write_image(
        base / "pause",
        [layer],
        tag="1",
        config_extra={
            "config": {"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sleep"], "Cmd": ["2147483647"]}
        },
    )
    busybox = f"{open_registry.host}/coco-test/busybox:1"
    pause = f"{open_registry.host}/coco-test/pause:1"
    _push(base / "busybox", "1", busybox)
    _push(base / "pause", "1", pause)
    return CriImages(busybox, pause)


def _config(base: Path, registry: str, pause: str) -> str:
    import tomlkit

    default = subprocess.run(
        ["containerd", "config", "default"], check=True, capture_output=True, text=True
    ).stdout
    doc = tomlkit.parse(default)
    doc["root"] = str(base / "root")
    doc["state"] = str(base / "state")
    doc["grpc"]["address"] = str(base / "c.sock")  # type: ignore[index]
    plugins = doc["plugins"]
    cri = plugins["io.containerd.grpc.v1.cri"]  # type: ignore[index]
    cri["sandbox_image"] = pause
    cri["restrict_oom_score_adj"] = True
    cri["cni"]["bin_dir"] = str(base / "cni-bin")
    cri["cni"]["conf_dir"] = str(base / "cni-conf")
    cri["registry"]["config_path"] = str(base / "certs.d")
    # a pod's runtime state stays with this containerd (not /var/run/netns of the host's one)
    hosts = base / "certs.d" / registry
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(
        f'server = "http://{registry}"\n\n[host."http://{registry}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    return tomlkit.dumps(doc)


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        if path.exists():
            r = subprocess.run(
                ["ctr", "--address", str(path), "version"], capture_output=True, check=False
            )
            if r.returncode == 0:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"containerd did not start: {log.read_text()[-3000:]}")
        time.sleep(0.1)


def _remove_pods(endpoint: str) -> None:
    from coco.errors import CocoError
    from coco.host.pod.cri import CriClient

    try:
        with CriClient(endpoint, timeout=60) as client:
            for s in client.list_sandboxes():
                for step in (client.stop_sandbox, client.remove_sandbox):
                    with contextlib.suppress(CocoError):
                        step(s.id)
    except CocoError:
        pass


def _stop_shims(address: Path) -> None:
    """Shims this containerd started that outlived it (a shim whose containerd went away before
    it was shut down waits for it to come back): found by the socket path only this fixture
    uses, stopped by pid."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-address" in cmd and str(address).encode() in cmd:
            pids.append(int(entry.name))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and _alive(p)]
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _umount_under(base: Path) -> None:
    prefix = str(base) + "/"
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], check=False, capture_output=True)


@pytest.fixture(scope="session")
def containerd(
    tmp_path_factory: pytest.TempPathFactory, test_images: CriImages
) -> Iterator[Containerd]:
    if shutil.which("containerd") is None or shutil.which("runc") is None:
        pytest.skip("containerd and runc are needed (scripts/install-system-deps)")
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    base = tmp_path_factory.mktemp("ctrd", numbered=True)
    registry = test_images.busybox.split("/")[0]
    cfg = base / "config.toml"
    cfg.write_text(_config(base, registry, test_images.pause))
    (base / "cni-bin").mkdir()
    (base / "cni-conf").mkdir()
    plugin = base / "cni-bin" / "coco-test-veth"
    plugin.write_text(_CNI_PLUGIN.format(python=sys.executable))
    plugin.chmod(0o755)
    loopback = Path("/usr/lib/cni/loopback")  # containerd brings up lo with it (Debian's plugins)
    if not loopback.exists():
        pytest.skip("containernetworking-plugins is not installed (scripts/install-system-deps)")
    (base / "cni-bin" / "loopback").symlink_to(loopback)
    (base / "cni-conf" / "10-coco-test.conf").write_text(
        json.dumps({"cniVersion": "0.4.0", "name": "coco-test", "type": "coco-test-veth"})
    )
    # coco's handlers (coco-qemu, coco-remote, coco-local) as a node gets them, by the real CLI;
    # the local sandbox keeps its state under the test directory; coco's snapshotter
    snapshotter = Snapshotter(base / "snap.sock", base / "snap", base / "c.sock", base / "snap.log")
    subprocess.run(
        [sys.executable, "-m", "coco.cli.main", "runtime", "install", "--containerd-config",
         str(cfg), "--config-dir", str(base / "coco"), "--shim-link-dir", str(base / "bin"),
         "--snapshotter", str(snapshotter.socket)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    snapshotter.start()
    local = base / "coco" / "configuration-local.toml"
    state = Path(tempfile.mkdtemp(prefix="coco-st-", dir="/tmp"))  # short: sockets live in it
    local.write_text(local.read_text() + f'\n[runtime]\nstate_dir = "{state}"\n')
    log = base / "containerd.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(
            ["containerd", "--config", str(cfg)],
            stdout=logf,
            stderr=logf,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # containerd 1.6 finds shims by name on its PATH: the link install made is there
            env={**os.environ, "PATH": f"{base / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"},
        )
    ctrd = Containerd(
        base,
        cfg,
        base / "root",
        base / "state",
        base / "c.sock",
        log,
        proc.pid,
        base / "cni-conf",
        base / "cni-bin",
        test_images.pause,
        state,
        snapshotter,
    )
    try:
        _wait_socket(ctrd.address, proc, log)
        yield ctrd
    finally:
        if proc.poll() is None:
            _remove_pods(ctrd.endpoint)
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        _stop_shims(ctrd.address)
        snapshotter.stop()
        _umount_under(base)
        _umount_under(state)
        shutil.rmtree(state, ignore_errors=True)
