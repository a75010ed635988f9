"""The runtime config: a TOML in the shape of kata's ``configuration.toml``.

Exactly one ``[hypervisor.<kind>]`` table chooses the sandbox::

    [hypervisor.qemu]                 # the pod VM (coco podvm build), TCG here, KVM where it works
    image = "/var/cache/coco/podvm"   # the image directory
    default_memory = 1024             # MiB
    default_vcpus = 1
    accel = "auto"                    # auto | kvm | tcg
    boot_timeout = 300                # seconds until the guest is ready
    tpm_state = ""                    # the node's vTPM state each VM copies (empty: a new one)

    [hypervisor.remote]               # a VM from a cloud-api-adaptor
    remote_hypervisor_socket = "/run/peerpod/hypervisor.sock"
    remote_hypervisor_timeout = 600

    [hypervisor.local]                # INSECURE: the guest services and agent run on the host
    pause_bundle = ""                 # a pause bundle for the agent; empty: one made from busybox

    [agent.kata]
    dial_timeout = 90                 # seconds to reach the agent after the sandbox started
    create_container_timeout = 600    # covers the image pull in the guest

    [runtime]
    state_dir = "/run/coco/runtime"   # per-sandbox state (sockets, logs, initdata)
    coco = ""                         # the `coco` command the local sandbox runs; empty: ours

The path comes from containerd's runtime options (``ConfigPath``); without one,
``$COCO_RUNTIME_CONFIG``, then ``/etc/coco/configuration.toml``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coco.host.runtime import ShimError

DEFAULT_PATH = "/etc/coco/configuration.toml"
ENV_PATH = "COCO_RUNTIME_CONFIG"
KINDS = ("local", "qemu", "remote")

_KNOWN: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hypervisor.local": {"pause_bundle": str},
    "hypervisor.qemu": {
        "image": str,
        "default_memory": int,
        "default_vcpus": int,
        "accel": str,
        "boot_timeout": (int, float),
        "kernel_params": str,
        "tpm_state": str,
    },
    "hypervisor.remote": {
        "remote_hypervisor_socket": str,
        "remote_hypervisor_timeout": (int, float),
    },
    "agent.kata": {"dial_timeout": (int, float), "create_container_timeout": (int, float)},
    "runtime": {"state_dir": str, "coco": str},
}


@dataclass(frozen=True)
class RuntimeConfig:
    kind: str
    sandbox: dict[str, Any] = field(default_factory=dict)  # the [hypervisor.<kind>] table
    dial_timeout: float = 90.0
    create_container_timeout: float = 600.0
    state_dir: Path = Path("/run/coco/runtime")
    coco: str = ""
    path: str = ""

    @property
    def insecure(self) -> bool:
        return self.kind == "local"


def resolve_path(config_path: str | None) -> str:
    return config_path or os.environ.get(ENV_PATH) or DEFAULT_PATH


def load(config_path: str | None) -> RuntimeConfig:
    """Read and check the config; one line naming the file and the key on any problem."""
    path = resolve_path(config_path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ShimError(f"runtime config {path}: cannot read it: {e.strerror or e}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ShimError(f"runtime config {path}: expected UTF-8 TOML: {e}") from None
    return parse(doc, path)


def parse(doc: dict[str, Any], path: str = "runtime config") -> RuntimeConfig:
    unknown = sorted(set(doc) - {"hypervisor", "agent", "runtime"})
    if unknown:
        raise ShimError(
            f"runtime config {path}: unknown table(s) {', '.join(unknown)}: "
            "expected hypervisor, agent, runtime"
        )
    hv = doc.get("hypervisor", {})
    if not isinstance(hv, dict) or len(hv) != 1:
        found = sorted(hv) if isinstance(hv, dict) else type(hv).__name__
        raise ShimError(
            f"runtime config {path}: expected exactly one [hypervisor.<kind>] table "
            f"({' | '.join(KINDS)}), found {found}"
        )
    kind = next(iter(hv))
    if kind not in KINDS:
        raise ShimError(
            f"runtime config {path}: [hypervisor.{kind}]: unknown sandbox kind; expected one of "
            f"{', '.join(KINDS)}"
        )
    tables = {f"hypervisor.{kind}": hv[kind], "runtime": doc.get("runtime", {})}
    agent = doc.get("agent", {})
    if not isinstance(agent, dict) or set(agent) - {"kata"}:
        raise ShimError(f"runtime config {path}: [agent]: expected only [agent.kata]")
    tables["agent.kata"] = agent.get("kata", {})
    for name, table in tables.items():
        _check(name, table, path)
    runtime = tables["runtime"]
    kata = tables["agent.kata"]
    return RuntimeConfig(
        kind=kind,
        sandbox=dict(tables[f"hypervisor.{kind}"]),
        dial_timeout=float(kata.get("dial_timeout", 90)),
        create_container_timeout=float(kata.get("create_container_timeout", 600)),
        state_dir=Path(runtime.get("state_dir", "/run/coco/runtime")),
        coco=runtime.get("coco", ""),
        path=path,
    )


def _check(name: str, table: Any, path: str) -> None:
    if not isinstance(table, dict):
        raise ShimError(f"runtime config {path}: [{name}]: expected a table")
    known = _KNOWN[name]
    for key, value in table.items():
        if key not in known:
            raise ShimError(
                f"runtime config {path}: [{name}] {key}: unknown key; expected one of "
                f"{', '.join(sorted(known))}"
            )
        want = known[key]
        if not isinstance(value, want) or isinstance(value, bool):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise ShimError(
                f"runtime config {path}: [{name}] {key}: expected {names}, "
                f"found {type(value).__name__} {value!r}"
            )
        if key.endswith("timeout") and value <= 0:
            raise ShimError(f"runtime config {path}: [{name}] {key}: expected > 0, found {value}")
    if name == "runtime" and "state_dir" in table and not os.path.isabs(table["state_dir"]):
        raise ShimError(
            f"runtime config {path}: [runtime] state_dir: expected an absolute path, "
            f"found {table['state_dir']!r}"
        )
