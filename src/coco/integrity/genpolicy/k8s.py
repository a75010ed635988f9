"""Kubernetes input of genpolicy: strict reading of the documents a policy is generated for.

Each workload kind (Pod, Deployment, ReplicaSet, ReplicationController, StatefulSet, DaemonSet,
Job, CronJob, and List of those) yields one :class:`Workload`: its pod template, the names the
guest will see and the mapping where the policy annotation goes. ConfigMaps and Secrets are read
as inputs for ``env``/``envFrom``. Kinds that start no containers (Service, ...) pass through.
Any other kind, and any field this generator does not know how to turn into policy, is refused
with an error naming the document and the field: a policy that silently ignores a field would
allow less, or more, than the pod really does.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from coco import yamlio
from coco.errors import GenpolicyError
from coco.jsonfields import Fields

POLICY_ANNOTATION = "io.katacontainers.config.agent.policy"

PASS_THROUGH = frozenset(
    {
        "ClusterRole",
        "ClusterRoleBinding",
        "LimitRange",
        "Namespace",
        "NetworkPolicy",
        "PersistentVolume",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "PriorityClass",
        "ResourceQuota",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    }
)

_METADATA = {"name", "generateName", "namespace", "labels", "annotations", "uid"}

_POD_SPEC = {
    "activeDeadlineSeconds",
    "affinity",
    "automountServiceAccountToken",
    "containers",
    "dnsConfig",
    "dnsPolicy",
    "enableServiceLinks",
    "hostname",
    "imagePullSecrets",
    "initContainers",
    "nodeName",
    "nodeSelector",
    "preemptionPolicy",
    "priority",
    "priorityClassName",
    "restartPolicy",
    "runtimeClassName",
    "schedulerName",
    "securityContext",
    "serviceAccount",
    "serviceAccountName",
    "setHostnameAsFQDN",
    "shareProcessNamespace",
    "subdomain",
    "terminationGracePeriodSeconds",
    "tolerations",
    "topologySpreadConstraints",
    "volumes",
}

_CONTAINER = {
    "args",
    "command",
    "env",
    "envFrom",
    "image",
    "imagePullPolicy",
    "lifecycle",
    "livenessProbe",
    "name",
    "ports",
    "readinessProbe",
    "resources",
    "securityContext",
    "startupProbe",
    "stdin",
    "stdinOnce",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "tty",
    "volumeMounts",
    "workingDir",
}

_CONTAINER_SC = {
    "allowPrivilegeEscalation",
    "capabilities",
    "privileged",
    "readOnlyRootFilesystem",
    "runAsGroup",
    "runAsNonRoot",
    "runAsUser",
    "seccompProfile",
}

_POD_SC = {
    "fsGroup",
    "fsGroupChangePolicy",
    "runAsGroup",
    "runAsNonRoot",
    "runAsUser",
    "seccompProfile",
    "supplementalGroups",
}

_PROBE = {
    "exec",
    "httpGet",
    "tcpSocket",
    "grpc",
    "initialDelaySeconds",
    "periodSeconds",
    "timeoutSeconds",
    "successThreshold",
    "failureThreshold",
    "terminationGracePeriodSeconds",
}

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

_VALUE_FROM = {"fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef"}

_ENV_FROM = {"prefix", "configMapRef", "secretRef"}

_VOLUME_MOUNT = {"name", "mountPath", "readOnly", "subPath", "mountPropagation"}

_VOLUME_KINDS = {"emptyDir", "configMap", "secret", "projected", "downwardAPI"}

# kind -> (fields of spec, path from spec to the pod template)
_WORKLOADS: dict[str, tuple[set[str], tuple[str, ...]]] = {
    "Deployment": (
        {
            "replicas",
            "selector",
            "template",
            "strategy",
            "minReadySeconds",
            "revisionHistoryLimit",
            "progressDeadlineSeconds",
            "paused",
        },
        ("template",),
    ),
    "ReplicaSet": ({"replicas", "selector", "template", "minReadySeconds"}, ("template",)),
    "ReplicationController": (
        {"replicas", "selector", "template", "minReadySeconds"},
        ("template",),
    ),
    "StatefulSet": (
        {
            "replicas",
            "selector",
            "template",
            "serviceName",
            "volumeClaimTemplates",
            "podManagementPolicy",
            "updateStrategy",
            "revisionHistoryLimit",
            "minReadySeconds",
            "persistentVolumeClaimRetentionPolicy",
            "ordinals",
        },
        ("template",),
    ),
    "DaemonSet": (
        {"selector", "template", "updateStrategy", "minReadySeconds", "revisionHistoryLimit"},
        ("template",),
    ),
    "Job": (
        {
            "template",
            "parallelism",
            "completions",
            "backoffLimit",
            "activeDeadlineSeconds",
            "ttlSecondsAfterFinished",
            "completionMode",
            "selector",
            "manualSelector",
            "suspend",
            "podFailurePolicy",
        },
        ("template",),
    ),
    "CronJob": (
        {
            "schedule",
            "jobTemplate",
            "concurrencyPolicy",
            "suspend",
            "successfulJobsHistoryLimit",
            "failedJobsHistoryLimit",
            "startingDeadlineSeconds",
            "timeZone",
        },
        ("jobTemplate", "spec", "template"),
    ),
}


@dataclass
class Workload:
    """One pod template to generate a policy for."""

    kind: str
    where: str  # "FILE: document N (Kind name)"
    name: str  # pod name as the sandbox will be named; "$(generated-name)" parts for templates
    namespace: str
    spec: dict[str, Any]
    annotations: dict[str, Any]  # the mapping the policy annotation is written to


@dataclass
class Inputs:
    """ConfigMaps and Secrets by (namespace, name): their string data."""

    config_maps: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    secrets: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)


def load_documents(text: str, where: str) -> list[Any]:
    """All YAML documents of ``text`` (empty ones dropped); aliases that make a document contain
    itself or expand it past a bound are refused (see coco.yamlio)."""
    docs = yamlio.load_all(text, what=where, error=GenpolicyError)
    return [d for d in docs if d is not None]


_FIELDS = Fields(GenpolicyError, unknown="unsupported")


def _obj(v: Any, where: str, path: str) -> dict[str, Any]:
    return _FIELDS.expect(v, f"{where}: {path}", dict)


def _list(v: Any, where: str, path: str) -> list[Any]:
    return [] if v is None else _FIELDS.expect(v, f"{where}: {path}", list)


def _str(v: Any, where: str, path: str) -> str:
    return _FIELDS.expect(v, f"{where}: {path}", str)


def _only(obj: Mapping[str, Any], allowed: set[str], where: str, path: str) -> None:
    _FIELDS.check(obj, f"{where}: {path}", optional=allowed)


def iter_documents(docs: list[Any], where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, document) for every document, List items expanded."""
    for n, doc in enumerate(docs, 1):
        w = f"{where}: document {n}"
        d = _obj(doc, w, "document")
        if d.get("kind") == "List":
            for i, item in enumerate(_list(d.get("items"), w, "items")):
                yield f"{w} item {i}", _obj(item, f"{w} item {i}", "item")
        else:
            yield w, d


