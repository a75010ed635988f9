"""``coco podvm build``: module order, the content-addressed cache, and the real image."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from coco.cli.main import main
from coco.errors import PodVmError
from coco.host.podvm import kernel, rootfs
from coco.host.podvm.build import Image, build, export
from coco.host.podvm.cache import Cache

# The first test to use the session image pays for a cold build (minutes on a busy machine).
pytestmark = pytest.mark.timeout(900)

MODULES_DEP = """\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko
kernel/drivers/md/dm-bufio.ko: kernel/drivers/md/dm-mod.ko
kernel/drivers/md/dm-mod.ko:
"""


def test_load_order_puts_each_module_after_its_dependencies() -> None:
    table = kernel.parse_modules_dep(MODULES_DEP)
    order = kernel.load_order(table, ["dm_verity", "ext4"], "test")
    names = [kernel.module_name(p) for p in order]
    assert names.index("dm_mod") < names.index("dm_bufio") < names.index("dm_verity")
    assert {"crc16", "mbcache", "jbd2"} < set(names[: names.index("ext4")])
    assert len(names) == len(set(names)) == 7


def test_load_order_names_a_missing_module() -> None:
    table = kernel.parse_modules_dep(MODULES_DEP)
    with pytest.raises(PodVmError, match="the kernel has no module 'virtio_blk'"):
        kernel.load_order(table, ["ext4", "virtio_blk"], "test")


def test_cache_stage_that_fails_leaves_nothing(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    with cache.locked(), pytest.raises(RuntimeError), cache.stage("image", "k1") as work:
        (work / "root.img").write_bytes(b"half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in cache.root.iterdir()) == [".lock"]


def test_cache_lock_removes_stale_work_dirs(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    (tmp_path / ".tmp-base-abc").mkdir()
    (tmp_path / ".tmp-base-abc/file").write_text("left by a killed build")
    with cache.locked(), cache.stage("base", "k2") as work:
        (work / "root").mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "base-k2"]


def test_export_refuses_a_directory_with_other_files(tmp_path: Path) -> None:
    src = tmp_path / "image"
    src.mkdir()
    for name in ("vmlinuz", "initrd.img", "root.img", "manifest.json"):
        (src / name).write_text(name)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PodVmError, match="expected an empty directory"):
        export(Image(src), out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export(Image(src), tmp_path / "new")
    assert (tmp_path / "new/root.img").stat().st_ino == (src / "root.img").stat().st_ino


def test_find_source_refuses_a_directory_that_is_not_the_project(tmp_path: Path) -> None:
    with pytest.raises(PodVmError, match="expected the coco source tree"):
        rootfs.find_source(tmp_path)


def test_image_open_names_the_missing_files(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"x")
    with pytest.raises(PodVmError, match=r"missing initrd\.img, root\.img"):
        Image.open(tmp_path)


def _debugfs(image: Path, request: str) -> str:
    proc = subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    )
    return proc.stdout


def test_image_holds_the_guest(podvm_image: Image) -> None:
    manifest = podvm_image.manifest
    assert manifest["key"] in podvm_image.dir.name
    release = manifest["kernel"]["release"]
    assert podvm_image.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage
    assert podvm_image.initrd.read_bytes()[:2] == b"\x1f\x8b"
    root = podvm_image.root
    label = subprocess.run(
        ["dumpe2fs", "-h", str(root)], capture_output=True, text=True, check=True
    ).stdout
    assert "Filesystem volume name:   coco-root" in label
    init = _debugfs(root, "cat /usr/lib/coco-podvm/init")
    assert init.startswith("#!/usr/bin/python3 -IS\n") and "coco-podvm: " in init
    site = f"/usr/local/lib/python{manifest['python']}/dist-packages"
    assert "main.py" in _debugfs(root, f"ls {site}/coco/cli")
    assert "cryptography" in _debugfs(root, f"ls {site}")
    for tool in ("/usr/sbin/runc", "/usr/sbin/veritysetup", "/usr/bin/tpm2_pcrextend"):
        assert "Inode:" in _debugfs(root, f"stat {tool}"), tool
    assert "dm-verity.ko" in _debugfs(root, f"ls /usr/lib/modules/{release}/kernel/drivers/md")


def test_second_build_is_a_cache_hit(podvm_image: Image, podvm_source: Path) -> None:
    before = podvm_image.root.stat()
    again = build(source=podvm_source)
    assert again.cached and again.dir == podvm_image.dir
    after = again.root.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_build_that_fails_leaves_nothing_in_the_cache(
    podvm_image: Image, podvm_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The base and kernel stages come from the session's cache (hard links); the source's
    pyproject.toml is broken, so the image stage fails when it builds the wheel."""
    cache = tmp_path / "cache"
    cache.mkdir()
    m = podvm_image.manifest
    inputs = (m["kernel"]["package"], m["kernel"]["version"], m["busybox"])
    seeds = [f"base-{rootfs.base_key(m['packages'])}", f"kernel-{kernel.kernel_key(inputs)}"]
    for name in seeds:
        subprocess.run(["cp", "-al", str(podvm_image.dir.parent / name), str(cache)], check=True)
    source = tmp_path / "source"
    shutil.copytree(podvm_source, source)
    pyproject = source / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + "\n[tool.broken\n")  # not TOML any more
    with pytest.raises(SystemExit) as exit_:
        main(["podvm", "build", "--cache-dir", str(cache), "--source", str(source)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("coco: error: pod VM build: the coco wheel: ")
    assert sorted(p.name for p in cache.iterdir()) == sorted([".lock", "apt-inputs.json", *seeds])
