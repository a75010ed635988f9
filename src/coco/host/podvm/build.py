"""``coco podvm build``: the pod VM image (kernel, initramfs, root image), cached by content.

An image is the directory ``image-<key>`` in the cache, holding ``vmlinuz``, ``initrd.img``,
``root.img`` and ``manifest.json``. The key hashes every input: the Debian package list, the
kernel and busybox versions apt would install, this project's source tree (what its wheel is
built from) and this build code with the guest's init. A second build with the same inputs finds
the directory and returns at once; builds take the cache's lock; a failed build leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from coco.errors import PodVmError
from coco.host.podvm import guest_init, kernel, rootfs
from coco.host.podvm.cache import Cache, digest, tree_digest
from coco.host.podvm.pause import write_pause_bundle
from coco.host.podvm.run import run

FORMAT = "1"
FILES = ("vmlinuz", "initrd.img", "root.img", "manifest.json")
COCO_WRAPPER = """#!/usr/bin/python3
from coco.cli.main import entry

entry()
"""


@dataclass(frozen=True)
class Image:
    """A built pod VM image directory; ``cached`` tells whether this call found it ready."""

    dir: Path
    cached: bool = True

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def root(self) -> Path:
        return self.dir / "root.img"

    @property
    def manifest(self) -> dict:
        return json.loads((self.dir / "manifest.json").read_text())

    @classmethod
    def open(cls, directory: Path) -> Image:
        """An existing image directory, checked for its files."""
        missing = [name for name in FILES[:3] if not (directory / name).is_file()]
        if missing:
            raise PodVmError(
                f"pod VM image {directory}: expected {', '.join(FILES[:3])}, "
                f"missing {', '.join(missing)} (build one with `coco podvm build -o DIR`)"
            )
        return cls(directory)


def code_digest() -> str:
    """The build code and the guest's init: a change to either makes a new image."""
    here = Path(__file__).parent
    return tree_digest(here, here.glob("*.py"))


def image_key(packages: Sequence[str], kernel_inputs: tuple[str, str, str], source: str) -> str:
    return digest(
        [FORMAT, rootfs.base_key(packages), kernel.kernel_key(kernel_inputs), source, code_digest()]
    )


def build(
    *,
    cache_dir: Path | None = None,
    source: Path | None = None,
    packages: Sequence[str] = (),
    output: Path | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> Image:
    """Build the pod VM image (or find it in the cache) and return it.

    ``packages`` are Debian packages added to :data:`rootfs.PACKAGES`; ``output`` also receives
    the image's files (hard links where possible)."""
    src = rootfs.find_source(source)
    files = rootfs.source_files(src)
    source_digest = tree_digest(src, files)
    all_packages = sorted({*rootfs.PACKAGES, *packages})
    cache = Cache(cache_dir)
    try:
        cache.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PodVmError(f"pod VM cache {cache.root}: cannot create it: {e.strerror}") from None
    inputs = kernel.kernel_inputs(memo=cache.root / "apt-inputs.json")
    key = image_key(all_packages, inputs, source_digest)
    done = cache.path("image", key)
    image = Image(done, cached=True)
    if not done.is_dir():
        with cache.locked(lambda: say("waiting for another pod VM build to finish")):
            if not done.is_dir():
                _build(cache, key, src, files, source_digest, all_packages, inputs, say)
                image = Image(done, cached=False)
                for kind in ("image", "base", "kernel", "deps"):
                    cache.prune(kind, keep=done)
    cache.touch(done)
    if output is not None:
        export(image, output)
    return image


def _build(
    cache: Cache,
    key: str,
    src: Path,
    files: list[Path],
    source_digest: str,
    packages: list[str],
    inputs: tuple[str, str, str],
    say: Callable[[str], None],
) -> None:
    start = time.monotonic()
    base = rootfs.build_base(cache, packages, say)
    kern = kernel.build_kernel(cache, inputs, say)
    python = rootfs.python_version(base)
    with cache.stage("image", key) as work:
        scratch = work / "scratch"
        scratch.mkdir()
        say(f"coco: wheel from {src}")
        wheel = rootfs.build_wheel(src, files, scratch / "wheel")
        reqs = rootfs.requirements(wheel)
        deps = rootfs.build_deps(cache, reqs, python, say)
        say("root: assembling and writing the ext4 image")
        tree = scratch / "root"
        run(["cp", "-a", base, tree], "pod VM build: copying the base root")
        site = tree / f"usr/local/lib/python{python}/dist-packages"
        site.mkdir(parents=True, exist_ok=True)
        run(["cp", "-a", f"{deps}/.", site], "pod VM build: copying the Python dependencies")
        rootfs.install_coco(wheel, site, python)
        lib = tree / "usr/lib" if (tree / "lib").is_symlink() else tree / "lib"
        run(["cp", "-a", kern.modules / "lib/modules", lib], "pod VM build: kernel modules")
        _guest_files(tree, key)
        write_pause_bundle(tree / "pause_bundle", kern.busybox)
        rootfs.make_ext4(tree, work / "root.img", kernel.ROOT_LABEL)
        kernel.pack_initramfs(kern, work / "initrd.img", scratch)
        shutil.copy2(kern.vmlinuz, work / "vmlinuz")
        shutil.rmtree(scratch)
        manifest = {
            "key": key,
            "suite": rootfs.SUITE,
            "packages": packages,
            "kernel": {"package": inputs[0], "version": inputs[1], "release": kern.version},
            "busybox": inputs[2],
            "python": python,
            "wheel": wheel.name,
            "requirements": reqs,
            "source_digest": source_digest,
            "code_digest": code_digest(),
            "build_seconds": round(time.monotonic() - start, 1),
            "sizes": {name: (work / name).stat().st_size for name in FILES[:3]},
            "root_allocated_bytes": (work / "root.img").stat().st_blocks * 512,
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"built in {time.monotonic() - start:.1f} s")


def _guest_files(tree: Path, key: str) -> None:
    """The guest's init, its module list, the ``coco`` command and a few /etc files."""
    lib = tree / "usr/lib/coco-podvm"
    lib.mkdir(parents=True)
    init = lib / "init"
    init.write_text("#!/usr/bin/python3 -IS\n" + Path(guest_init.__file__).read_text())
    init.chmod(0o755)
    (lib / "modules").write_text("\n".join(kernel.BOOT_MODULES) + "\n")
    wrapper = tree / "usr/local/bin/coco"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(COCO_WRAPPER)
    wrapper.chmod(0o755)
    for name, text in (
        ("hostname", "coco-podvm\n"),
        ("resolv.conf", "nameserver 10.0.2.3\n"),
        ("coco-podvm", f"{key}\n"),
    ):
        (tree / "etc" / name).unlink(missing_ok=True)
        (tree / "etc" / name).write_text(text)


def export(image: Image, output: Path) -> None:
    """Put the image's files into ``output`` (a new, empty or earlier output directory)."""
    if output.exists() and not output.is_dir():
        raise PodVmError(f"pod VM build: -o {output}: expected a directory, found a file")
    if output.is_dir() and any(output.iterdir()) and not (output / "manifest.json").exists():
        raise PodVmError(
            f"pod VM build: -o {output}: expected an empty directory or an earlier pod VM image, "
            "found other files (left untouched)"
        )
    output.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        tmp = output / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(image.dir / name, tmp)
        except OSError:
            shutil.copy2(image.dir / name, tmp)
        tmp.replace(output / name)
