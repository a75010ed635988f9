"""The storage drivers of CreateSandbox and CreateContainer (upstream's driver names).

- ``image_guest_pull``: the image is pulled in the guest by the CDH (ttRPC
  ``api.ImagePullService/PullImage`` into ``<root>/<cid>``; the host never sees the plaintext).
  The sandbox (pause) container's storage, source ``pause``, is the guest's own pause bundle;
- ``local``: a directory (``mode=``, ``fsgid=`` options); ``ephemeral``: tmpfs / hugetlbfs;
- ``overlayfs``: an overlay; the tardev form (fstype ``fuse3.kata-overlay``) stacks the layer
  mounts below ``<root>/sandbox/layers/`` named by ``lowerdir=``, with ``overlay-rw`` a writable
  upper in ``<root>/<cid>/``;
- ``virtio-fs`` / ``9p``: the host's share;
- ``blk`` (and ``mmioblk``, ``scsi``, ``nvdimm``): a block device; a tardev layer
  (``io.katacontainers.fs-opt.is-layer``) is opened with dm-verity (``veritysetup open``, the
  root hash from ``io.katacontainers.fs-opt.root-hash``, which the policy checked) and mounted
  read-only: with the kernel's ``tar`` filesystem when it has one, else the verified tar is
  unpacked (every byte read through dm-verity) into a directory that is then made read-only.

Every mount is recorded so a failure part-way through, or the removal of the container, undoes
exactly what was done (mounts, dm devices, directories), in reverse order. Storages are counted
by mount point, so a layer two containers share is mounted once and removed with the last user.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import logging
import os
import re
import shutil
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from coco.guest.agent import mount as m
from coco.guest.agent.config import AgentConfig
from coco.guest.agent.errors import StorageError
from coco.rpc.status import Code

log = logging.getLogger(__name__)

LAYER = "io.katacontainers.fs-opt.layer="
IS_LAYER = "io.katacontainers.fs-opt.is-layer"
ROOT_HASH = "io.katacontainers.fs-opt.root-hash="
OVERLAY_RW = "io.katacontainers.fs-opt.overlay-rw"
LAYER_SRC_PREFIX = "io.katacontainers.fs-opt.layer-src-prefix="
BLOCK_DEVICE_FILE = "io.katacontainers.fs-opt.block_device=file"
CREATE_DIR = "io.katacontainers.volume.overlayfs.create_directory="
GUEST_PULL = "image_guest_pull"
DRIVERS = (
    "blk", "mmioblk", "scsi", "nvdimm", "ephemeral", "local", "overlayfs", "virtio-fs", "9p",
    "image_guest_pull",
)  # fmt: skip
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

Puller = Callable[[str, str], Awaitable[str]]
"""(image reference, bundle path) -> manifest digest: the CDH's PullImage."""


@dataclass
class Undo:
    """What one storage did, to be undone in reverse order."""

    mount_point: str
    steps: list[tuple[str, str]] = field(default_factory=list)  # (kind, arg)
    pulled_process: dict | None = None  # image_guest_pull: the image's process (config.json)
    pause_process: dict | None = None  # the pause bundle's process replaces the host's

    def add(self, kind: str, arg: str) -> None:
        self.steps.append((kind, arg))


async def undo(u: Undo) -> None:
    for kind, arg in reversed(u.steps):
        try:
            if kind == "mount":
                m.umount(arg)
            elif kind == "mounts_under":
                for mp in m.mounts_under(arg):
                    m.umount(mp)
            elif kind == "verity":
                await _run(["veritysetup", "close", arg], f"dm-verity {arg}: close")
            elif kind == "dir":
                shutil.rmtree(arg, ignore_errors=True)
            elif kind == "rmdir":
                with contextlib.suppress(OSError):
                    os.rmdir(arg)
        except Exception as e:  # undo everything that can be undone; log the rest
            log.error("storage %s: undo %s %s: %s", u.mount_point, kind, arg, e)


