"""Fixtures of the peer-pods tests: a real libvirtd of the test's own, a tiny pod VM image, a stub
agent, the CAA as a child process.

The libvirtd runs as a *session* daemon of user ``nobody``, with its config, sockets, state and
logs under a directory of the test (``XDG_*``), so it touches nothing of the machine's; it and its
virtlogd are stopped by pid. The tiny image is the pod VM kernel with a busybox initramfs that
brings up the network and, when ``relay=HOST:PORT`` is on its command line, relays the
forwarder's port 15150 to HOST:PORT (busybox nc): a domain that boots in a few seconds and whose
port 15150 leads to a forwarder the test runs.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

NOBODY = 65534
TOOLS = ("libvirtd", "virtlogd", "virsh", "qemu-img", "genisoimage", "setpriv",
         "qemu-system-x86_64")  # fmt: skip
NET_MODULES = ("kernel/net/core/failover.ko", "kernel/drivers/net/net_failover.ko",
               "kernel/drivers/net/virtio_net.ko")  # fmt: skip
TINY_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in $(cat /modules.order); do insmod /lib/modules/$m; done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
relay=$(sed -n 's/.*relay=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
export relay
echo "tiny: ready relay=$relay"
if grep -q tiny.fail=1 /proc/cmdline; then echo "coco-podvm: error: tiny: asked to fail"; poweroff -f; fi
if [ -n "$relay" ]; then nc -ll -p 15150 -e /relay.sh & fi
while true; do sleep 1000; done
"""
RELAY = """#!/bin/sh
exec nc ${relay%:*} ${relay#*:}
"""


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


@dataclass
class Libvirtd:
    uri: str
    base: Path
    data_dir: Path

    def virsh(self, *args: str) -> str:
        proc = subprocess.run([_which("virsh") or "virsh", "-c", self.uri, *args],
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def domains(self) -> list[str]:
        return self.virsh("list", "--all", "--name").split()


def _as_nobody(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, NOBODY, NOBODY)
    return path


@contextlib.contextmanager
def start_libvirtd() -> Iterator[Libvirtd]:
    missing = [t for t in TOOLS if _which(t) is None]
    if missing:
        pytest.fail(f"libvirt tests need {', '.join(missing)}: run scripts/install-system-deps",
                    pytrace=False)  # fmt: skip
    if os.geteuid() != 0:
        pytest.skip("the test's libvirtd runs as user nobody: starting it needs root")
    base = Path(tempfile.mkdtemp(prefix="coco-lv-", dir="/tmp"))
    base.chmod(0o755)
    procs: list[subprocess.Popen] = []
    try:
        home, cfg, run = (_as_nobody(base / n) for n in ("home", "cfg", "run"))
        data = _as_nobody(base / "data")
        _as_nobody(cfg / "libvirt")
        (cfg / "libvirt/libvirtd.conf").write_text(f'unix_sock_dir = "{run}"\n')
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home),
               "XDG_CONFIG_HOME": str(cfg), "XDG_RUNTIME_DIR": str(run),
               "XDG_CACHE_HOME": str(home / ".cache"), "XDG_DATA_HOME": str(home / ".data")}  # fmt: skip
        for daemon in ("virtlogd", "libvirtd"):
            log = open(base / f"{daemon}.log", "wb")  # noqa: SIM115 - the child keeps it
            procs.append(subprocess.Popen(
                [_which("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 "--", _which(daemon)],
                env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
            ))  # fmt: skip
            log.close()
        sock = run / "libvirt-sock"
        deadline = time.monotonic() + 30
        while not sock.exists():
            for p in procs:
                assert p.poll() is None, (base / "libvirtd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "libvirtd did not create its socket in 30 s"
            time.sleep(0.1)
        uri = f"qemu:///session?socket={sock}"
        import libvirt

        libvirt.open(uri).close()  # the first connection probes capabilities (~8 s)
        yield Libvirtd(uri, base, data)
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # domains still running belong to the daemon's user: stop them by pid
        for pidfile in (base / "run/libvirt/qemu/run").glob("*.pid") if base.exists() else []:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), 9)
        shutil.rmtree(base, ignore_errors=True)


def _kernel_dir() -> Path:
    from coco.host.podvm.cache import Cache

    cache = Cache()
    found = sorted(cache.root.glob("kernel-*/vmlinuz"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1].parent
    from coco.host.podvm import kernel

    with cache.locked():
        return kernel.build_kernel(cache, kernel.kernel_inputs(), lambda s: None).dir


def make_tiny_image(dest: Path) -> Path:
    """vmlinuz + initrd.img (busybox, virtio-net modules, TINY_INIT) + a 1 MiB root.img."""
    kdir = _kernel_dir()
    version = (kdir / "version").read_text().strip()
    mods = kdir / "modules/lib/modules" / version
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(kdir / "vmlinuz", dest / "vmlinuz")
    tree = dest / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "lib/modules").mkdir(parents=True)
    shutil.copy2(kdir / "busybox", tree / "bin/busybox")
    order = []
    for rel in [*(kdir / "initramfs.order").read_text().split(), *NET_MODULES]:
        if "virtio" in rel or "failover" in rel:
            shutil.copy2(mods / rel, tree / "lib/modules" / Path(rel).name)
            order.append(Path(rel).name)
    (tree / "modules.order").write_text("\n".join(order) + "\n")
    for name, text in (("init", TINY_INIT), ("relay.sh", RELAY)):
        (tree / name).write_text(text)
        (tree / name).chmod(0o755)
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    cpio = subprocess.run([str(kdir / "busybox"), "cpio", "-o", "-H", "newc"], cwd=tree,
                          input="\n".join(names).encode() + b"\n", capture_output=True, check=True)  # fmt: skip
    (dest / "initrd.img").write_bytes(gzip.compress(cpio.stdout, mtime=0))
    shutil.rmtree(tree)
    with open(dest / "root.img", "wb") as f:
        f.truncate(1 << 20)
    for p in (dest, *dest.iterdir()):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest


@contextlib.contextmanager
def caa_process(args: list[str], log: Path, socket: Path) -> Iterator[subprocess.Popen]:
    """``coco cloud-api-adaptor serve ARGS`` until its socket answers; killed by pid after."""
    out = open(log, "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen([sys.executable, "-m", "coco.cli.main", "cloud-api-adaptor", "serve",
                             *args], stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    out.close()
    try:
        deadline = time.monotonic() + 60
        while "serving" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the CAA did not start in 60 s"
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
