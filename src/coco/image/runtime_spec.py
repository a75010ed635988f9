"""The OCI runtime ``config.json`` of a bundle, filled from the image config as ``runc spec``
makes it (no terminal): args, env (``PATH`` by default), cwd, the user resolved against the
rootfs's own ``/etc/passwd`` and ``/etc/group`` (:mod:`coco.oci.user`, the resolver genpolicy
uses too), labels as annotations, and runc's default mounts, namespaces and masked paths.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from coco.errors import BundleError
from coco.image.flatten import DIR_FLAGS
from coco.oci.user import DEFAULT_PATH, Accounts, resolve_user

TYPE_CHECKING = False  # typing stays unloaded in short processes
if TYPE_CHECKING:
    from typing import Any

__all__ = ["runtime_config"]


def _read_in_rootfs(rootfs: Path, rel: str, limit: int = 1 << 20) -> str | None:
    """A small file of the rootfs, never following a symlink (images are untrusted)."""
    fd = os.open(rootfs, DIR_FLAGS)
    try:
        parts = rel.split("/")
        for name in parts[:-1]:
            nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        # only a regular file is opened: a FIFO would block the pull, a device node could act
        if not stat.S_ISREG(os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode):
            return None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        ffd = os.open(parts[-1], flags, dir_fd=fd)
        with os.fdopen(ffd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _image_user(user: str, rootfs: Path | None) -> dict[str, Any]:
    """config.json's ``process.user`` for image config ``User`` (names from the rootfs)."""
    accounts = Accounts(
        (_read_in_rootfs(rootfs, "etc/passwd") or "") if rootfs else "",
        (_read_in_rootfs(rootfs, "etc/group") or "") if rootfs else "",
    )
    u = resolve_user(user, accounts, f"image config User {user!r}", BundleError)
    out: dict[str, Any] = {"uid": u.uid, "gid": u.gid}
    if u.additional_gids:
        out["additionalGids"] = list(u.additional_gids)
    return out


def runtime_config(
    image_config: Mapping[str, Any],
    *,
    rootfs: Path | None = None,
    args: Sequence[str] | None = None,
    hostname: str = "coco",
) -> dict[str, Any]:
    """An OCI runtime spec (as ``runc spec`` makes, no terminal) filled from an image config
    (the whole config blob or just its ``config`` object)."""
    cfg = image_config.get("config", image_config) if "rootfs" in image_config else image_config
    cfg = cfg or {}
    if not isinstance(cfg, Mapping):
        raise BundleError(f"image config: expected an object for 'config', found {cfg!r}")
    for key in ("Entrypoint", "Cmd", "Env"):
        v = cfg.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(a, str) for a in v)):
            raise BundleError(f"image config {key}: expected a list of strings, found {v!r}")
    if not isinstance(cfg.get("Labels") or {}, Mapping):
        raise BundleError(f"image config Labels: expected an object, found {cfg['Labels']!r}")
    argv = list(args) if args else [*(cfg.get("Entrypoint") or []), *(cfg.get("Cmd") or [])]
    if not argv:
        raise BundleError("image config: expected Entrypoint and/or Cmd, found neither")
    env = list(cfg.get("Env") or [])
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, DEFAULT_PATH)
    cwd = cfg.get("WorkingDir") or "/"
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise BundleError(f"image config WorkingDir: expected an absolute path, found {cwd!r}")
    user = _image_user(str(cfg.get("User") or ""), rootfs)
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    labels = cfg.get("Labels") or {}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": user,
            "args": argv,
            "env": env,
            "cwd": cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
        ],
        "annotations": {str(k): str(v) for k, v in dict(labels).items()},
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [
                {"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")
            ],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }
