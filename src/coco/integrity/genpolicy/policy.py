"""Assembly of ``policy_data`` for one workload, in the structure upstream genpolicy writes.

``containers[0]`` is the pause container, then the init containers (last first), then the
regular containers. Each container carries the OCI fields the agent checks (process, root,
mounts, annotations, Linux) and its storages, which bind the container's root filesystem to the
image the policy author saw. Two layer modes:

- ``guest-pull`` (the default, as upstream kata today): one ``image_guest_pull`` storage whose
  source is the pod's image reference (``pause`` for the pause container), mounted at
  ``/run/kata-containers/$(bundle-id)/rootfs``; the guest pulls and checks the image itself.
- ``tardev`` (the older AKS path): one ``blk``/``tar`` storage per image layer (topmost first,
  ``$(hashN)``/``$(layerN)``) plus the ``overlayfs`` storage whose two options list the layer
  ids and the dm-verity root hashes, topmost first.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

from coco.errors import GenpolicyError
from coco.integrity.genpolicy.images import ImageInfo
from coco.integrity.genpolicy.k8s import Inputs, Workload
from coco.oci.user import DEFAULT_PATH, Accounts, resolve_user

GUEST_PULL = "guest-pull"
TARDEV = "tardev"
LAYER_MODES = (GUEST_PULL, TARDEV)
PAUSE_SOURCE = "pause"
# Pod annotations the runtime consumes itself (the shims drop them before the agent sees a spec).
_RUNTIME_ONLY = (
    "io.katacontainers.config.agent.policy",
    "io.katacontainers.config.hypervisor.cc_init_data",
    "io.katacontainers.config.runtime.cc_init_data",
)

_FIELD_REFS = {
    "metadata.name": "$(sandbox-name)",
    "metadata.uid": "$(pod-uid)",
    "status.hostIP": "$(host-ip)",
    "status.podIP": "$(pod-ip)",
    "spec.nodeName": "$(node-name)",
}


def layer_id(chain_id: str) -> str:
    """The tardev layer id (mount directory name) of a chain id."""
    return hashlib.sha256(chain_id.encode()).hexdigest()


def chain_ids(diff_ids: list[str]) -> list[str]:
    out: list[str] = []
    for d in diff_ids:
        if not out:
            out.append(d)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def layer_storages(image: ImageInfo) -> list[dict[str, Any]]:
    """The blk storages (topmost first) and the overlayfs storage of an image."""
    ids = [layer_id(c) for c in chain_ids([la.diff_id for la in image.layers])]
    hashes = [la.verity_hash for la in image.layers]
    ids.reverse()
    hashes.reverse()
    out = [
        {
            "driver": "blk",
            "driver_options": [],
            "source": "",
            "fstype": "tar",
            "options": [f"$(hash{i})"],
            "mount_point": f"$(layer{i})",
            "fs_group": None,
        }
        for i in range(len(ids))
    ]
    out.append(
        {
            "driver": "overlayfs",
            "driver_options": [],
            "source": "",
            "fstype": "fuse3.kata-overlay",
            "options": [":".join(ids), ":".join(hashes)],
            "mount_point": "$(cpath)/$(bundle-id)",
            "fs_group": None,
        }
    )
    return out


def guest_pull_storage(source: str, mount_point: str) -> dict[str, Any]:
    """The ``image_guest_pull`` storage of a container: the guest pulls ``source`` (the pod's
    image reference, or ``pause``); the rules check the reference, the shape and the metadata."""
    return {
        "driver": "image_guest_pull",
        "driver_options": [],
        "source": source,
        "fstype": "overlay",
        "options": [],
        "mount_point": mount_point,
        "fs_group": None,
    }


class _Builder:
    def __init__(
        self,
        w: Workload,
        settings: dict[str, Any],
        images: dict[str, ImageInfo],
        inputs: Inputs,
        layers: str = GUEST_PULL,
    ) -> None:
        if layers not in LAYER_MODES:
            raise GenpolicyError(
                f"layer mode: expected one of {', '.join(LAYER_MODES)}, found {layers!r}"
            )
        self.layers = layers
        self.w = w
        self.s = settings
        self.images = images
        self.inputs = inputs
        self.spec = w.spec
        self.pod_sc = w.spec.get("securityContext") or {}

    # --- users

    def _user(self, c: dict[str, Any] | None, image: ImageInfo, pause: bool) -> dict[str, Any]:
        """The process user as the guest's puller makes it (coco.oci.user, from the image's
        /etc/passwd and /etc/group), the pod's runAsUser/runAsGroup over it (as upstream: the
        image's group stays under a runAsUser, and a bare uid takes its passwd group)."""
        spec_user = str(image.config.get("User") or "")
        accounts = Accounts(
            next((la.passwd for la in reversed(image.layers) if la.passwd), ""),
            next((la.group for la in reversed(image.layers) if la.group), ""),
        )
        where = f"{self.w.where}: image {image.name}: config.User {spec_user!r}"
        sc = (c or {}).get("securityContext") or {}
        run_as_user = run_as_group = None
        for src in (self.pod_sc, sc):
            run_as_user = int(src["runAsUser"]) if "runAsUser" in src else run_as_user
            run_as_group = int(src["runAsGroup"]) if "runAsGroup" in src else run_as_group
        name, _, group = spec_user.partition(":")
        encrypted = any(la.encrypted for la in image.layers)
        if run_as_user is not None:  # the pod's uid replaces the image's user, not its group
            keep = group and run_as_group is None
            spec_user = str(run_as_user) + (f":{group}" if keep else "")
        elif encrypted and name and not name.isdigit() and accounts.user(name) is None:
            raise GenpolicyError(
                f"{where}: user {name!r} cannot be looked up: the image's layers are "
                "encrypted; give a numeric runAsUser (and runAsGroup) in the pod"
            )
        uid, gid = _image_user(spec_user, accounts, where)
        if run_as_group is not None:
            gid = run_as_group
        extra = (
            [] if pause else [gid, *[int(g) for g in self.pod_sc.get("supplementalGroups") or []]]
        )
        return {"UID": uid, "GID": gid, "AdditionalGids": extra, "Username": ""}

    # --- env and args

    def _env(self, c: dict[str, Any], image: ImageInfo) -> list[str]:
        env: list[str] = list(image.config.get("Env") or []) or [DEFAULT_PATH]
        if c.get("tty"):
            env.append("TERM=xterm")
        env.append("HOSTNAME=$(host-name)")
        values: dict[str, str] = {}
        ns = self.w.namespace
        for i, ef in enumerate(c.get("envFrom") or []):
            prefix = ef.get("prefix", "")
            for key, store in (
                ("configMapRef", self.inputs.config_maps),
                ("secretRef", self.inputs.secrets),
            ):
                if key in ef:
                    ref = ef[key] or {}
                    data = store.get((ns, str(ref.get("name"))))
                    if data is None:
                        if ref.get("optional"):
                            continue
                        raise GenpolicyError(
                            f"{self.w.where}: container {c['name']}: envFrom[{i}].{key}: "
                            f"{ref.get('name')!r} not found in the input files (add it with --config-file)"
                        )
                    for k, v in data.items():
                        values[prefix + k] = v
        for i, e in enumerate(c.get("env") or []):
            name = e.get("name")
            if not isinstance(name, str):
                raise GenpolicyError(
                    f"{self.w.where}: container {c['name']}: env[{i}].name: expected a string"
                )
            if "value" in e:
                values[name] = str(e["value"])
            elif "valueFrom" in e:
                values[name] = self._value_from(c, i, e["valueFrom"] or {})
            else:
                values[name] = ""
        for k, v in values.items():
            env.append(f"{k}={_expand(v, values)}")
        return env

    def _value_from(self, c: dict[str, Any], i: int, vf: dict[str, Any]) -> str:
        where = f"{self.w.where}: container {c['name']}: env[{i}].valueFrom"
        if "fieldRef" in vf:
            path = str((vf["fieldRef"] or {}).get("fieldPath", ""))
            if path in _FIELD_REFS:
                return _FIELD_REFS[path]
            if path == "metadata.namespace":
                return self.w.namespace
            if path in ("spec.serviceAccountName",):
                return str(self.spec.get("serviceAccountName") or "default")
            if path.startswith(("metadata.annotations", "metadata.labels")):
                return "$(todo-annotation)"
            raise GenpolicyError(f"{where}.fieldRef.fieldPath: unsupported field {path!r}")
        if "resourceFieldRef" in vf:
            return "$(resource-field)"
        for key, store in (
            ("configMapKeyRef", self.inputs.config_maps),
            ("secretKeyRef", self.inputs.secrets),
        ):
            if key in vf:
                ref = vf[key] or {}
                data = store.get((self.w.namespace, str(ref.get("name"))))
                if data is None or str(ref.get("key")) not in data:
                    raise GenpolicyError(
                        f"{where}.{key}: {ref.get('name')}/{ref.get('key')} not found in the input "
                        "files (add it with --config-file)"
                    )
                return data[str(ref.get("key"))]
        raise GenpolicyError(f"{where}: unsupported source {sorted(vf)}")

    def _args(self, c: dict[str, Any], image: ImageInfo, env: list[str]) -> list[str]:
        values = {}
        for e in env:
            k, _, v = e.partition("=")
            values[k] = v
        cmd = list(c.get("command") or [])
        args = list(c.get("args") or [])
        out = [_expand(a, values) for a in cmd + args]
        if not cmd:
            out = list(image.config.get("Entrypoint") or []) + out
        if not cmd and not args:
            out += list(image.config.get("Cmd") or [])
        if not out:
            raise GenpolicyError(
                f"{self.w.where}: container {c['name']}: no command: the pod gives none and "
                f"image {image.name} has no Entrypoint or Cmd"
            )
        return out

    # --- mounts, storages

    def _mounts_and_storages(
        self, c: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        rw = ["rbind", "rprivate", "rw"]
        ro = ["rbind", "rprivate", "ro"]
        mounts: list[dict[str, Any]] = copy.deepcopy(self.s["other_container"]["Mounts"])

        def bind(dest: str, name: str, opts: list[str]) -> dict[str, Any]:
            return {
                "destination": dest,
                "source": f"$(sfprefix){name}$",
                "type_": "bind",
                "options": opts,
            }

        mounts.append(bind("/etc/hosts", "hosts", rw))
        term = str(c.get("terminationMessagePath") or "/dev/termination-log")
        mounts.append(bind(term, "termination-log", rw))
        mounts.append(bind("/etc/hostname", "hostname", rw))
        mounts.append(bind("/etc/resolv.conf", "resolv.conf", rw))
        if self.spec.get("automountServiceAccountToken", True) is not False:
            mounts.append(
                bind("/var/run/secrets/kubernetes.io/serviceaccount", "serviceaccount", ro)
            )
        storages: list[dict[str, Any]] = []
        volumes = {v["name"]: v for v in self.spec.get("volumes") or []}
        for i, vm in enumerate(c.get("volumeMounts") or []):
            name = vm.get("name")
            v = volumes.get(name)
            if v is None:
                raise GenpolicyError(
                    f"{self.w.where}: container {c['name']}: volumeMounts[{i}].name: "
                    f"expected one of the pod's volumes {sorted(volumes)}, got {name!r}"
                )
            dest = str(vm.get("mountPath"))
            opts = ro if vm.get("readOnly") else rw
            if "emptyDir" in v:
                path = f"^$(cpath)/$(sandbox-id)/rootfs/local/{name}$"
                mounts.append(
                    {"destination": dest, "source": path, "type_": "local", "options": opts}
                )
                storages.append(
                    {
                        "driver": "local",
                        "driver_options": [],
                        "source": "local",
                        "fstype": "local",
                        "options": ["mode=0777"],
                        "mount_point": path,
                        "fs_group": None,
                    }
                )
            else:  # configMap, secret, projected, downwardAPI: files the host shares
                mounts.append(bind(dest, name, ro))
        return mounts, storages

    # --- containers

    def _annotations(self, base: dict[str, str]) -> dict[str, str]:
        a = dict(base)
        # containerd passes the pod's io.katacontainers.* annotations through to every spec
        for k, v in (self.w.annotations or {}).items():
            if str(k).startswith("io.katacontainers.") and k not in _RUNTIME_ONLY:
                a[str(k)] = str(v)
        a["io.kubernetes.cri.sandbox-name"] = self.w.name
        a["io.kubernetes.cri.sandbox-namespace"] = self.w.namespace
        return dict(sorted(a.items()))

    def _caps(self, c: dict[str, Any]) -> dict[str, list[str]]:
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            full = ["$(privileged_caps)"]
        else:
            capsec = sc.get("capabilities") or {}
            add = [_cap(x) for x in capsec.get("add") or []]
            drop = [_cap(x) for x in capsec.get("drop") or []]
            if add or drop:
                base = [] if "CAP_ALL" in drop else list(self.s["common"]["default_caps"])
                full = [x for x in base if x not in drop] + [x for x in add if x not in base]
            else:
                full = ["$(default_caps)"]
        return {
            "Ambient": [],
            "Bounding": full,
            "Effective": full,
            "Inheritable": [],
            "Permitted": full,
        }

    def pause(self, image: ImageInfo) -> dict[str, Any]:
        ps = self.s["pause_container"]
        env = list(image.config.get("Env") or []) or [DEFAULT_PATH]
        process = {
            "Terminal": False,
            "User": self._user(None, image, pause=True),
            "Args": self._pause_args(ps, image),
            "Env": env,
            "Cwd": "/",
            "Capabilities": {
                "Ambient": [],
                "Bounding": ["$(default_caps)"],
                "Effective": ["$(default_caps)"],
                "Inheritable": [],
                "Permitted": ["$(default_caps)"],
            },
            "NoNewPrivileges": bool(ps["Process"].get("NoNewPrivileges", True)),
        }
        mounts = copy.deepcopy(ps["Mounts"])
        if self.layers == GUEST_PULL:
            mounts += copy.deepcopy(self.s["guest_pull"]["pause_mounts"])
        return self._container(
            ps, process, self._annotations(ps["Annotations"]), mounts, image, [], [], PAUSE_SOURCE
        )

    def _pause_args(self, ps: dict[str, Any], image: ImageInfo) -> list[str]:
        """Settings' pause args; with guest pull, what containerd runs: the pause image's
        Entrypoint + Cmd (the settings' args when the image has neither)."""
        if self.layers == GUEST_PULL:
            args = list(image.config.get("Entrypoint") or []) + list(image.config.get("Cmd") or [])
            if args:
                return [str(a) for a in args]
        return list(ps["Process"].get("Args", ["/pause"]))

    def container(self, c: dict[str, Any], image: ImageInfo) -> dict[str, Any]:
        oc = self.s["other_container"]
        env = self._env(c, image)
        sc = c.get("securityContext") or {}
        nnp = bool(oc["Process"].get("NoNewPrivileges", False))
        if sc.get("allowPrivilegeEscalation") is False:
            nnp = True
        process = {
            "Terminal": bool(c.get("tty", False)),
            "User": self._user(c, image, pause=False),
            "Args": self._args(c, image, env),
            "Env": env,
            "Cwd": str(c.get("workingDir") or image.config.get("WorkingDir") or "/"),
            "Capabilities": self._caps(c),
            "NoNewPrivileges": nnp,
        }
        anno = dict(oc["Annotations"])
        anno["io.kubernetes.cri.container-name"] = c["name"]
        anno["io.kubernetes.cri.image-name"] = c["image"]
        mounts, vol_storages = self._mounts_and_storages(c)
        if self.layers == GUEST_PULL:
            mounts += copy.deepcopy(self.s["guest_pull"]["other_mounts"])
        return self._container(
            oc, process, self._annotations(anno), mounts, image, vol_storages,
            _exec_commands(c), str(c["image"]),
        )  # fmt: skip

    def _container(
        self,
        base: dict[str, Any],
        process: dict[str, Any],
        annotations: dict[str, str],
        mounts: list[dict[str, Any]],
        image: ImageInfo,
        vol_storages: list[dict[str, Any]],
        exec_commands: list[str],
        source: str,
    ) -> dict[str, Any]:
        root = dict(base["Root"])
        version = self.s["kata_config"]["oci_version"]
        if self.layers == GUEST_PULL:
            gp = self.s["guest_pull"]
            root["Path"] = gp["rootfs"]
            version = gp["oci_version"]
            rootfs = [guest_pull_storage(source, gp["rootfs"])]
        else:
            rootfs = layer_storages(image)
        return {
            "OCI": {
                "Version": version,
                "Process": process,
                "Root": root,
                "Mounts": mounts,
                "Annotations": annotations,
                "Linux": copy.deepcopy(base["Linux"]),
            },
            "storages": rootfs + vol_storages,
            # the pause container owns the pod's pid namespace; the others join it when shared
            "sandbox_pidns": source != PAUSE_SOURCE
            and bool(self.spec.get("shareProcessNamespace", False)),
            "exec_commands": exec_commands,
        }


def _cap(x: str) -> str:
    x = str(x).upper()
    return x if x.startswith("CAP_") else "CAP_" + x


def _expand(value: str, values: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` references; ``$$`` stays an escaped ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$$"
        name = m.group(1)
        return values.get(name, m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, value)


def _exec_commands(c: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        cmd = ((c.get(probe) or {}).get("exec") or {}).get("command")
        if cmd:
            out.append(" ".join(str(x) for x in cmd))
    for hook in ("postStart", "preStop"):
        cmd = (((c.get("lifecycle") or {}).get(hook) or {}).get("exec") or {}).get("command")
        if cmd:
            out.append(" ".join(str(x) for x in cmd))
    return out


def _image_user(user: str, accounts: Accounts, where: str) -> tuple[int, int]:
    u = resolve_user(user, accounts, where, GenpolicyError)
    return u.uid, u.gid


def policy_data(
    w: Workload,
    settings: dict[str, Any],
    images: dict[str, ImageInfo],
    inputs: Inputs,
    *,
    allow_exec: tuple[str, ...] = (),
    allow_logs: bool = False,
    layers: str = GUEST_PULL,
) -> dict[str, Any]:
    """The ``policy_data`` document for workload ``w`` (images already fetched) in layer mode
    ``layers`` (:data:`GUEST_PULL` or :data:`TARDEV`)."""
    b = _Builder(w, settings, images, inputs, layers)
    pause_image = images[settings["cluster_config"]["pause_container_image"]]
    containers = [b.pause(pause_image)]
    for c in reversed(w.spec.get("initContainers") or []):
        containers.append(b.container(c, images[c["image"]]))
    for c in w.spec["containers"]:
        containers.append(b.container(c, images[c["image"]]))
    defaults = copy.deepcopy(settings["request_defaults"])
    if allow_exec:
        ex = defaults.setdefault("ExecProcessRequest", {"commands": [], "regex": []})
        ex.setdefault("commands", [])
        ex["commands"] = list(ex["commands"]) + [c for c in allow_exec if c not in ex["commands"]]
    if allow_logs:
        defaults["ReadStreamRequest"] = True
    return {
        "containers": containers,
        "common": copy.deepcopy(settings["common"]),
        "sandbox": copy.deepcopy(settings["sandbox"]),
        "request_defaults": defaults,
    }
