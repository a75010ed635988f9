"""genpolicy settings: the parts of a policy that come from the platform, not from the pod.

The shape follows upstream's ``genpolicy-settings.json`` (``pause_container``,
``other_container``, ``kata_config``, ``cluster_config``, ``common``, ``sandbox``,
``request_defaults``; ours adds ``guest_pull``, what changes when the guest pulls the image) so a
user's existing file can be read; the default values below are written for this project from the
facts recorded in the spec notes. A settings file given by the user is merged over the defaults:
mappings key by key, everything else replaced. Unknown top-level keys are refused.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from coco import jsonio
from coco.errors import GenpolicyError

DEFAULT_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

PRIVILEGED_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK",
    "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
]  # fmt: skip

_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def _mount(dest: str, source: str, type_: str, options: list[str]) -> dict[str, Any]:
    return {"destination": dest, "source": source, "type_": type_, "options": options}


_SHM_OPTS = ["nosuid", "noexec", "nodev", "mode=1777"]

_BASE_MOUNTS = [
    _mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
    _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
    _mount(
        "/dev/pts",
        "devpts",
        "devpts",
        ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
    ),
    _mount("/dev/shm", "/run/kata-containers/sandbox/shm", "bind", ["rbind"]),
    _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
    _mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
]

_LINUX_PAUSE = {
    "Namespaces": [
        {"Type": "ipc", "Path": ""},
        {"Type": "uts", "Path": ""},
        {"Type": "mount", "Path": ""},
    ],
    "MaskedPaths": [
        "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
        "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
        "/proc/scsi",
    ],
    "ReadonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
}  # fmt: skip

_LINUX_OTHER = {
    "Namespaces": _LINUX_PAUSE["Namespaces"],
    "MaskedPaths": [
        "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
        "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
    ],
    "ReadonlyPaths": [
        "/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
    ],
}  # fmt: skip

DEFAULT_SETTINGS: dict[str, Any] = {
    "pause_container": {
        "Root": {"Path": "$(cpath)/$(bundle-id)", "Readonly": True},
        "Mounts": [
            *_BASE_MOUNTS,
            _mount(
                "/etc/resolv.conf",
                "$(sfprefix)resolv.conf$",
                "bind",
                ["rbind", "ro", "nosuid", "nodev", "noexec"],
            ),
        ],
        "Annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.katacontainers.pkg.oci.container_type": "pod_sandbox",
            "io.kubernetes.cri.sandbox-id": "^[a-z0-9]{64}$",
            "io.kubernetes.cri.sandbox-log-directory": (
                f"^/var/log/pods/$(sandbox-namespace)_$(sandbox-name)_{_UUID}$"
            ),
            "io.katacontainers.pkg.oci.bundle_path": (
                "/run/containerd/io.containerd.runtime.v2.task/k8s.io/$(bundle-id)"
            ),
            "nerdctl/network-namespace": f"^/var/run/netns/cni-{_UUID}$",
        },
        "Process": {"Args": ["/pause"], "NoNewPrivileges": True},
        "Linux": _LINUX_PAUSE,
    },
    "other_container": {
        "Root": {"Path": "$(cpath)/$(bundle-id)", "Readonly": False},
        "Mounts": [
            *_BASE_MOUNTS,
            _mount(
                "/sys/fs/cgroup",
                "cgroup",
                "cgroup",
                ["nosuid", "noexec", "nodev", "relatime", "ro"],
            ),
        ],
        "Annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.katacontainers.pkg.oci.container_type": "pod_container",
            "io.kubernetes.cri.sandbox-id": "^[a-z0-9]{64}$",
            "io.katacontainers.pkg.oci.bundle_path": (
                "/run/containerd/io.containerd.runtime.v2.task/k8s.io/$(bundle-id)"
            ),
        },
        "Process": {"NoNewPrivileges": False},
        "Linux": _LINUX_OTHER,
    },
    "kata_config": {"oci_version": "1.1.0-rc.1"},
    # Guest pull (the default layer mode): the container's root is an image_guest_pull storage
    # the guest pulls into /run/kata-containers/<cid>/rootfs. The OCI version is what the CRI of
    # containerd 1.6 (Debian 12's) writes; the extra mounts are the forms the kata shims send
    # with shared_fs=none: containerd's own /dev/shm tmpfs, the bind of the sandbox's shm as a
    # tmpfs (coco's shim) and containerd 1.6's read-only resolv.conf of the sandbox.
    "guest_pull": {
        "oci_version": "1.0.2-dev",
        "rootfs": "/run/kata-containers/$(bundle-id)/rootfs",
        "pause_mounts": [
            _mount("/dev/shm", "shm", "tmpfs", [*_SHM_OPTS, "size=65536k"]),
            _mount("/dev/shm", "shm", "tmpfs", _SHM_OPTS),
            _mount("/etc/resolv.conf", "$(sfprefix)resolv.conf$", "bind", ["rbind", "ro"]),
        ],
        "other_mounts": [_mount("/dev/shm", "shm", "tmpfs", _SHM_OPTS)],
    },
    "cluster_config": {"pause_container_image": "mcr.microsoft.com/oss/kubernetes/pause:3.6"},
    "common": {
        "cpath": "/run/kata-containers/shared/containers",
        "sfprefix": "^$(cpath)/$(bundle-id)-[a-z0-9]{16}-",
        "spath": "/run/kata-containers/sandbox/storage",
        "ipv4_a": "((25[0-5]|(2[0-4]|1\\d|[1-9]|)\\d)\\.?\\b){4}",
        "ip_p": "[0-9]{1,5}",
        "svc_name": "[A-Z0-9_\\.\\-]+",
        "dns_label": "[a-zA-Z0-9_\\.\\-]+",
        "default_caps": DEFAULT_CAPS,
        "privileged_caps": PRIVILEGED_CAPS,
    },
    "sandbox": {
        "storages": [
            {
                "driver": "ephemeral",
                "driver_options": [],
                "source": "shm",
                "fstype": "tmpfs",
                "options": ["noexec", "nosuid", "nodev", "mode=1777", "size=67108864"],
                "mount_point": "/run/kata-containers/sandbox/shm",
                "fs_group": None,
            }
        ]
    },
    "request_defaults": {
        "CreateContainerRequest": {
            "allow_env_regex": [
                "^HOSTNAME=$(dns_label)$",
                "^$(svc_name)_PORT_$(ip_p)_(TCP|UDP)=(tcp|udp)://$(ipv4_a):$(ip_p)$",
                "^$(svc_name)_PORT_$(ip_p)_(TCP|UDP)_PROTO=(tcp|udp)$",
                "^$(svc_name)_PORT_$(ip_p)_(TCP|UDP)_PORT=$(ip_p)$",
                "^$(svc_name)_PORT_$(ip_p)_(TCP|UDP)_ADDR=$(ipv4_a)$",
                "^$(svc_name)_SERVICE_HOST=$(ipv4_a)$",
                "^$(svc_name)_SERVICE_PORT=$(ip_p)$",
                "^$(svc_name)_SERVICE_PORT_$(dns_label)=$(ip_p)$",
                "^$(svc_name)_PORT=(tcp|udp)://$(ipv4_a):$(ip_p)$",
                "^TERM=xterm$",
            ]
        },
        "CopyFileRequest": ["$(sfprefix)"],
        "ExecProcessRequest": {"commands": [], "regex": []},
        "CloseStdinRequest": False,
        "ReadStreamRequest": False,
        "UpdateEphemeralMountsRequest": False,
        "WriteStreamRequest": False,
    },
}

_TOP = frozenset(DEFAULT_SETTINGS) | {"volumes", "mount_destinations"}


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def load_settings(path: str | Path | None = None) -> dict[str, Any]:
    """The default settings, with the JSON file at ``path`` merged over them."""
    settings = copy.deepcopy(DEFAULT_SETTINGS)
    if path is None:
        return settings
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise GenpolicyError(f"settings {path}: cannot read it: {e.strerror}") from None
    user = jsonio.loads(raw, what=f"settings {path}", error=GenpolicyError)
    if not isinstance(user, dict):
        raise GenpolicyError(
            f"settings {path}: expected a JSON object, found {type(user).__name__}"
        )
    for k in user:
        if k not in _TOP:
            raise GenpolicyError(
                f"settings {path}: unknown key {k!r} (expected one of {', '.join(sorted(_TOP))})"
            )
    return _merge(settings, user)
