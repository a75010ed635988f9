"""Running the build's tools: a failure becomes one :class:`PodVmError` line naming the step."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from coco.errors import PodVmError

# tool -> the Debian package that has it (scripts/install-system-deps installs them)
PACKAGES = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "depmod": "kmod",
    "dpkg-deb": "dpkg",
    "mke2fs": "e2fsprogs",
    "mmdebstrap": "mmdebstrap",
    "qemu-system-x86_64": "qemu-system-x86",
    "swtpm": "swtpm",
}


def which(tool: str, what: str) -> str:
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if found is None:
        package = PACKAGES.get(tool, tool)
        raise PodVmError(
            f"{what}: {tool} not found: install the Debian package {package} "
            "(scripts/install-system-deps)"
        )
    return found


def run(
    cmd: Sequence[str | Path],
    what: str,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> str:
    """Run ``cmd`` and return its standard output; raise :class:`PodVmError` if it fails."""
    args = [which(str(cmd[0]), what), *map(str, cmd[1:])]
    try:
        proc = subprocess.run(
            args,
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise PodVmError(f"{what}: {cmd[0]} did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR", "error"))]
        reason = (errors or lines or [f"exit status {proc.returncode}"])[-1]
        raise PodVmError(f"{what}: {cmd[0]} failed (exit status {proc.returncode}): {reason}")
    return proc.stdout
