"""The pause bundle: the sandbox container the agent runs, as upstream's pod VM image has one.

A static busybox that sleeps, as an unprivileged user, on a read-only root. The pod VM image
carries it at ``/pause_bundle``; the insecure local sandbox writes the same bundle on the host.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["write_pause_bundle"]


def write_pause_bundle(bundle: Path, busybox: Path | str) -> Path:
    """Write ``config.json`` and ``rootfs/bin/busybox`` under ``bundle``; returns ``bundle``."""
    (bundle / "rootfs" / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, bundle / "rootfs" / "bin" / "busybox")
    spec = {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 65535, "gid": 65535},
            "args": ["/bin/busybox", "sleep", "2147483647"],
            "env": ["PATH=/bin"],
            "cwd": "/",
        },
        "root": {"path": "rootfs", "readonly": True},
    }
    (bundle / "config.json").write_text(json.dumps(spec, indent=2) + "\n")
    return bundle
