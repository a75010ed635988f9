"""``coco runtime install`` / ``uninstall``: coco's runtime handlers in containerd's config.

What kata-deploy and the operator do on a node, for containerd 1.6 and later (config ``version =
2``): under ``[plugins."io.containerd.grpc.v1.cri".containerd.runtimes]`` the handlers

* ``coco-qemu``: the pod VM under QEMU (TCG here, KVM where it works), a vTPM from swtpm;
* ``coco-remote``: a peer-pod VM from a cloud-api-adaptor;
* ``coco-local``: INSECURE, the guest services and the agent as processes on the host (never a
  TEE; for development and CI);

each with ``runtime_type = "io.containerd.coco.v2"``, ``runtime_path`` the absolute path of the
installed ``containerd-shim-coco-v2``, ``pod_annotations = ["io.katacontainers.*"]`` (the only way
the agent policy annotation reaches the shim) and ``options.ConfigPath`` the shim's config, one
TOML per sandbox kind written to the config dir (``configuration-<kind>.toml``, the schema of
:mod:`coco.host.runtime.config`). ``restrict_oom_score_adj = true`` is set when this machine
cannot lower a process's OOM score (no CAP_SYS_RESOURCE: runc would fail on the pause
container). containerd 1.6 ignores ``runtime_path`` when it starts a shim and looks the name
``containerd-shim-coco-v2`` up on its ``PATH`` (as ``ctr run --runtime io.containerd.coco.v2``
does on any version), so install also links it into ``/usr/local/bin`` (what kata-deploy does for
its shim) unless a file of that name is there already. With ``--cni`` a pod network (Debian's containernetworking-plugins: bridge
``coco0`` with host-local addresses from 10.88.0.0/16, portmap) is written to the CNI conf dir,
with the CRI's ``bin_dir`` pointed at ``/usr/lib/cni`` if its own has no ``bridge``.

The rest of the config is kept as it was: the file is edited with a TOML library that keeps
comments and layout. Everything install changes is recorded in ``<config dir>/install.json``
(the config's bytes before and after, each value it replaced, each file it wrote with its
digest). ``uninstall`` puts the config's original bytes back when the file is still as install
left it, else removes exactly what install added and restores what it replaced; it removes the
files it wrote unless they were changed since. Both are idempotent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coco.errors import HostError
from coco.files import atomic_write

CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
CONFIG_DIR = Path("/etc/coco")
CNI_CONF_DIR = Path("/etc/cni/net.d")
LINK_DIR = Path("/usr/local/bin")
DEBIAN_CNI_BIN = Path("/usr/lib/cni")
RUNTIME_TYPE = "io.containerd.coco.v2"
SHIM = "containerd-shim-coco-v2"
RECORD = "install.json"
CNI_FILE = "10-coco.conflist"
CRI = "io.containerd.grpc.v1.cri"

HANDLERS = {"coco-qemu": "qemu", "coco-remote": "remote", "coco-local": "local"}

_SHIM_CONFIGS = {
    "qemu": (
        "# coco runtime config of the coco-qemu handler (written by `coco runtime install`).\n"
        "# The pod VM under QEMU (KVM where it works, else TCG) with a vTPM from swtpm.\n"
        "[hypervisor.qemu]\n"
        "{image}"
        'accel = "auto"\n'
        "default_memory = 1024\n"
        "default_vcpus = 1\n"
    ),
    "remote": (
        "# coco runtime config of the coco-remote handler (written by `coco runtime install`).\n"
        "# A peer-pod VM asked of a cloud-api-adaptor.\n"
        "[hypervisor.remote]\n"
        'remote_hypervisor_socket = "{socket}"\n'
    ),
    "local": (
        "# coco runtime config of the coco-local handler (written by `coco runtime install`).\n"
        "# INSECURE: the guest services and the agent run as processes on this host. Never a TEE:\n"
        "# for development and CI on machines without virtualization.\n"
        "[hypervisor.local]\n"
    ),
}

CNI_CONFIG = {
    "cniVersion": "0.4.0",
    "name": "coco",
    "plugins": [
        {
            "type": "bridge",
            "bridge": "coco0",
            "isGateway": True,
            "ipMasq": True,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.88.0.0/16"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        },
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}


class InstallError(HostError):
    """containerd's config or the config dir could not be read, understood or written."""


