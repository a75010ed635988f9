"""``SecureMount``: storage whose key only an attested guest gets (the ``block-device`` type).

A request names a volume type, string options, mount flags and a mount point. For
``block-device`` with ``encryptionType = "luks2"`` the device (``devicePath``, or ``deviceId``
``MAJ:MIN``) is opened with ``cryptsetup`` under a key that is a sealed secret (``sealed.…``), a
KBS resource (``kbs:///…``), a file (``file:///…``) or, when no key is given, 4096 random bytes
that exist only for this boot (an ephemeral scratch disk). ``sourceType = "empty"`` formats the
device first (LUKS2, with ``dataIntegrity = "true"`` adding dm-integrity); ``targetType`` is
``fileSystem`` (made with ``mkfs -t <filesystemType>`` on an empty device, then mounted at the
mount point) or ``device`` (the opened mapper device bound onto the mount point).

All of this needs the kernel's device mapper, which exists in the guest VM but not on every host:
:meth:`SecureMounter.mount` checks the request fully first, then that ``/dev/mapper/control`` and
``cryptsetup`` are there, and says which is missing, before any key is fetched or any device is
touched. The key goes to ``cryptsetup`` on its standard input, never to a file.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from coco.guest.cdh.errors import SecureMountError

BLOCK_DEVICE = "block-device"
NOT_BUILT_IN = ("alibaba-cloud-oss",)
DM_CONTROL = "/dev/mapper/control"
EPHEMERAL_KEY_SIZE = 4096
_OPTIONS = {
    "deviceId", "devicePath", "sourceType", "encryptionType", "key", "targetType",
    "filesystemType", "mkfsOpts", "dataIntegrity", "mapperName", "pool", "dataset",
}  # fmt: skip
_MAPPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,126}$")
_FS_TYPE = re.compile(r"^[a-z0-9]{1,16}$")
_FLAG = re.compile(r"^[a-z0-9_=,.-]{1,64}$")


@dataclass(frozen=True, slots=True)
class LuksRequest:
    """A checked ``block-device`` request."""

    device: str
    format: bool
    target: str
    filesystem: str
    mkfs_opts: tuple[str, ...]
    integrity: bool
    mapper_name: str
    key: str | None
    flags: tuple[str, ...]
    mount_point: str


def parse_request(
    volume_type: str, options: Mapping[str, str], flags: Sequence[str], mount_point: str
) -> LuksRequest:
    """Check a SecureMount request without touching the system (device existence aside)."""
    where = f"SecureMount {volume_type!r}"
    if volume_type in NOT_BUILT_IN:
        raise SecureMountError(f"{where}: volume type not built in (built in: {BLOCK_DEVICE})")
    if volume_type != BLOCK_DEVICE:
        raise SecureMountError(f"{where}: unknown volume type (expected {BLOCK_DEVICE!r})")
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise SecureMountError(
            f"{where}: unknown option {unknown[0]!r} (expected some of {', '.join(sorted(_OPTIONS))})"
        )
    for k, v in options.items():
        if not isinstance(v, str):
            raise SecureMountError(f"{where}: option {k!r}: expected a string, found {v!r}")

    def choice(key: str, allowed: tuple[str, ...], default: str | None = None) -> str:
        v = options.get(key, default)
        if v not in allowed:
            raise SecureMountError(
                f"{where}: {key}: expected one of {', '.join(allowed)}, found {v!r}"
            )
        return v

    source = choice("sourceType", ("empty", "encrypted"))
    enc = choice("encryptionType", ("luks2", "zfs"))
    if enc == "zfs":
        raise SecureMountError(f"{where}: encryptionType 'zfs' is not built in (built in: luks2)")
    target = choice("targetType", ("fileSystem", "device"), "fileSystem")
    integrity = choice("dataIntegrity", ("true", "false"), "false") == "true"
    fs = options.get("filesystemType", "ext4")
    if not _FS_TYPE.match(fs):
        raise SecureMountError(
            f"{where}: filesystemType: expected a file system name like ext4, found {fs!r}"
        )
    mkfs_opts = tuple(options.get("mkfsOpts", "").split())
    for o in mkfs_opts:
        if o.startswith("/") or "\n" in o:
            raise SecureMountError(
                f"{where}: mkfsOpts: unexpected {o!r} (the device is added by the hub)"
            )
    device = _device(options, where)
    name = options.get("mapperName") or f"coco-secure-{Path(device).name}"
    if not _MAPPER_NAME.match(name):
        raise SecureMountError(
            f"{where}: mapperName: expected letters, digits, '_', '.', '-' (up to 127), found {name!r}"
        )
    key = options.get("key")
    if key is not None and not key.startswith(("sealed.", "kbs://", "file://")):
        raise SecureMountError(
            f"{where}: key: expected sealed.…, kbs:///repo/type/tag or file:///path, found "
            f"{key[:16]!r}"
        )
    if source == "encrypted" and key is None:
        raise SecureMountError(
            f"{where}: sourceType 'encrypted' needs the device's key (option 'key')"
        )
    if not isinstance(mount_point, str) or not os.path.isabs(mount_point):
        raise SecureMountError(
            f"{where}: mount_point: expected an absolute path, found {mount_point!r}"
        )
    for f in flags:
        if not isinstance(f, str) or not _FLAG.match(f):
            raise SecureMountError(
                f"{where}: flag {f!r}: expected a mount option like ro or noexec"
            )
    return LuksRequest(
        device,
        source == "empty",
        target,
        fs,
        mkfs_opts,
        integrity,
        name,
        key,
        tuple(flags),
        mount_point,
    )


def _device(options: Mapping[str, str], where: str) -> str:
    path, dev_id = options.get("devicePath"), options.get("deviceId")
    if (path is None) == (dev_id is None):
        raise SecureMountError(f"{where}: expected exactly one of devicePath and deviceId")
    if dev_id is not None:
        m = re.fullmatch(r"(\d{1,10}):(\d{1,10})", dev_id)
        if m is None:
            raise SecureMountError(f"{where}: deviceId: expected MAJOR:MINOR, found {dev_id!r}")
        return f"/dev/block/{m[1]}:{m[2]}"
    assert path is not None
    if not os.path.isabs(path) or ".." in Path(path).parts:
        raise SecureMountError(
            f"{where}: devicePath: expected an absolute /dev path, found {path!r}"
        )
    return path


Runner = Callable[..., subprocess.CompletedProcess[bytes]]


class SecureMounter:
    """Carries out checked requests; ``key_for`` turns the ``key`` option into key bytes."""

    def __init__(
        self,
        key_for: Callable[[str], bytes],
        *,
        dm_control: str = DM_CONTROL,
        run: Runner = subprocess.run,
    ) -> None:
        self.key_for = key_for
        self.dm_control = dm_control
        self.run = run

    def check_host(self, where: str) -> None:
        if not os.path.exists(self.dm_control):
            raise SecureMountError(
                f"{where}: the kernel's device mapper is not available here (no {self.dm_control}); "
                "a LUKS2 secure mount needs it, as inside the guest VM"
            )
        if shutil.which("cryptsetup") is None:
            raise SecureMountError(f"{where}: cryptsetup is not installed (expected it on PATH)")

    def mount(
        self, volume_type: str, options: Mapping[str, str], flags: Sequence[str], mount_point: str
    ) -> None:
        req = parse_request(volume_type, options, flags, mount_point)
        where = f"SecureMount {req.device}"
        self.check_host(where)
        try:
            st = os.stat(req.device)
        except OSError as e:
            raise SecureMountError(f"{where}: cannot use the device: {e.strerror}") from None
        if not stat.S_ISBLK(st.st_mode):
            raise SecureMountError(f"{where}: expected a block device, found another kind of file")
        key = self.key_for(req.key) if req.key is not None else os.urandom(EPHEMERAL_KEY_SIZE)
        if req.format:
            args = ["luksFormat", "--type", "luks2", "--batch-mode", "--key-file", "-"]
            if req.integrity:
                args += ["--integrity", "hmac-sha256"]
            self._cmd(["cryptsetup", *args, req.device], where, key)
        self._cmd(
            [
                "cryptsetup",
                "open",
                "--type",
                "luks2",
                "--key-file",
                "-",
                req.device,
                req.mapper_name,
            ],
            where,
            key,
        )
        mapped = f"/dev/mapper/{req.mapper_name}"
        try:
            opts = ["-o", ",".join(req.flags)] if req.flags else []
            if req.target == "fileSystem":
                if req.format:
                    self._cmd(["mkfs", "-t", req.filesystem, *req.mkfs_opts, mapped], where)
                os.makedirs(req.mount_point, exist_ok=True)
                self._cmd(["mount", "-t", req.filesystem, *opts, mapped, req.mount_point], where)
            else:
                Path(req.mount_point).parent.mkdir(parents=True, exist_ok=True)
                Path(req.mount_point).touch(exist_ok=True)
                self._cmd(["mount", "--bind", *opts, mapped, req.mount_point], where)
        except BaseException:
            self.run(["cryptsetup", "close", req.mapper_name], capture_output=True, check=False)
            raise

    def _cmd(self, argv: list[str], where: str, stdin: bytes | None = None) -> None:
        try:
            proc = self.run(argv, input=stdin, capture_output=True, check=False, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SecureMountError(f"{where}: {argv[0]} {argv[1]}: {e}") from None
        if proc.returncode != 0:
            msg = " ".join(proc.stderr.decode("utf-8", "replace").split())[:300]
            raise SecureMountError(
                f"{where}: {argv[0]} {argv[1]} exited with {proc.returncode}: {msg or '(no message)'}"
            )
