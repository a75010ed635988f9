"""A pod read from Kubernetes YAML, as ``coco pod run`` runs it.

The file holds one workload: a ``Pod``, or a ``Deployment``, ``ReplicaSet``, ``StatefulSet``,
``DaemonSet``, ``Job`` (or ``CronJob``) whose pod template is run once (its own ``metadata.name``
names the pod, as genpolicy names it). ``ConfigMap`` and ``Secret`` documents in the same file
feed ``env``/``envFrom`` and ``configMap``/``secret`` volumes, and ``kubernetes.io/dockerconfigjson``
Secrets named by ``imagePullSecrets`` give registry credentials; other kinds that start nothing
(Service, ...) are skipped.

What is run, and what is not (decided here, documented in ``coco pod run --help``):

* containers: ``image``, ``command``, ``args``, ``workingDir``, ``env`` (``value``, and
  ``valueFrom`` of ``fieldRef`` metadata.name/namespace/uid, spec.nodeName, status.podIP/hostIP,
  ``configMapKeyRef``, ``secretKeyRef``, ``resourceFieldRef``), ``envFrom``, ``resources``
  (cpu and memory), ``volumeMounts`` (``readOnly``, ``subPath``), ``securityContext``,
  ``ports[].hostPort``, ``tty``/``stdin``, ``imagePullPolicy``; init containers run first, each to
  completion, in order.
* volumes: ``emptyDir``, ``configMap`` and ``secret`` (from the same file), ``hostPath``.
* pod: ``hostname``, ``hostNetwork``, ``hostPID``, ``hostIPC``, ``shareProcessNamespace``,
  ``dnsConfig``, ``securityContext``, ``runtimeClassName``, ``imagePullSecrets``,
  ``terminationGracePeriodSeconds``. ``restartPolicy`` is taken as ``Never``.
* ignored on purpose (no cluster here): probes, lifecycle hooks, scheduling fields, service
  account tokens, service links. Any other volume kind is refused with the field named.
"""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coco import yamlio
from coco.host.pod import PodError

# kind -> path from spec to the pod template
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "Deployment": ("template",),
    "ReplicaSet": ("template",),
    "ReplicationController": ("template",),
    "StatefulSet": ("template",),
    "DaemonSet": ("template",),
    "Job": ("template",),
    "CronJob": ("jobTemplate", "spec", "template"),
}

_SKIPPED = {
    "Service",
    "ServiceAccount",
    "Namespace",
    "NetworkPolicy",
    "PersistentVolumeClaim",
    "PersistentVolume",
    "PodDisruptionBudget",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "LimitRange",
    "ResourceQuota",
    "PriorityClass",
}

_VOLUME_KINDS = ("emptyDir", "configMap", "secret", "hostPath")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


@dataclass
class Container:
    name: str
    image: str
    spec: dict[str, Any]  # the container's mapping as written (command, env, resources, ...)
    init: bool = False


@dataclass
class Pod:
    where: str  # "FILE: document N (Kind name)"
    name: str
    namespace: str
    uid: str
    labels: dict[str, str]
    annotations: dict[str, str]
    spec: dict[str, Any]
    init_containers: list[Container]
    containers: list[Container]
    volumes: dict[str, dict[str, Any]]
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    pull_secrets: dict[str, bytes] = field(default_factory=dict)  # name -> .dockerconfigjson

    @property
    def full_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def all_containers(self) -> list[Container]:
        return [*self.init_containers, *self.containers]


def load(path: Path) -> Pod:
    """The one pod of the Kubernetes YAML file at ``path``."""
    try:
        text = path.read_bytes()
    except OSError as e:
        raise PodError(f"{path}: cannot read the pod file: {e.strerror}") from None
    return parse(text, str(path))


def parse(text: str | bytes, where: str) -> Pod:
    docs = [d for d in yamlio.load_all(text, what=where, error=PodError) if d is not None]
    items: list[tuple[str, dict[str, Any]]] = []
    for n, doc in enumerate(docs, 1):
        w = f"{where}: document {n}"
        d = _obj(doc, w, "document")
        if d.get("kind") == "List":
            for i, item in enumerate(_list(d.get("items"), w, "items")):
                items.append((f"{w} item {i}", _obj(item, f"{w} item {i}", "item")))
        else:
            items.append((w, d))
    config_maps: dict[tuple[str, str], dict[str, str]] = {}
    secrets: dict[tuple[str, str], dict[str, str]] = {}
    raw_secrets: dict[tuple[str, str], tuple[str, dict[str, bytes]]] = {}
    workloads: list[tuple[str, dict[str, Any]]] = []
    for w, d in items:
        kind = d.get("kind")
        if not isinstance(kind, str):
            raise PodError(f"{w}: kind: expected a string, found {_kind(kind)}")
        if kind in ("ConfigMap", "Secret"):
            _read_input(w, d, config_maps, secrets, raw_secrets)
        elif kind == "Pod" or kind in _TEMPLATES:
            workloads.append((w, d))
        elif kind not in _SKIPPED:
            known = ", ".join(["Pod", *_TEMPLATES, "ConfigMap", "Secret", "List"])
            raise PodError(f"{w}: unsupported kind {kind!r} (supported: {known})")
    if len(workloads) != 1:
        found = ", ".join(f"{d.get('kind')} in {w}" for w, d in workloads) or "none"
        raise PodError(f"{where}: expected exactly one Pod or workload, found {found}")
    w, d = workloads[0]
    return _pod(w, d, config_maps, secrets, raw_secrets)