@dataclass
class Options:
    containerd_config: Path = CONTAINERD_CONFIG
    config_dir: Path = CONFIG_DIR
    shim: Path | None = None  # default: containerd-shim-coco-v2 beside this Python, else on PATH
    link_dir: Path | None = LINK_DIR  # where a link makes the shim resolvable by name; None: none
    cni: bool = False
    cni_conf_dir: Path | None = None  # default: the CRI's cni.conf_dir, else /etc/cni/net.d
    restrict_oom_score_adj: bool | None = None  # None: when this machine needs it
    podvm_image: Path | None = None
    remote_socket: str = "/run/peerpod/hypervisor.sock"
    snapshotter: str | None = None  # coco's snapshotter socket: make it the CRI snapshotter
    say: Callable[[str], None] = field(default=lambda text: None)


def find_shim(explicit: Path | None = None) -> Path:
    if explicit is not None:
        p = explicit.absolute()
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise InstallError(f"--shim {explicit}: expected an executable file, found none there")
        return p
    beside = Path(sys.executable).parent / SHIM
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(SHIM)
    if found is None:
        raise InstallError(
            f"{SHIM}: not found beside {sys.executable} nor on PATH (install coco with pip, or "
            "give --shim PATH)"
        )
    return Path(found).absolute()


def needs_restrict_oom_score_adj() -> bool:
    """True when a process here cannot lower its OOM score (no CAP_SYS_RESOURCE)."""
    probe = "with open('/proc/self/oom_score_adj', 'w') as f: f.write('-999')"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=False)
    return r.returncode != 0


def shim_config(kind: str, opts: Options) -> str:
    text = _SHIM_CONFIGS[kind]
    if kind == "qemu":
        image = f'image = "{_toml_str(str(opts.podvm_image))}"\n' if opts.podvm_image else ""
        return text.replace("{image}", image)
    if kind == "remote":
        return text.replace("{socket}", _toml_str(opts.remote_socket))
    return text


def _toml_str(text: str) -> str:
    return json.dumps(text)[1:-1]


def runtimeclasses() -> str:
    """The Kubernetes RuntimeClass objects of the handlers, as YAML."""
    docs = []
    for name, kind in HANDLERS.items():
        note = "# INSECURE: not a TEE (development and CI only)\n" if kind == "local" else ""
        docs.append(
            f"{note}apiVersion: node.k8s.io/v1\n"
            "kind: RuntimeClass\n"
            f"metadata:\n  name: {name}\n"
            f"handler: {name}\n"
        )
    return "---\n".join(docs)


# --- the record


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _load_record(config_dir: Path) -> dict[str, Any]:
    path = config_dir / RECORD
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise InstallError(f"{path}: cannot read the install record: {e.strerror}") from None
    from coco import jsonio

    rec = jsonio.loads(raw, what=f"install record {path}", error=InstallError)
    if not isinstance(rec, dict) or not isinstance(rec.get("installs", {}), dict):
        raise InstallError(f"{path}: expected an install record written by coco runtime install")
    return rec


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (and durably), making its directory if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, mode)


# --- editing containerd's config


def _parse(text: str, path: Path) -> Any:
    import tomlkit
    from tomlkit.exceptions import TOMLKitError

    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as e:
        raise InstallError(f"{path}: expected a TOML file: {e}") from None
    version = doc.get("version", 1)
    if text.strip() and version != 2:
        raise InstallError(
            f"{path}: expected a containerd config of version 2 (containerd 1.5 and later), found "
            f"version {version} (`containerd config migrate` converts it)"
        )
    return doc


def _table(parent: Any, key: str, path: Path, where: str, *, super_table: bool = True) -> Any:
    import tomlkit

    if key not in parent:
        parent[key] = tomlkit.table(is_super_table=super_table)
    node = parent[key]
    if not isinstance(node, dict):
        raise InstallError(f"{path}: {where}.{key}: expected a table, found {type(node).__name__}")
    return node


def _cri(doc: Any, path: Path) -> Any:
    plugins = _table(doc, "plugins", path, "")
    return _table(plugins, CRI, path, "plugins")


def _runtimes(doc: Any, path: Path) -> Any:
    cri = _cri(doc, path)
    ctr = _table(cri, "containerd", path, f'plugins."{CRI}"')
    return _table(ctr, "runtimes", path, f'plugins."{CRI}".containerd')


def _handler_table(shim: Path, config_path: Path) -> Any:
    import tomlkit

    t = tomlkit.table()
    t["runtime_type"] = RUNTIME_TYPE
    t["runtime_path"] = str(shim)
    t["pod_annotations"] = ["io.katacontainers.*"]
    t["privileged_without_host_devices"] = True
    options = tomlkit.table()
    options["ConfigPath"] = str(config_path)
    t["options"] = options
    return t