async def _run(cmd: list[str], what: str, timeout: float = 60.0) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except OSError as e:
        raise StorageError(f"{what}: cannot run {cmd[0]}: {e.strerror or e}") from None
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    if proc.returncode != 0:
        text = " ".join((err or out).decode(errors="replace").split())
        raise StorageError(f"{what}: {cmd[0]} failed: {text or f'exit {proc.returncode}'}")
    return out.decode(errors="replace")


def _mkdir(path: str, u: Undo) -> None:
    """Create ``path`` and its missing parents, recording the ones created."""
    missing = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
        u.add("rmdir", str(d))


def _do_mount(source: str, target: str, fstype: str, options: list[str], u: Undo) -> None:
    flags, data = m.parse_options(options)
    try:
        m.mount(source, target, fstype, flags, data)
    except OSError as e:
        raise StorageError(f"storage {u.mount_point}: {e.strerror}") from None
    u.add("mount", target)
    if flags & m.MS_BIND and flags & m.MS_RDONLY:  # a bind mount takes ro only on remount
        try:
            m.mount("", target, "", flags | m.MS_REMOUNT, "")
        except OSError as e:
            raise StorageError(
                f"storage {u.mount_point}: read-only remount: {e.strerror}"
            ) from None


class Storages:
    """The storage drivers over one agent configuration and the CDH puller."""

    def __init__(self, cfg: AgentConfig, pull: Puller) -> None:
        self.cfg = cfg
        self.pull = pull
        self._users: dict[str, tuple[int, Undo]] = {}

    async def add_all(self, storages: list, cid: str, annotations: dict[str, str]) -> list[Undo]:
        """Mount ``storages`` in order; on a failure undo the ones done, then raise."""
        done: list[Undo] = []
        try:
            for s in storages:
                done.append(await self.add(s, cid, annotations))
        except BaseException:
            await self.release(done)
            raise
        return done

    async def add(self, s, cid: str, annotations: dict[str, str]) -> Undo:
        mp = self.cfg.guest_path(s.mount_point)
        if not os.path.isabs(mp) or ".." in Path(mp).parts:
            raise StorageError(
                f"storage {s.driver}: mount_point: expected an absolute path without '..', "
                f"got {s.mount_point!r}",
                Code.INVALID_ARGUMENT,
            )
        known = self._users.get(mp)
        if known is not None and s.driver != GUEST_PULL:
            self._users[mp] = (known[0] + 1, known[1])
            return known[1]
        u = Undo(mp)
        try:
            await self._handle(s, mp, cid, annotations, u)
        except BaseException:
            await undo(u)
            raise
        if s.driver != GUEST_PULL:
            self._users[mp] = (1, u)
        return u

    async def release(self, undos: list[Undo]) -> None:
        for u in reversed(undos):
            known = self._users.get(u.mount_point)
            if known is not None and known[1] is u:
                if known[0] > 1:
                    self._users[u.mount_point] = (known[0] - 1, u)
                    continue
                del self._users[u.mount_point]
            await undo(u)

    async def _handle(self, s, mp: str, cid: str, anno: dict[str, str], u: Undo) -> None:
        driver = s.driver
        if driver == GUEST_PULL:
            await self._guest_pull(s, mp, cid, anno, u)
        elif driver == "local":
            self._local(s, mp, u)
        elif driver == "ephemeral":
            _mkdir(mp, u)
            _do_mount(s.source or "tmpfs", mp, s.fstype or "tmpfs", list(s.options), u)
        elif driver == "overlayfs":
            self._overlay(s, mp, cid, u)
        elif driver in ("virtio-fs", "9p"):
            _mkdir(mp, u)
            fstype = s.fstype or ("virtiofs" if driver == "virtio-fs" else "9p")
            _do_mount(s.source, mp, fstype, list(s.options), u)
        elif driver in ("blk", "mmioblk", "scsi", "nvdimm"):
            await self._block(s, mp, u)
        else:
            raise StorageError(
                f"storage {mp}: unknown driver {driver!r}; this agent handles {', '.join(DRIVERS)}"
            )

    # --- drivers ----------------------------------------------------------------------------------

    async def _guest_pull(self, s, mp: str, cid: str, anno: dict[str, str], u: Undo) -> None:
        import json

        opts = [o for o in s.driver_options if o.split("=", 1)[0] == GUEST_PULL]
        if not opts:
            raise StorageError(
                f"storage {mp}: image_guest_pull: expected a driver option "
                f"'image_guest_pull=<json>', got {list(s.driver_options)}",
                Code.INVALID_ARGUMENT,
            )
        bundle = os.path.join(self.cfg.container_root, cid)
        if anno.get("io.kubernetes.cri.container-type") == "sandbox":
            self._pause_bundle(bundle, mp, u)
            return
        if not s.source:
            raise StorageError(
                f"storage {mp}: image_guest_pull: no image reference (the shim takes it from "
                "the annotation io.kubernetes.cri.image-name)",
                Code.INVALID_ARGUMENT,
            )
        if os.path.lexists(bundle):
            raise StorageError(f"image_guest_pull {s.source}: bundle {bundle} already exists")
        _mkdir(os.path.dirname(bundle), u)
        try:  # the CDH makes the bundle, and leaves nothing when the pull fails
            digest = await self.pull(s.source, bundle)
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(f"image_guest_pull {s.source}: {e}") from None
        u.add("dir", bundle)
        u.add("mounts_under", bundle)
        log.info("container %s: image %s pulled in the guest (%s)", cid, s.source, digest)
        rootfs = os.path.join(bundle, "rootfs")
        with contextlib.suppress(OSError, ValueError):
            u.pulled_process = json.loads(Path(bundle, "config.json").read_text()).get("process")
        if os.path.realpath(mp) != os.path.realpath(rootfs):
            _mkdir(mp, u)
            _do_mount(rootfs, mp, "", ["rbind"], u)

    def _pause_bundle(self, bundle: str, mp: str, u: Undo) -> None:
        import json

        src = Path(self.cfg.pause_bundle)
        try:
            doc = json.loads((src / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise StorageError(
                f"storage {mp}: the sandbox's pause bundle {src}/config.json is unusable: {e}"
            ) from None
        _mkdir(bundle, u)
        root = src / doc.get("root", {}).get("path", "rootfs")
        try:
            shutil.copytree(root, mp, symlinks=True, dirs_exist_ok=False)
        except (OSError, shutil.Error) as e:
            raise StorageError(f"storage {mp}: copying the pause bundle {root}: {e}") from None
        u.add("dir", mp)
        u.pause_process = doc.get("process")

    def _local(self, s, mp: str, u: Undo) -> None:
        mode = 0o777
        gid = None
        for o in s.options:
            key, _, value = o.partition("=")
            try:
                if key == "mode":
                    mode = int(value, 8)
                elif key == "fsgid":
                    gid = int(value)
            except ValueError:
                raise StorageError(
                    f"storage {mp}: local: option {o!r}: expected an octal mode or a number",
                    Code.INVALID_ARGUMENT,
                ) from None
        _mkdir(mp, u)
        os.chmod(mp, mode)
        if gid is not None:
            os.chown(mp, -1, gid)

    def _overlay(self, s, mp: str, cid: str, u: Undo) -> None:
        opts = list(s.options)
        for o in s.driver_options:
            if o.startswith(CREATE_DIR):
                d = self.cfg.guest_path(o[len(CREATE_DIR) :])
                _mkdir(d, u)
        rw = OVERLAY_RW in opts
        layer_dir = os.path.join(self.cfg.container_root, "sandbox", "layers")
        data = []
        for o in opts:
            if o.startswith(("io.katacontainers.fs-opt.", "io.katacontainers.volume")):
                continue
            if o.startswith("lowerdir=") and s.fstype == "fuse3.kata-overlay":
                ids = o[len("lowerdir=") :].split(":")
                lowers = []
                for i in ids:
                    if not i or "/" in i or i in (".", ".."):
                        raise StorageError(
                            f"storage {mp}: overlay layer id {i!r}: expected a layer name",
                            Code.INVALID_ARGUMENT,
                        )
                    lowers.append(os.path.join(layer_dir, i))
                    if not os.path.isdir(lowers[-1]):
                        raise StorageError(
                            f"storage {mp}: layer {i} is not mounted at {lowers[-1]}"
                        )
                o = "lowerdir=" + ":".join(lowers)
            elif o.startswith(("lowerdir=", "upperdir=", "workdir=")):
                key, _, paths = o.partition("=")
                o = key + "=" + ":".join(self.cfg.guest_path(p) for p in paths.split(":"))
            data.append(o)
        if not any(o.startswith("lowerdir=") for o in data):
            raise StorageError(
                f"storage {mp}: overlayfs: expected a lowerdir= option, got {opts}",
                Code.INVALID_ARGUMENT,
            )
        if rw:
            base = os.path.join(self.cfg.container_root, cid)
            _mkdir(base, u)
            for sub in ("upper", "work"):
                _mkdir(os.path.join(base, sub), u)
                u.add("dir", os.path.join(base, sub))
            data += [f"upperdir={base}/upper", f"workdir={base}/work"]
        if s.fstype == "fuse3.kata-overlay":
            data += ["index=off", "xino=off"]
        _mkdir(mp, u)
        _do_mount("overlay", mp, "overlay", data, u)

    async def _block(self, s, mp: str, u: Undo) -> None:
        opts = list(s.options)
        if IS_LAYER in opts:
            _root_hash(opts, mp)
            require_device_mapper(os.path.basename(mp.rstrip("/")))
        dev = self._device(s.source, mp)
        if IS_LAYER in opts:
            await self._tardev_layer(dev, mp, opts, u)
            return
        _mkdir(mp, u)
        _do_mount(dev, mp, s.fstype, [o for o in opts if not o.startswith("io.katacontainers.")], u)

    def _device(self, source: str, mp: str) -> str:
        """The block device (or, for a tardev ``block_device=file``, file) a source names: a
        path, or a PCI path (``02/01``) / address (``0000:00:02.0``) of a virtio-blk disk."""
        if source.startswith("/"):
            if not os.path.exists(source):
                raise StorageError(f"storage {mp}: device {source} does not exist")
            return source
        slot = source.split("/")[-1]
        for blk in sorted(Path("/sys/block").glob("*")):
            try:
                target = os.path.realpath(blk / "device")
            except OSError:
                continue
            parts = target.split("/")
            if any(
                p == source or p.endswith(f":{slot}.0") or p.endswith(f":{slot}") for p in parts
            ):
                return f"/dev/{blk.name}"
        raise StorageError(f"storage {mp}: no block device for {source!r} under /sys/block")

    async def _tardev_layer(self, dev: str, mp: str, opts: list[str], u: Undo) -> None:
        name = os.path.basename(mp.rstrip("/"))
        verified = await open_verity(dev, name, _root_hash(opts, mp), u)
        _mkdir(mp, u)
        if _has_filesystem("tar"):
            _do_mount(verified, mp, "tar", ["ro"], u)
            return
        u.add("dir", mp)  # the unpacked files go with the layer's last user (or a failure)
        await asyncio.to_thread(_unpack_verified, verified, mp)
        u.add("mounts_under", mp)
        _do_mount(mp, mp, "", ["bind", "ro"], u)


def _root_hash(opts: list[str], mp: str) -> str:
    hashes = [o[len(ROOT_HASH) :] for o in opts if o.startswith(ROOT_HASH)]
    if len(hashes) != 1 or not _HEX64.match(hashes[0]):
        raise StorageError(
            f"storage {mp}: tardev layer: expected one option {ROOT_HASH}<64 hex digits>, "
            f"got {hashes or 'none'}",
            Code.INVALID_ARGUMENT,
        )
    return hashes[0]


def verity_trailer(dev: str) -> tuple[int, int, int]:
    """(data block size, hash block size, data blocks) from the tardev verity trailer."""
    fd = os.open(dev, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size < 8192 or size % 4096:
            raise StorageError(
                f"tardev layer {dev}: expected a multiple of 4096 bytes (at least 8192), "
                f"found {size}"
            )
        raw = os.pread(fd, 16, size - 512)
    finally:
        os.close(fd)
    dbs, hbs, blocks = struct.unpack("<IIQ", raw)
    if dbs != 4096 or hbs != 4096 or not 0 < blocks * dbs < size:
        raise StorageError(
            f"tardev layer {dev}: verity trailer: expected 4096-byte blocks covering part of the "
            f"device, found data block size {dbs}, hash block size {hbs}, {blocks} blocks"
        )
    return dbs, hbs, blocks


def require_device_mapper(name: str) -> None:
    if not os.path.exists("/dev/mapper/control"):
        raise StorageError(
            f"tardev layer {name}: dm-verity needs the kernel's device-mapper, and this machine "
            "has none (/dev/mapper/control is missing); the layer cannot be verified, so it is "
            "not mounted"
        )


async def open_verity(dev: str, name: str, root_hash: str, u: Undo) -> str:
    """Open ``dev`` as dm-verity device ``/dev/mapper/<name>`` with ``root_hash``."""
    require_device_mapper(name)
    dbs, hbs, blocks = verity_trailer(dev)
    cmd = [
        "veritysetup", "open", "--no-superblock", "--format=1", "--hash=sha256",
        f"--data-block-size={dbs}", f"--hash-block-size={hbs}", f"--data-blocks={blocks}",
        f"--hash-offset={blocks * dbs}", "--salt=" + "0" * 64, dev, name, dev, root_hash,
    ]  # fmt: skip
    try:
        await _run(cmd, f"tardev layer {name}: dm-verity open")
    except StorageError as e:
        if "verification" in str(e).lower() or "root hash" in str(e).lower():
            raise StorageError(
                f"tardev layer {name}: wrong root hash: {dev} does not verify against "
                f"{root_hash} (veritysetup: {e})"
            ) from None
        raise
    u.add("verity", name)
    verified = f"/dev/mapper/{name}"
    # the kernel checks the root hash on the first read (veritysetup opens any hash): a block
    # that does not verify reads as EIO, so read one now to tell a wrong hash apart clearly
    try:
        fd = os.open(verified, os.O_RDONLY)
        try:
            os.pread(fd, dbs, 0)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno != errno.EIO:
            raise StorageError(f"tardev layer {name}: reading {verified}: {e.strerror}") from None
        raise StorageError(
            f"tardev layer {name}: wrong root hash: {dev} does not verify against {root_hash} "
            "(dm-verity refused its first block)"
        ) from None
    return verified


def _has_filesystem(name: str) -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == name for line in f if line.strip())
    except OSError:
        return False


def _unpack_verified(dev: str, dest: str) -> None:
    from coco.errors import UnpackError
    from coco.image.unpack import unpack_layer

    with open(dev, "rb") as f:
        try:
            unpack_layer(f, dest)
        except OSError as e:
            if e.errno == errno.EIO:  # a block that fails verification reads as EIO
                raise StorageError(
                    f"tardev layer {dev}: a block does not verify against the root hash "
                    "(the layer's data was altered): not mounted"
                ) from None
            raise StorageError(f"tardev layer {dev}: {e}") from None
        except UnpackError as e:
            raise StorageError(f"tardev layer {dev}: {e}") from None


def decode_layer_option(option: str) -> str:
    """``<id>,tar,ro,...`` from an ``io.katacontainers.fs-opt.layer=<base64>`` option."""
    return base64.b64decode(option[len(LAYER) :]).decode()