def _pod(
    w: str,
    d: dict[str, Any],
    config_maps: dict[tuple[str, str], dict[str, str]],
    secrets: dict[tuple[str, str], dict[str, str]],
    raw_secrets: dict[tuple[str, str], tuple[str, dict[str, bytes]]],
) -> Pod:
    kind = d["kind"]
    meta = _obj(d.get("metadata") or {}, w, "metadata")
    name = meta.get("name")
    namespace = _str(meta.get("namespace") or "default", w, "metadata.namespace")
    if kind == "Pod":
        spec = _obj(d.get("spec"), w, "spec")
        pmeta = meta
        p = "spec"
    else:
        node = _obj(d.get("spec"), w, "spec")
        p = "spec"
        for step in _TEMPLATES[kind]:
            p += "." + step
            node = _obj(node.get(step), w, p)
        pmeta = _obj(node.get("metadata") or {}, w, p + ".metadata")
        spec = _obj(node.get("spec"), w, p + ".spec")
        p += ".spec"
    if not isinstance(name, str) or not name:
        raise PodError(f"{w}: metadata.name: expected a pod name, found {_kind(name)}")
    w = f"{w} ({kind} {name})"
    if not _DNS_SUBDOMAIN.match(name):
        raise PodError(f"{w}: metadata.name: expected a DNS subdomain name, found {name!r}")
    if not _DNS_LABEL.match(namespace):
        raise PodError(f"{w}: metadata.namespace: expected a DNS label, found {namespace!r}")
    uid = pmeta.get("uid")
    if uid is None:
        uid = str(uuid.uuid4())
    else:
        try:
            uid = str(uuid.UUID(str(uid)))
        except ValueError:
            raise PodError(f"{w}: metadata.uid: expected a UUID, found {uid!r}") from None
    labels = _string_map(pmeta.get("labels"), w, "metadata.labels")
    annotations = _string_map(pmeta.get("annotations"), w, "metadata.annotations")
    volumes = _volumes(spec, w, p)
    inits = _containers(spec, "initContainers", w, p, volumes, init=True)
    apps = _containers(spec, "containers", w, p, volumes, init=False)
    if not apps:
        raise PodError(f"{w}: {p}.containers: expected at least one container, found none")
    seen: set[str] = set()
    for c in [*inits, *apps]:
        if c.name in seen:
            raise PodError(f"{w}: container name {c.name!r} is used twice")
        seen.add(c.name)
    pull: dict[str, bytes] = {}
    for i, ref in enumerate(_list(spec.get("imagePullSecrets"), w, p + ".imagePullSecrets")):
        sname = _str(_obj(ref, w, f"{p}.imagePullSecrets[{i}]").get("name"), w, f"{p}.name")
        entry = raw_secrets.get((namespace, sname))
        if entry is None or entry[0] != "kubernetes.io/dockerconfigjson":
            raise PodError(
                f"{w}: {p}.imagePullSecrets[{i}]: expected a Secret {sname!r} of type "
                "kubernetes.io/dockerconfigjson in the same file, found "
                + ("none" if entry is None else f"type {entry[0]!r}")
            )
        pull[sname] = entry[1].get(".dockerconfigjson", b"")
    return Pod(
        where=w,
        name=name,
        namespace=namespace,
        uid=uid,
        labels=labels,
        annotations=annotations,
        spec=spec,
        init_containers=inits,
        containers=apps,
        volumes=volumes,
        config_maps={n: v for (ns, n), v in config_maps.items() if ns == namespace},
        secrets={n: v for (ns, n), v in secrets.items() if ns == namespace},
        pull_secrets=pull,
    )