def _plain(item: Any) -> Any:
    return item.unwrap() if hasattr(item, "unwrap") else item


def install(opts: Options) -> list[str]:
    """Install (or complete an earlier install); what was done, one line each."""
    import tomlkit

    cfg_path = opts.containerd_config.absolute()
    shim = find_shim(opts.shim)
    try:
        original = cfg_path.read_bytes()
        existed = True
    except FileNotFoundError:
        original, existed = b"", False
    except OSError as e:
        raise InstallError(f"{cfg_path}: cannot read containerd's config: {e.strerror}") from None
    try:
        text = original.decode()
    except UnicodeDecodeError:
        raise InstallError(f"{cfg_path}: expected UTF-8 TOML") from None
    doc = _parse(text, cfg_path)
    if not text.strip():
        doc["version"] = 2

    record = _load_record(opts.config_dir)
    installs = record.setdefault("installs", {})
    entry = installs.get(str(cfg_path))
    if entry is None:
        entry = {
            "original": text,
            "existed": existed,
            "replaced": {},  # TOML path (JSON list) -> previous value (null: absent)
            "files": {},  # path -> sha256 of what install wrote
        }
    done: list[str] = []

    def set_value(table: Any, key: str, value: Any, where: list[str]) -> None:
        old = _plain(table[key]) if key in table else None
        if old == _plain(value):
            return
        rkey = json.dumps([*where, key])
        entry["replaced"].setdefault(rkey, old)
        table[key] = value
        done.append(f"{cfg_path}: set {'.'.join([*where, key])}")

    if opts.podvm_image is None:
        opts.say(
            "coco-qemu has no pod VM image: give --podvm-image DIR (from `coco podvm build -o "
            "DIR`), else its pods fail with the shim's reason"
        )
    # the shim's config files
    files: dict[str, bytes] = {}
    for kind in HANDLERS.values():
        target = opts.config_dir.absolute() / f"configuration-{kind}.toml"
        files[str(target)] = shim_config(kind, opts).encode()
    if opts.cni:
        cri = _cri(doc, cfg_path)
        cni = cri.get("cni", {})
        conf_dir = opts.cni_conf_dir or Path(str(_plain(cni.get("conf_dir")) or CNI_CONF_DIR))
        files[str(conf_dir.absolute() / CNI_FILE)] = (
            json.dumps(CNI_CONFIG, indent=2) + "\n"
        ).encode()
        bin_dir = Path(str(_plain(cni.get("bin_dir")) or "/opt/cni/bin"))
        if not (bin_dir / "bridge").exists():
            if not (DEBIAN_CNI_BIN / "bridge").exists():
                raise InstallError(
                    f"--cni: no bridge plugin in {bin_dir} nor {DEBIAN_CNI_BIN} (apt-get install "
                    "containernetworking-plugins)"
                )
            set_value(_table(cri, "cni", cfg_path, ""), "bin_dir", str(DEBIAN_CNI_BIN),
                      ["plugins", CRI, "cni"])  # fmt: skip

    # containerd's config
    runtimes = _runtimes(doc, cfg_path)
    where = ["plugins", CRI, "containerd", "runtimes"]
    for handler, kind in HANDLERS.items():
        table = _handler_table(shim, opts.config_dir.absolute() / f"configuration-{kind}.toml")
        if handler in runtimes and _plain(runtimes[handler]) == _plain(table):
            continue
        rkey = json.dumps([*where, handler])
        entry["replaced"].setdefault(
            rkey, _plain(runtimes[handler]) if handler in runtimes else None
        )
        if handler in runtimes:
            del runtimes[handler]
        table.add(tomlkit.nl())
        runtimes[handler] = table
        done.append(f"{cfg_path}: runtime handler {handler} ({RUNTIME_TYPE}, {kind} sandbox)")
    want_oom = (
        needs_restrict_oom_score_adj()
        if opts.restrict_oom_score_adj is None
        else opts.restrict_oom_score_adj
    )
    if want_oom:
        set_value(_cri(doc, cfg_path), "restrict_oom_score_adj", True, ["plugins", CRI])
    if opts.snapshotter is not None:  # images pulled in the guest are not unpacked here
        from coco.host.snapshotter import containerd_settings

        for keys, value in containerd_settings(opts.snapshotter):
            node = doc
            for i, key in enumerate(keys[:-1]):
                node = _table(node, key, cfg_path, ".".join(keys[:i]), super_table=i == 0)
            set_value(node, keys[-1], value, keys[:-1])

    # write: the files first (a config naming missing files would break the handlers)
    for name, data in files.items():
        path = Path(name)
        try:
            current = path.read_bytes()
        except FileNotFoundError:
            current = None
        except OSError as e:
            raise InstallError(f"{path}: cannot read: {e.strerror}") from None
        if current == data:
            continue
        if current is None and not path.parent.exists():
            top = path.parent
            while not top.parent.exists():
                top = top.parent
            entry.setdefault("dirs", []).append(str(top))
        if current is not None and name not in entry["files"]:
            opts.say(f"{path}: exists and was not written by coco runtime install: kept as is")
            continue
        try:
            _write(path, data)
        except OSError as e:
            raise InstallError(f"{path}: cannot write: {e.strerror}") from None
        entry["files"][name] = _sha(data)
        done.append(f"{path}: written")
    if opts.link_dir is not None:
        link = opts.link_dir.absolute() / SHIM
        links = entry.setdefault("links", {})
        if link.is_symlink() and str(link) in links:
            pass  # ours, from an earlier install
        elif link.exists() or link.is_symlink():
            if link.resolve() != shim.resolve():
                opts.say(f"{link}: another {SHIM} is there: kept (containerd 1.6 will run it)")
        else:
            if not link.parent.exists():
                top = link.parent
                while not top.parent.exists():
                    top = top.parent
                entry.setdefault("dirs", []).append(str(top))
            try:
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(shim)
            except OSError as e:
                raise InstallError(f"{link}: cannot link the shim there: {e.strerror}") from None
            links[str(link)] = str(shim)
            done.append(f"{link}: linked to {shim}")
    new = tomlkit.dumps(doc).encode()
    if new != original:
        try:
            _write(cfg_path, new, (cfg_path.stat().st_mode & 0o777) if existed else 0o644)
        except OSError as e:
            raise InstallError(f"{cfg_path}: cannot write: {e.strerror}") from None
    entry["installed"] = _sha(new)
    installs[str(cfg_path)] = entry
    _write(opts.config_dir / RECORD, (json.dumps(record, indent=1) + "\n").encode(), 0o600)
    return done


