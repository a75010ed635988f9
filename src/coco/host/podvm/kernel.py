"""The pod VM's kernel stage and initramfs, from Debian's packages.

The kernel stage holds Debian's ``vmlinuz``, the subset of its modules the guest needs (with
their dependencies, indexed by ``depmod``) and ``busybox`` from ``busybox-static``. The initramfs
is busybox plus the modules that find the root disk, loaded by :data:`INITRAMFS_INIT` in
dependency order; it mounts the root image read-only under a tmpfs overlay and hands over to the
guest's init.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coco.errors import PodVmError
from coco.host.podvm.cache import Cache, digest
from coco.host.podvm.run import run

KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
ROOT_LABEL = "coco-root"
GUEST_INIT = "/usr/lib/coco-podvm/init"
# Loaded by the initramfs, in this order after their dependencies: enough to mount the root.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "overlay")
# Loaded by the guest's init at boot.
BOOT_MODULES = (
    "virtio_console",
    "virtio_net",
    "virtio_rng",
    "dm_verity",
    "dm_crypt",
    "loop",
    "overlay",
)
# Also in the root image, for modprobe on demand (shares, vsock, other image formats).
OTHER_MODULES = (
    "erofs",
    "squashfs",
    "9p",
    "9pnet_virtio",
    "virtiofs",
    "vmw_vsock_virtio_transport",
    "veth",
    "crc32c_intel",
)
# Whole directories of the module tree kept for the root (dm-crypt asks for ciphers by alias).
MODULE_DIRS = ("kernel/crypto", "kernel/arch/x86/crypto")
FORMAT = "1"  # bump when the stage's layout or content rules change

INITRAMFS_INIT = f"""#!/bin/busybox sh
# coco pod VM initramfs: load the root disk's modules, mount the root image read-only under a
# tmpfs overlay, and switch to the guest's init.
/bin/busybox mkdir -p /bin /dev /proc /sys /lower /upper /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
fail() {{ echo "coco-podvm: error: initramfs: $*"; sync; poweroff -f; sleep 10; }}
for m in $(cat /modules.order); do
  insmod "/lib/modules/$m" || fail "cannot load the kernel module $m"
done
root=LABEL={ROOT_LABEL}
init={GUEST_INIT}
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    root=*) root="${{arg#root=}}" ;;
    init=*) init="${{arg#init=}}" ;;
  esac
done
n=0
while :; do
  case "$root" in
    LABEL=*|UUID=*) dev=$(findfs "$root" 2>/dev/null) ;;
    *) dev="$root" ;;
  esac
  [ -n "$dev" ] && [ -b "$dev" ] && break
  n=$((n + 1))
  [ $n -gt 200 ] && fail "the root disk $root did not appear within 20 s"
  usleep 100000
done
mount -t ext4 -o ro "$dev" /lower || fail "cannot mount the root disk $dev"
mount -t tmpfs -o mode=0755 tmpfs /upper || fail "cannot mount a tmpfs for the overlay"
mkdir -p /upper/data /upper/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work /newroot \\
  || fail "cannot mount the root overlay"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot "$init"