def read_inputs(docs: list[Any], where: str, inputs: Inputs) -> None:
    """Record the ConfigMaps and Secrets among ``docs``."""
    for w, d in iter_documents(docs, where):
        kind = d.get("kind")
        if kind not in ("ConfigMap", "Secret"):
            continue
        meta = _obj(d.get("metadata") or {}, w, "metadata")
        name = _str(meta.get("name"), w, "metadata.name")
        ns = meta.get("namespace") or "default"
        data: dict[str, str] = {}
        for k, v in _obj(d.get("data") or {}, w, "data").items():
            if kind == "Secret":
                try:
                    data[k] = base64.b64decode(str(v), validate=True).decode()
                except (ValueError, UnicodeDecodeError):
                    raise GenpolicyError(
                        f"{w} (Secret {name}): data.{k}: expected base64 of UTF-8 text"
                    ) from None
            else:
                data[k] = str(v)
        for k, v in _obj(d.get("stringData") or {}, w, "stringData").items():
            data[k] = str(v)
        (inputs.secrets if kind == "Secret" else inputs.config_maps)[(ns, name)] = data


def workloads(docs: list[Any], where: str) -> list[Workload]:
    """The workloads among ``docs``; refuses unknown kinds and unknown fields."""
    out: list[Workload] = []
    for w, d in iter_documents(docs, where):
        kind = _FIELDS.expect(d.get("kind"), f"{w}: kind", str)
        if kind in PASS_THROUGH or kind in ("ConfigMap", "Secret"):
            continue
        meta = _obj(d.get("metadata") or {}, w, "metadata")
        _only(meta, _METADATA, w, "metadata")
        name = meta.get("name") or ""
        w = f"{w} ({kind} {name or meta.get('generateName', '?')})"
        namespace = meta.get("namespace") or "default"
        if kind == "Pod":
            spec = _obj(d.get("spec"), w, "spec")
            pod_name = name or (str(meta.get("generateName", "")) + "$(generated-name)")
            if not name and not meta.get("generateName"):
                raise GenpolicyError(f"{w}: metadata.name: expected a name, found none")
            annotations = meta.setdefault("annotations", {}) or {}
            meta["annotations"] = annotations
            _check_pod_spec(spec, w, "spec")
            out.append(Workload(kind, w, pod_name, namespace, spec, annotations))
            continue
        if kind not in _WORKLOADS:
            supported = ", ".join(["Pod", *sorted(_WORKLOADS), "List", "ConfigMap", "Secret"])
            raise GenpolicyError(f"{w}: unsupported kind {kind!r} (supported: {supported})")
        fields, path = _WORKLOADS[kind]
        spec = _obj(d.get("spec"), w, "spec")
        _only(spec, fields, w, "spec")
        node: dict[str, Any] = spec
        p = "spec"
        for step in path:
            p += "." + step
            node = _obj(node.get(step), w, p)
            if step == "jobTemplate":
                _only(node, {"metadata", "spec"}, w, p)
            elif step == "spec":
                _only(node, _WORKLOADS["Job"][0], w, p)
        template = node
        _only(template, {"metadata", "spec"}, w, p)
        tmeta = _obj(template.setdefault("metadata", {}) or {}, w, p + ".metadata")
        template["metadata"] = tmeta
        _only(tmeta, _METADATA, w, p + ".metadata")
        pod_spec = _obj(template.get("spec"), w, p + ".spec")
        _check_pod_spec(pod_spec, w, p + ".spec")
        annotations = tmeta.setdefault("annotations", {}) or {}
        tmeta["annotations"] = annotations
        if kind == "StatefulSet":
            pod_name = f"{name}-$(generated-name)"
        else:
            pod_name = f"{name}-$(generated-name)" if name else "$(generated-name)"
        out.append(Workload(kind, w, pod_name, namespace, pod_spec, annotations))
    return out