def uninstall(opts: Options) -> list[str]:
    """Remove what :func:`install` added to ``opts.containerd_config``; what was done."""
    import tomlkit

    cfg_path = opts.containerd_config.absolute()
    record = _load_record(opts.config_dir)
    entry = record.get("installs", {}).get(str(cfg_path))
    if entry is None:
        return []
    done: list[str] = []
    try:
        current = cfg_path.read_bytes()
    except FileNotFoundError:
        current = None
    except OSError as e:
        raise InstallError(f"{cfg_path}: cannot read containerd's config: {e.strerror}") from None
    if current is not None and _sha(current) == entry.get("installed"):
        if entry["existed"]:
            _write(cfg_path, entry["original"].encode(), cfg_path.stat().st_mode & 0o777)
            done.append(f"{cfg_path}: restored as it was before install")
        else:
            cfg_path.unlink()
            done.append(f"{cfg_path}: removed (install created it)")
    elif current is not None:
        doc = _parse(current.decode(), cfg_path)
        for rkey, old in entry["replaced"].items():
            keys = json.loads(rkey)
            node = doc
            for k in keys[:-1]:
                node = node.get(k) if isinstance(node, dict) else None
                if node is None:
                    break
            if node is None:
                continue
            if old is None:
                node.pop(keys[-1], None)
            else:
                node[keys[-1]] = old
        cfg_path.write_bytes(tomlkit.dumps(doc).encode())
        done.append(f"{cfg_path}: changed since install: coco's entries removed, the rest kept")
    for name, digest in entry["files"].items():
        path = Path(name)
        try:
            if _sha(path.read_bytes()) == digest:
                path.unlink()
                done.append(f"{path}: removed")
            else:
                opts.say(f"{path}: changed since install: kept")
        except FileNotFoundError:
            pass
    for name, target in entry.get("links", {}).items():
        link = Path(name)
        if link.is_symlink() and os.readlink(link) == target:
            link.unlink()
            done.append(f"{link}: removed")
    for d in sorted(entry.get("dirs", []), key=len, reverse=True):
        for sub in sorted(Path(d).glob("**/"), key=lambda p: len(str(p)), reverse=True):
            with contextlib.suppress(OSError):
                sub.rmdir()  # only directories install made, and only when empty
    del record["installs"][str(cfg_path)]
    rec_path = opts.config_dir / RECORD
    if record["installs"]:
        _write(rec_path, (json.dumps(record, indent=1) + "\n").encode(), 0o600)
    else:
        rec_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            opts.config_dir.rmdir()  # only when empty
    return done
