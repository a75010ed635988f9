"""The pod VM's root image: a Debian base from ``mmdebstrap``, this project and its Python
dependencies (wheels from PyPI for the guest's Python), the kernel modules, and the guest's init;
turned into an ext4 image with ``mke2fs -d`` (no mount needed).

Stages, each cached by :class:`~coco.host.podvm.cache.Cache`:

* ``base``: ``mmdebstrap --variant=apt`` of :data:`SUITE` with :data:`PACKAGES` (docs, man pages
  and locales left out);
* ``deps``: ``pip install --target`` of the project's requirements, binary wheels only, for the
  base's CPython on manylinux x86-64 (so the host's own Python does not matter);
* the image itself (see :mod:`coco.host.podvm.build`).
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from coco.errors import PodVmError
from coco.host.podvm.cache import Cache, digest
from coco.host.podvm.run import run

DIST = "confidential-containers"  # the distribution name (pyproject.toml); the package is coco
SUITE = "bookworm"
VARIANT = "apt"
PACKAGES = (
    "python3",
    "runc",
    "cryptsetup-bin",
    "iproute2",
    "busybox",
    "kmod",
    "mount",
    "tpm2-tools",
    "libtss2-tcti-device0",
    "ca-certificates",
    "libatomic1",  # regopy's librego_shared.so (the agent's policy engine) links it
)
DPKG_EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/info/*")
BASE_FORMAT = "1"
DEPS_FORMAT = "1"
# manylinux tags the guest's glibc (Debian 12: 2.36) accepts, newest first.
PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
)


def base_key(packages: Sequence[str]) -> str:
    return digest([BASE_FORMAT, SUITE, VARIANT, *sorted(packages), *DPKG_EXCLUDES])


def build_base(cache: Cache, packages: Sequence[str], say: Callable[[str], None]) -> Path:
    """The Debian root directory for ``packages``, built if not cached (lock held)."""
    key = base_key(packages)
    done = cache.path("base", key)
    if not done.is_dir():
        if os.geteuid() != 0:
            raise PodVmError(
                "pod VM build: the Debian root needs root (mmdebstrap and mke2fs keep file "
                f"owners), running as uid {os.geteuid()}"
            )
        say(f"base: mmdebstrap {SUITE} with {', '.join(sorted(packages))}")
        with cache.stage("base", key) as work:
            cmd = [
                "mmdebstrap",
                "--quiet",
                "--mode=root",
                f"--variant={VARIANT}",
                f"--include={','.join(sorted(packages))}",
                *(f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES),
                "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                SUITE,
                str(work / "root"),
            ]
            run(cmd, "pod VM build: base root")
    cache.touch(done)
    return done / "root"


def python_version(root: Path) -> str:
    """``3.11`` for a root whose ``/usr/bin/python3`` points at ``python3.11``."""
    target = os.readlink(root / "usr/bin/python3")
    m = re.fullmatch(r"python(3\.\d+)", target)
    if m is None:
        raise PodVmError(
            f"pod VM build: {root}/usr/bin/python3: expected a link to python3.N, found {target!r}"
        )
    return m.group(1)


def find_source(start: Path | None = None) -> Path:
    """The project checkout: ``start``, or the one the imported ``coco`` package lives in."""
    root = start if start is not None else Path(__file__).resolve().parents[4]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or not (root / "src/coco/__init__.py").is_file():
        raise PodVmError(
            f"pod VM build: {root}: expected the coco source tree (pyproject.toml and "
            "src/coco), found none: pass --source DIR"
        )
    if not re.search(rf'(?m)^name\s*=\s*"{DIST}"', pyproject.read_text()):
        raise PodVmError(f"pod VM build: {pyproject}: expected the project named {DIST!r}")
    return root


def source_files(root: Path) -> list[Path]:
    """What the wheel is built from: pyproject.toml, README.md and the package's files."""
    files = [root / "pyproject.toml"]
    for name in ("README.md", "LICENSE"):
        if (root / name).is_file():
            files.append(root / name)
    for path in (root / "src/coco").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.append(path)
    return sorted(files)


def build_wheel(root: Path, files: Sequence[Path], out: Path) -> Path:
    """Build the project's wheel from exactly ``files`` (copied to a scratch tree first)."""
    with tempfile.TemporaryDirectory(prefix="coco-podvm-src-") as tmp:
        for path in files:
            dest = Path(tmp) / path.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
             "--no-build-isolation", "--wheel-dir", out, tmp],
            "pod VM build: the coco wheel",
        )  # fmt: skip
    wheels = list(out.glob(DIST.replace("-", "_") + "-*.whl"))
    if len(wheels) != 1:
        raise PodVmError(f"pod VM build: expected one coco wheel, found {len(wheels)}")
    return wheels[0]


def requirements(wheel: Path) -> list[str]:
    """The wheel's ``Requires-Dist`` without optional extras."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.BytesParser().parsebytes(z.read(name), headersonly=True)
    return sorted(r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r)


def _pip_target(python: str) -> list[str]:
    abi = "cp" + python.replace(".", "")
    return [
        "--only-binary=:all:",
        *(f"--platform={p}" for p in PLATFORMS),
        f"--python-version={python}",
        "--implementation=cp",
        f"--abi={abi}",
        "--abi=abi3",
        "--abi=none",
    ]


def deps_key(reqs: Sequence[str], python: str) -> str:
    return digest([DEPS_FORMAT, python, *reqs, *PLATFORMS])


def build_deps(cache: Cache, reqs: Sequence[str], python: str, say: Callable[[str], None]) -> Path:
    """A site-packages directory with ``reqs`` for the guest's CPython (lock held)."""
    key = deps_key(reqs, python)
    done = cache.path("deps", key)
    if not done.is_dir():
        say(f"deps: {len(reqs)} requirements for CPython {python} (pip, binary wheels)")
        with cache.stage("deps", key) as work:
            run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-script-location",
                 "--target", work / "site", *_pip_target(python), *reqs],
                "pod VM build: Python dependencies",
            )  # fmt: skip
            shutil.rmtree(work / "site/bin", ignore_errors=True)  # scripts name the host's python
    cache.touch(done)
    return done / "site"


def install_coco(wheel: Path, site: Path, python: str) -> None:
    """Install the project's wheel (no dependencies) into ``site``."""
    run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
         "--no-warn-script-location", "--target", site, *_pip_target(python), wheel],
        "pod VM build: installing coco",
    )  # fmt: skip
    shutil.rmtree(site / "bin", ignore_errors=True)


def du(path: Path) -> int:
    """Bytes used by the files under ``path`` (blocks of 4 KiB, as ext4 will need)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            total += (st.st_size + 4095) // 4096 * 4096
    return total


def make_ext4(tree: Path, image: Path, label: str) -> None:
    """An ext4 image of ``tree`` (no journal: the guest mounts it read-only), sized to fit."""
    files = sum(len(f) + len(d) for _, d, f in os.walk(tree))
    size = du(tree) * 11 // 10 + files * 256 + (64 << 20)  # data, inodes, metadata headroom
    size_k = (size + 1023) // 1024
    run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0", "-L", label,
         "-N", str(files + 4096), "-E", "root_owner=0:0", "-d", tree, image, f"{size_k}k"],
        "pod VM build: root image",
    )  # fmt: skip
