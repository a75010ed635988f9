"""The agent's configuration: agent.toml, the kernel command line, the environment.

Upstream's keys are kept (``server_addr``, ``image_pull_timeout``, ``cdh_api_timeout``,
``policy_file``, ``log_level``, ...); coco adds where things live, so a test can run the agent on
a host without touching the guest's paths::

    server_addr = "vsock://-1:1024"
    container_root = "/run/kata-containers"        # bundles: <container_root>/<cid>/
    runc = "runc"
    cdh_socket = "unix:///run/confidential-containers/cdh.sock"
    initdata_dir = "/run/confidential-containers/initdata"
    pause_bundle = "/pause_bundle"
    policy_file = ""                                 # the initial policy (Rego text)
    require_policy = false

The listen address comes from, strongest first: ``--server-addr``, ``$KATA_AGENT_SERVER_ADDR``,
``agent.server_addr=`` on the kernel command line, ``server_addr`` in the file, and
``vsock://-1:1024`` when the machine has vsock. ``agent.config_file=`` on the command line names
the file when ``--config`` does not; ``agent.image_pull_timeout=`` and ``agent.cdh_api_timeout=``
(seconds) are read there too.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from coco.guest.agent.errors import AgentError

DEFAULT_ADDR = "vsock://-1:1024"
ENV_ADDR = "KATA_AGENT_SERVER_ADDR"
CONTAINER_ROOT = "/run/kata-containers"
CDH_SOCKET = "unix:///run/confidential-containers/cdh.sock"
INITDATA_DIR = "/run/confidential-containers/initdata"
PAUSE_BUNDLE = "/pause_bundle"
KERNEL_CMDLINE = "/proc/cmdline"


@dataclass(frozen=True)
class AgentConfig:
    server_addr: str = ""
    container_root: str = CONTAINER_ROOT
    runc: str = "runc"
    cdh_socket: str = CDH_SOCKET
    cdh_api_timeout: float = 50.0
    image_pull_timeout: float = 1200.0
    initdata_dir: str = INITDATA_DIR
    pause_bundle: str = PAUSE_BUNDLE
    policy_file: str = ""
    require_policy: bool = False
    log_level: str = "info"
    source: str = "defaults"

    @property
    def runc_root(self) -> str:
        """runc's state directory: a name no container id can take (ids start alphanumeric)."""
        return os.path.join(self.container_root, ".runc")

    def guest_path(self, path: str) -> str:
        """A guest path the host names (``/run/kata-containers/...``, what the policy checks)
        where this agent keeps it: under ``container_root``."""
        if self.container_root != CONTAINER_ROOT and (
            path == CONTAINER_ROOT or path.startswith(CONTAINER_ROOT + "/")
        ):
            return self.container_root + path[len(CONTAINER_ROOT) :]
        return path

    @property
    def shared_dir(self) -> str:
        """Where CopyFile writes, and what the host's shared mount sources point into."""
        return os.path.join(self.container_root, "shared", "containers")


# key -> (type, upstream key that coco accepts and ignores: True)
_KEYS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "server_addr": (str, False),
    "container_root": (str, False),
    "runc": (str, False),
    "cdh_socket": (str, False),
    "cdh_api_timeout": ((int, float), False),
    "image_pull_timeout": ((int, float), False),
    "initdata_dir": (str, False),
    "pause_bundle": (str, False),
    "policy_file": (str, False),
    "require_policy": (bool, False),
    "log_level": (str, False),
    # upstream keys that do not apply here
    "dev_mode": (bool, True),
    "debug_console": (bool, True),
    "debug_console_vport": (int, True),
    "log_vport": (int, True),
    "hotplug_timeout": ((int, float), True),
    "unified_cgroup_hierarchy": (bool, True),
    "guest_components_procs": (str, True),
    "guest_components_rest_api": (str, True),
    "container_pipe_size": (int, True),
    "secure_storage_integrity": (bool, True),
    "no_proxy": (str, True),
    "https_proxy": (str, True),
    "endpoints": (dict, True),
}


def kernel_params(path: str = KERNEL_CMDLINE) -> dict[str, str]:
    """``agent.*`` parameters of the kernel command line (``agent.server_addr=...``)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return {}
    out = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        if key.startswith("agent.") and eq:
            out[key[len("agent.") :]] = value
    return out


def _parse_file(path: str) -> dict[str, object]:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise AgentError(f"agent config {path}: cannot read it: {e.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise AgentError(f"agent config {path}: expected TOML: {e}") from None
    out: dict[str, object] = {}
    for key, value in doc.items():
        spec = _KEYS.get(key)
        if spec is None:
            raise AgentError(
                f"agent config {path}: unknown key {key!r}; expected one of {sorted(_KEYS)}"
            )
        kind, ignored = spec
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise AgentError(
                f"agent config {path}: {key}: expected {_kind_name(kind)}, "
                f"got {type(value).__name__} {value!r}"
            )
        if not ignored:
            out[key] = float(value) if key.endswith("_timeout") else value
    return out


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _seconds(value: str, key: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise AgentError(
            f"kernel command line agent.{key}: expected a positive number of seconds, got {value!r}"
        )
    return seconds


def load_config(
    path: str | None = None,
    *,
    server_addr: str | None = None,
    cmdline: str = KERNEL_CMDLINE,
    environ: dict[str, str] | None = None,
) -> AgentConfig:
    """The configuration, merged as the module docstring says."""
    env = os.environ if environ is None else environ
    params = kernel_params(cmdline)
    values: dict[str, object] = {}
    source = "defaults"
    path = path or params.get("config_file")
    if path:
        values.update(_parse_file(path))
        source = path
    for key in ("image_pull_timeout", "cdh_api_timeout"):
        if key in params:
            values[key] = _seconds(params[key], key)
    addr = server_addr or env.get(ENV_ADDR) or params.get("server_addr")
    if addr:
        values["server_addr"] = addr
    cfg = dataclasses.replace(AgentConfig(), source=source, **values)  # type: ignore[arg-type]
    if not cfg.server_addr:
        if not os.path.exists("/dev/vsock"):
            raise AgentError(
                "no listen address: expected --server-addr, $KATA_AGENT_SERVER_ADDR, "
                "agent.server_addr= or server_addr in the config; the vsock default "
                f"({DEFAULT_ADDR}) needs /dev/vsock, which this machine lacks"
            )
        cfg = dataclasses.replace(cfg, server_addr=DEFAULT_ADDR)
    if not os.path.isabs(cfg.container_root):
        raise AgentError(
            f"agent config {source}: container_root: expected an absolute path, "
            f"got {cfg.container_root!r}"
        )
    return cfg