def _read_input(
    w: str,
    d: dict[str, Any],
    config_maps: dict[tuple[str, str], dict[str, str]],
    secrets: dict[tuple[str, str], dict[str, str]],
    raw_secrets: dict[tuple[str, str], tuple[str, dict[str, bytes]]],
) -> None:
    kind = d["kind"]
    meta = _obj(d.get("metadata") or {}, w, "metadata")
    name = _str(meta.get("name"), w, "metadata.name")
    ns = _str(meta.get("namespace") or "default", w, "metadata.namespace")
    raw: dict[str, bytes] = {}
    for k, v in _obj(d.get("data") or {}, w, "data").items():
        if kind == "Secret":
            try:
                raw[k] = base64.b64decode(str(v), validate=True)
            except ValueError:
                raise PodError(f"{w} (Secret {name}): data.{k}: expected base64") from None
        else:
            raw[k] = str(v).encode()
    for k, v in _obj(d.get("stringData") or {}, w, "stringData").items():
        raw[k] = str(v).encode()
    text = {k: v.decode("utf-8", "replace") for k, v in raw.items()}
    if kind == "Secret":
        secrets[(ns, name)] = text
        raw_secrets[(ns, name)] = (str(d.get("type") or "Opaque"), raw)
    else:
        config_maps[(ns, name)] = text


def _volumes(spec: dict[str, Any], w: str, p: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for i, v in enumerate(_list(spec.get("volumes"), w, p + ".volumes")):
        vp = f"{p}.volumes[{i}]"
        v = _obj(v, w, vp)
        name = _str(v.get("name"), w, vp + ".name")
        kinds = [k for k in v if k != "name"]
        if len(kinds) != 1 or kinds[0] not in _VOLUME_KINDS:
            raise PodError(
                f"{w}: {vp} ({name}): expected one of {', '.join(_VOLUME_KINDS)}, "
                f"found {', '.join(kinds) or 'none'}"
            )
        out[name] = v
    return out


def _containers(
    spec: dict[str, Any],
    key: str,
    w: str,
    p: str,
    volumes: dict[str, dict[str, Any]],
    *,
    init: bool,
) -> list[Container]:
    out = []
    for i, c in enumerate(_list(spec.get(key), w, f"{p}.{key}")):
        cp = f"{p}.{key}[{i}]"
        c = _obj(c, w, cp)
        name = _str(c.get("name"), w, cp + ".name")
        if not _DNS_LABEL.match(name):
            raise PodError(f"{w}: {cp}.name: expected a DNS label, found {name!r}")
        image = _str(c.get("image"), w, cp + ".image")
        if not image.strip():
            raise PodError(f"{w}: {cp}.image: expected an image reference, found an empty one")
        for lst in ("command", "args"):
            for j, a in enumerate(_list(c.get(lst), w, f"{cp}.{lst}")):
                _str(a, w, f"{cp}.{lst}[{j}]")
        for j, e in enumerate(_list(c.get("env"), w, cp + ".env")):
            e = _obj(e, w, f"{cp}.env[{j}]")
            ename = _str(e.get("name"), w, f"{cp}.env[{j}].name")
            if not _ENV_NAME.match(ename):
                raise PodError(
                    f"{w}: {cp}.env[{j}].name: expected a variable name, found {ename!r}"
                )
        for j, vm in enumerate(_list(c.get("volumeMounts"), w, cp + ".volumeMounts")):
            vm = _obj(vm, w, f"{cp}.volumeMounts[{j}]")
            vname = vm.get("name")
            if vname not in volumes:
                raise PodError(
                    f"{w}: {cp}.volumeMounts[{j}].name: expected one of the pod's volumes "
                    f"{sorted(volumes)}, found {vname!r}"
                )
            mp = _str(vm.get("mountPath"), w, f"{cp}.volumeMounts[{j}].mountPath")
            if not mp.startswith("/"):
                raise PodError(
                    f"{w}: {cp}.volumeMounts[{j}].mountPath: expected an absolute path, found {mp!r}"
                )
            sub = str(vm.get("subPath") or "")
            if sub.startswith("/") or ".." in sub.split("/"):
                raise PodError(
                    f"{w}: {cp}.volumeMounts[{j}].subPath: expected a relative path inside the "
                    f"volume, found {sub!r}"
                )
        out.append(Container(name, image.strip(), c, init=init))
    return out


def _obj(v: Any, where: str, path: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise PodError(f"{where}: {path}: expected a mapping, found {_kind(v)}")
    return v


def _list(v: Any, where: str, path: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise PodError(f"{where}: {path}: expected a list, found {_kind(v)}")
    return v


def _str(v: Any, where: str, path: str) -> str:
    if not isinstance(v, str):
        raise PodError(f"{where}: {path}: expected a string, found {_kind(v)}")
    return v


def _string_map(v: Any, where: str, path: str) -> dict[str, str]:
    m = _obj(v or {}, where, path)
    for k, val in m.items():
        if not isinstance(k, str) or not isinstance(val, str):
            raise PodError(
                f"{where}: {path}[{k!r}]: expected a string value, found {_kind(val)} "
                "(quote numbers and booleans)"
            )
    return dict(m)


def _kind(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(v), type(v).__name__
    )