"""


@dataclass(frozen=True)
class Kernel:
    """A finished kernel stage: ``vmlinuz``, ``modules/`` (a root holding ``lib/modules/VER``),
    ``busybox`` and ``initramfs.order`` (the initramfs modules, relative paths, in load order)."""

    dir: Path
    version: str

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def modules(self) -> Path:
        return self.dir / "modules"

    @property
    def busybox(self) -> Path:
        return self.dir / "busybox"

    def initramfs_modules(self) -> list[str]:
        return (self.dir / "initramfs.order").read_text().split()


APT_LISTS = Path("/var/lib/apt/lists")


def _lists_fingerprint() -> str:
    """Names, sizes and times of apt's package lists: they change when ``apt-get update`` does."""
    try:
        entries = sorted(APT_LISTS.iterdir())
        return digest([f"{p.name} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in entries])
    except OSError:
        return ""


def kernel_inputs(memo: Path | None = None) -> tuple[str, str, str]:
    """(kernel package, its version, busybox-static version) as apt would install them now.

    One ``apt-cache show`` (seconds where apt keeps no binary cache); with ``memo``, the answer is
    kept there and reused while apt's package lists are unchanged."""
    lists = _lists_fingerprint()
    if memo is not None and lists:
        try:
            saved = json.loads(memo.read_text())
            if saved["lists"] == lists:
                return tuple(saved["inputs"])  # type: ignore[return-value]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    inputs = _ask_apt()
    if memo is not None and lists:
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps({"lists": lists, "inputs": inputs}))
            tmp.replace(memo)
    return inputs


def _ask_apt() -> tuple[str, str, str]:
    what = "pod VM build: looking up the kernel"
    out = run(["apt-cache", "show", "--no-all-versions", KERNEL_META, BUSYBOX], what)
    stanzas = {}
    for block in out.split("\n\n"):
        fields = dict(re.findall(r"(?m)^([A-Za-z-]+):\s*(.*)$", block))
        if "Package" in fields:
            stanzas[fields["Package"]] = fields
    if KERNEL_META not in stanzas or BUSYBOX not in stanzas:
        raise PodVmError(
            f"{what}: apt knows no installable {KERNEL_META} or {BUSYBOX}: run apt-get update "
            "(expected a Debian system with its package lists)"
        )
    m = re.search(
        r"(linux-image-[^\s,(]+)(?:\s*\(=\s*([^)\s]+)\))?", stanzas[KERNEL_META].get("Depends", "")
    )
    if m is None:
        raise PodVmError(
            f"{what}: {KERNEL_META} depends on no kernel package: found "
            f"{stanzas[KERNEL_META].get('Depends', 'no Depends')!r}"
        )
    version = m.group(2) or stanzas[KERNEL_META]["Version"]
    return m.group(1), version, stanzas[BUSYBOX]["Version"]


def kernel_key(inputs: tuple[str, str, str]) -> str:
    return digest(
        [FORMAT, *inputs, *INITRAMFS_MODULES, *BOOT_MODULES, *OTHER_MODULES, *MODULE_DIRS]
    )


def _download(package: str, dest: Path, what: str) -> Path:
    """``apt-get download`` ``package`` into a fresh directory and unpack it at ``dest``."""
    with tempfile.TemporaryDirectory(prefix="coco-podvm-deb-") as tmp:
        run(
            ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", package],
            what,
            cwd=Path(tmp),
        )
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise PodVmError(f"{what}: expected one .deb from apt-get download, found {len(debs)}")
        run(["dpkg-deb", "-x", debs[0], dest], what)
    return dest


def module_name(path: str) -> str:
    """``kernel/drivers/md/dm-verity.ko`` -> ``dm_verity``."""
    base = path.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep -> {name: (path, [dependency paths])}."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        table[module_name(path)] = (path, deps.split())
    return table


def load_order(table: dict[str, tuple[str, list[str]]], wanted: list[str], where: str) -> list[str]:
    """The module paths to load for ``wanted``, every module after its dependencies."""
    by_path = {path: name for name, (path, _) in table.items()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        path, deps = table[name]
        for dep in deps:
            visit(by_path[dep])
        order.append(path)

    for name in wanted:
        if name not in table:
            raise PodVmError(f"{where}: the kernel has no module {name!r}")
        visit(name)
    return order


def build_kernel(cache: Cache, inputs: tuple[str, str, str], say: Callable[[str], None]) -> Kernel:
    """The kernel stage for ``inputs`` (see :func:`kernel_inputs`), built if not cached.
    Call with the cache lock held."""
    key = kernel_key(inputs)
    done = cache.path("kernel", key)
    if not done.is_dir():
        package, version, busybox = inputs
        say(f"kernel: {package} {version} and {BUSYBOX} {busybox} (apt-get download)")
        with cache.stage("kernel", key) as work:
            _build(work, package, busybox)
    cache.touch(done)
    return Kernel(done, (done / "version").read_text().strip())


def _build(work: Path, package: str, busybox_version: str) -> None:
    what = "pod VM build: kernel"
    full = _download(package, work / "full", what)
    versions = os.listdir(full / "lib/modules")
    if len(versions) != 1:
        raise PodVmError(f"{what}: expected one module tree in {package}, found {versions}")
    version = versions[0]
    tree = full / "lib/modules" / version
    run(["depmod", "-b", full, version], what)
    table = parse_modules_dep((tree / "modules.dep").read_text())
    initramfs = load_order(table, list(INITRAMFS_MODULES), what)
    extra = [
        module_name(str(p.relative_to(tree)))
        for d in MODULE_DIRS
        for p in sorted((tree / d).rglob("*.ko*"))
    ]
    keep = load_order(table, [*INITRAMFS_MODULES, *BOOT_MODULES, *OTHER_MODULES, *extra], what)
    dest = work / "modules/lib/modules" / version
    for rel in keep:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree / rel, dest / rel)
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        shutil.copy2(tree / name, dest / name)
    run(["depmod", "-b", work / "modules", version], what)
    shutil.copy2(full / "boot" / f"vmlinuz-{version}", work / "vmlinuz")
    shutil.rmtree(full)
    bb = _download(f"{BUSYBOX}={busybox_version}", work / "bb", what)
    shutil.copy2(bb / "bin/busybox", work / "busybox")
    shutil.rmtree(bb)
    (work / "initramfs.order").write_text("\n".join(initramfs) + "\n")
    (work / "version").write_text(version + "\n")


def pack_initramfs(kernel: Kernel, out: Path, work: Path) -> None:
    """Write the gzip'd newc initramfs for ``kernel`` to ``out``, using ``work`` as scratch."""
    tree = work / "initramfs"
    (tree / "bin").mkdir(parents=True)
    (tree / "dev").mkdir()
    shutil.copy2(kernel.busybox, tree / "bin/busybox")
    mods = kernel.modules / "lib/modules" / kernel.version
    order = []
    for rel in kernel.initramfs_modules():
        name = rel.rsplit("/", 1)[-1]
        (tree / "lib/modules").mkdir(parents=True, exist_ok=True)
        shutil.copy2(mods / rel, tree / "lib/modules" / name)
        order.append(name)
    (tree / "modules.order").write_text("\n".join(order) + "\n")
    init = tree / "init"
    init.write_text(INITRAMFS_INIT)
    init.chmod(0o755)
    os.mknod(tree / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    proc = subprocess.run(
        [str(kernel.busybox), "cpio", "-o", "-H", "newc"],
        input="\n".join(names).encode() + b"\n",
        cwd=tree,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        reason = proc.stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise PodVmError(f"pod VM build: initramfs: busybox cpio failed: {reason}")
    out.write_bytes(gzip.compress(proc.stdout, compresslevel=6, mtime=0))