def _check_pod_spec(spec: dict[str, Any], w: str, p: str) -> None:
    _only(spec, _POD_SPEC, w, p)
    if "securityContext" in spec:
        _only(
            _obj(spec["securityContext"], w, p + ".securityContext"),
            _POD_SC,
            w,
            p + ".securityContext",
        )
    containers = _list(spec.get("containers"), w, p + ".containers")
    if not containers:
        raise GenpolicyError(f"{w}: {p}.containers: expected at least one container, found none")
    for key in ("initContainers", "containers"):
        for i, c in enumerate(_list(spec.get(key), w, f"{p}.{key}")):
            cp = f"{p}.{key}[{i}]"
            c = _obj(c, w, cp)
            _only(c, _CONTAINER, w, cp)
            _str(c.get("name"), w, cp + ".name")
            _str(c.get("image"), w, cp + ".image")
            for lst in ("command", "args"):
                for j, a in enumerate(_list(c.get(lst), w, f"{cp}.{lst}")):
                    _str(a, w, f"{cp}.{lst}[{j}]")
            if "securityContext" in c:
                sc = _obj(c["securityContext"], w, cp + ".securityContext")
                _only(sc, _CONTAINER_SC, w, cp + ".securityContext")
                if "capabilities" in sc:
                    caps = _obj(sc["capabilities"], w, cp + ".securityContext.capabilities")
                    _only(caps, {"add", "drop"}, w, cp + ".securityContext.capabilities")
            for j, e in enumerate(_list(c.get("env"), w, cp + ".env")):
                ep = f"{cp}.env[{j}]"
                e = _obj(e, w, ep)
                _only(e, {"name", "value", "valueFrom"}, w, ep)
                _str(e.get("name"), w, ep + ".name")
                if "valueFrom" in e:
                    vf = _obj(e["valueFrom"], w, ep + ".valueFrom")
                    _only(vf, _VALUE_FROM, w, ep + ".valueFrom")
            for j, e in enumerate(_list(c.get("envFrom"), w, cp + ".envFrom")):
                _only(_obj(e, w, f"{cp}.envFrom[{j}]"), _ENV_FROM, w, f"{cp}.envFrom[{j}]")
            if "lifecycle" in c:
                lc = _obj(c["lifecycle"], w, cp + ".lifecycle")
                _only(lc, {"postStart", "preStop"}, w, cp + ".lifecycle")
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in c:
                    _only(_obj(c[probe], w, f"{cp}.{probe}"), _PROBE, w, f"{cp}.{probe}")
            for j, vm in enumerate(_list(c.get("volumeMounts"), w, cp + ".volumeMounts")):
                _only(
                    _obj(vm, w, f"{cp}.volumeMounts[{j}]"),
                    _VOLUME_MOUNT,
                    w,
                    f"{cp}.volumeMounts[{j}]",
                )
    for i, v in enumerate(_list(spec.get("volumes"), w, p + ".volumes")):
        vp = f"{p}.volumes[{i}]"
        v = _obj(v, w, vp)
        name = _str(v.get("name"), w, vp + ".name")
        if not _DNS_LABEL.match(name):
            raise GenpolicyError(
                f"{w}: {vp}.name: expected a DNS label ([a-z0-9-], at most 63), got {name!r}"
            )
        _only(v, {"name", *_VOLUME_KINDS}, w, vp)
