"""A :class:`~coco.host.pod.manifest.Pod` as the CRI's PodSandboxConfig and ContainerConfigs.

Filled the way the kubelet fills them, so that a runtime (and an agent policy generated from the
same YAML) sees what it would see under Kubernetes:

* sandbox: metadata (name, uid, namespace, attempt 0); hostname (``spec.hostname`` or the pod
  name, empty with ``hostNetwork``); log directory ``<log root>/<ns>_<name>_<uid>`` (the kubelet's
  ``/var/log/pods`` by default, which the upstream policy expects); labels with
  ``io.kubernetes.pod.{name,namespace,uid}``; the pod's annotations unchanged (so
  ``io.katacontainers.config.agent.policy`` reaches a runtime that lets it through); namespaces
  (network POD or NODE, pid CONTAINER, POD with ``shareProcessNamespace``, NODE with
  ``hostPID``; ipc POD or NODE); the pod security context; host ports.
* containers: metadata; the image by the id PullImage returned, as the kubelet does; command and
  args with ``$(VAR)`` expanded as the kubelet expands them (``$$`` is a literal ``$``, an
  unknown reference stays as written); env; working dir; mounts of the pod's volumes; labels
  ``io.kubernetes.container.name`` and the pod's; log path ``<name>/0.log``; cpu and memory
  resources; the security context merged from pod and container, with the kubelet's default
  masked and read-only ``/proc`` paths unless privileged.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from coco.host.pod import PodError
from coco.host.pod.manifest import Container, Pod
from coco.rpc.protos import cri_pb2 as pb

LOG_ROOT = Path("/var/log/pods")
"""The kubelet's pod log root: the upstream agent policy expects log directories under it."""

# coco's own sandbox annotations: where this pod's host-side files are, for `coco pod delete`
ANNOTATION_LOG_DIR = "coco.pod/log-directory"
ANNOTATION_VOLUME_DIR = "coco.pod/volume-directory"

LABEL_POD_NAME = "io.kubernetes.pod.name"
LABEL_POD_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_POD_UID = "io.kubernetes.pod.uid"
LABEL_CONTAINER_NAME = "io.kubernetes.container.name"

# the kubelet's defaults for unprivileged containers (k8s.io/kubernetes pkg/securitycontext)
MASKED_PATHS = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

VOLUME_DIRS = {
    "emptyDir": "kubernetes.io~empty-dir",
    "configMap": "kubernetes.io~configmap",
    "secret": "kubernetes.io~secret",
}
"""Volume kind -> the kubelet's directory name under ``<pod dir>/volumes`` (kata recognises
``kubernetes.io~empty-dir`` in a bind source as an emptyDir)."""

CPU_PERIOD = 100_000


def log_directory(pod: Pod, log_root: Path) -> Path:
    return log_root / f"{pod.namespace}_{pod.name}_{pod.uid}"


def hostname(pod: Pod) -> str:
    if pod.spec.get("hostNetwork"):
        return ""
    name = str(pod.spec.get("hostname") or pod.name)
    return name[:63].rstrip("-.")


def sandbox_labels(pod: Pod) -> dict[str, str]:
    return {
        **pod.labels,
        LABEL_POD_NAME: pod.name,
        LABEL_POD_NAMESPACE: pod.namespace,
        LABEL_POD_UID: pod.uid,
    }


def _namespaces(pod: Pod) -> Any:
    spec = pod.spec
    pid = (
        pb.NODE
        if spec.get("hostPID")
        else pb.POD
        if spec.get("shareProcessNamespace")
        else pb.CONTAINER
    )
    return pb.NamespaceOption(
        network=pb.NODE if spec.get("hostNetwork") else pb.POD,
        pid=pid,
        ipc=pb.NODE if spec.get("hostIPC") else pb.POD,
    )


def sandbox_config(pod: Pod, *, log_dir: Path, volume_dir: Path) -> Any:
    spec = pod.spec
    psc = _mapping(spec.get("securityContext"), pod, "spec.securityContext")
    sc = pb.LinuxSandboxSecurityContext(
        namespace_options=_namespaces(pod),
        supplemental_groups=[
            _int(g, pod, "supplementalGroups") for g in psc.get("supplementalGroups") or []
        ],
    )
    if "runAsUser" in psc:
        sc.run_as_user.value = _int(psc["runAsUser"], pod, "spec.securityContext.runAsUser")
    if "runAsGroup" in psc:
        sc.run_as_group.value = _int(psc["runAsGroup"], pod, "spec.securityContext.runAsGroup")
    seccomp = _seccomp(psc.get("seccompProfile"), pod, "spec.securityContext.seccompProfile")
    if seccomp is not None:
        sc.seccomp.CopyFrom(seccomp)
    sc.privileged = any(
        bool((c.spec.get("securityContext") or {}).get("privileged")) for c in pod.all_containers
    )
    cfg = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=pod.name, uid=pod.uid, namespace=pod.namespace),
        hostname=hostname(pod),
        log_directory=str(log_dir),
        labels=sandbox_labels(pod),
        annotations={
            **pod.annotations,
            ANNOTATION_LOG_DIR: str(log_dir),
            ANNOTATION_VOLUME_DIR: str(volume_dir),
        },
        linux=pb.LinuxPodSandboxConfig(security_context=sc),
        port_mappings=_ports(pod),
    )
    dns = spec.get("dnsConfig")
    if dns:
        dns = _mapping(dns, pod, "spec.dnsConfig")
        options = []
        for o in dns.get("options") or []:
            o = _mapping(o, pod, "spec.dnsConfig.options[]")
            options.append(f"{o['name']}:{o['value']}" if o.get("value") else str(o.get("name")))
        cfg.dns_config.CopyFrom(
            pb.DNSConfig(
                servers=[str(s) for s in dns.get("nameservers") or []],
                searches=[str(s) for s in dns.get("searches") or []],
                options=options,
            )
        )
    return cfg


def _ports(pod: Pod) -> list[Any]:
    out = []
    protocols = {"TCP": pb.TCP, "UDP": pb.UDP, "SCTP": pb.SCTP}
    for c in pod.containers:
        for i, port in enumerate(c.spec.get("ports") or []):
            port = _mapping(port, pod, f"container {c.name}: ports[{i}]")
            if not port.get("hostPort"):
                continue
            proto = str(port.get("protocol") or "TCP")
            if proto not in protocols:
                raise PodError(
                    f"{pod.where}: container {c.name}: ports[{i}].protocol: expected TCP, UDP or "
                    f"SCTP, found {proto!r}"
                )
            out.append(
                pb.PortMapping(
                    protocol=protocols[proto],
                    container_port=_int(port.get("containerPort"), pod, "containerPort"),
                    host_port=_int(port["hostPort"], pod, "hostPort"),
                    host_ip=str(port.get("hostIP") or ""),
                )
            )
    return out


# --- environment


def expand(text: str, values: dict[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion: ``$$`` is ``$``; an unknown ``$(X)`` stays as is."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return values.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([^)]*)\)", sub, text)


def environment(
    pod: Pod, c: Container, *, pod_ip: str = "", host_ip: str = "", node_name: str = ""
) -> list[tuple[str, str]]:
    """The container's env as the kubelet sends it: ``envFrom`` first, then ``env`` (later names
    replace earlier ones in place; values may reference variables defined before them)."""
    values: dict[str, str] = {}
    where = f"{pod.where}: container {c.name}"
    for i, ef in enumerate(c.spec.get("envFrom") or []):
        ef = _mapping(ef, pod, f"container {c.name}: envFrom[{i}]")
        prefix = str(ef.get("prefix") or "")
        for key, store in (("configMapRef", pod.config_maps), ("secretRef", pod.secrets)):
            if key not in ef:
                continue
            ref = _mapping(ef[key], pod, f"container {c.name}: envFrom[{i}].{key}")
            data = store.get(str(ref.get("name")))
            if data is None:
                if ref.get("optional"):
                    continue
                raise PodError(
                    f"{where}: envFrom[{i}].{key}: {ref.get('name')!r} is not in the pod file"
                )
            for k, v in data.items():
                values[prefix + k] = v
    for i, e in enumerate(c.spec.get("env") or []):
        name = e["name"]
        if "valueFrom" in e:
            values[name] = _value_from(
                pod, c, i, e["valueFrom"] or {}, pod_ip=pod_ip, host_ip=host_ip, node=node_name
            )
        else:
            values[name] = expand(str(e.get("value", "")), values)
    return list(values.items())


def _value_from(
    pod: Pod, c: Container, i: int, vf: Any, *, pod_ip: str, host_ip: str, node: str
) -> str:
    where = f"{pod.where}: container {c.name}: env[{i}].valueFrom"
    vf = _mapping(vf, pod, f"container {c.name}: env[{i}].valueFrom")
    if "fieldRef" in vf:
        path = str((vf["fieldRef"] or {}).get("fieldPath", ""))
        fields = {
            "metadata.name": pod.name,
            "metadata.namespace": pod.namespace,
            "metadata.uid": pod.uid,
            "spec.nodeName": node,
            "spec.serviceAccountName": str(pod.spec.get("serviceAccountName") or "default"),
            "status.podIP": pod_ip,
            "status.hostIP": host_ip,
        }
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
        if m:
            return (pod.labels if m.group(1) == "labels" else pod.annotations).get(m.group(2), "")
        if path not in fields:
            raise PodError(
                f"{where}.fieldRef.fieldPath: expected one of {', '.join(fields)}, found {path!r}"
            )
        return fields[path]
    if "resourceFieldRef" in vf:
        ref = _mapping(vf["resourceFieldRef"], pod, "resourceFieldRef")
        target = pod.all_containers[0]
        if ref.get("containerName"):
            target = next((x for x in pod.all_containers if x.name == ref["containerName"]), c)
        else:
            target = c
        kind, _, res = str(ref.get("resource", "")).partition(".")
        value = ((target.spec.get("resources") or {}).get(kind) or {}).get(res)
        if value is None:
            return "0"
        divisor = quantity(str(ref.get("divisor") or "1"), where)
        q = quantity(str(value), where) / divisor
        return str(int(q.to_integral_value(rounding="ROUND_CEILING")))
    for key, store in (("configMapKeyRef", pod.config_maps), ("secretKeyRef", pod.secrets)):
        if key in vf:
            ref = _mapping(vf[key], pod, key)
            data = store.get(str(ref.get("name")))
            if data is None or str(ref.get("key")) not in data:
                if ref.get("optional"):
                    return ""
                raise PodError(
                    f"{where}.{key}: {ref.get('name')}/{ref.get('key')} is not in the pod file"
                )
            return data[str(ref.get("key"))]
    raise PodError(
        f"{where}: expected fieldRef, resourceFieldRef, configMapKeyRef or "
        f"secretKeyRef, found {sorted(vf)}"
    )


# --- resources


_SUFFIXES = {
    "": 1,
    "m": Decimal("0.001"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def quantity(text: str, where: str = "") -> Decimal:
    """A Kubernetes resource quantity (``500m``, ``1.5``, ``64Mi``, ``1e3``) as a number."""
    m = re.fullmatch(r"([+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)([a-zA-Z]*)", text.strip())
    if m is None or m.group(2) not in _SUFFIXES:
        raise PodError(
            f"{where}: expected a resource quantity such as 500m, 2 or 64Mi, found {text!r}"
        )
    try:
        return Decimal(m.group(1)) * _SUFFIXES[m.group(2)]
    except InvalidOperation:
        raise PodError(f"{where}: expected a resource quantity, found {text!r}") from None


def resources(pod: Pod, c: Container) -> Any:
    res = _mapping(c.spec.get("resources"), pod, f"container {c.name}: resources")
    limits = _mapping(res.get("limits"), pod, f"container {c.name}: resources.limits")
    requests = {**limits, **_mapping(res.get("requests"), pod, "resources.requests")}
    where = f"{pod.where}: container {c.name}: resources"
    out = pb.LinuxContainerResources()
    cpu_req = quantity(str(requests["cpu"]), where + ".requests.cpu") if "cpu" in requests else None
    milli = int((cpu_req or 0) * 1000)
    out.cpu_shares = max(2, milli * 1024 // 1000) if cpu_req is not None else 2
    if "cpu" in limits:
        lim = int(quantity(str(limits["cpu"]), where + ".limits.cpu") * 1000)
        out.cpu_period = CPU_PERIOD
        out.cpu_quota = max(1000, lim * CPU_PERIOD // 1000)
    if "memory" in limits:
        out.memory_limit_in_bytes = int(quantity(str(limits["memory"]), where + ".limits.memory"))
    return out


# --- containers


def container_config(
    pod: Pod,
    c: Container,
    *,
    image_ref: str,
    volume_dir: Path,
    env: list[tuple[str, str]],
) -> Any:
    values = dict(env)
    cmd = [expand(a, values) for a in c.spec.get("command") or []]
    args = [expand(a, values) for a in c.spec.get("args") or []]
    cfg = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=c.name),
        image=pb.ImageSpec(image=image_ref, user_specified_image=c.image),
        command=cmd,
        args=args,
        working_dir=str(c.spec.get("workingDir") or ""),
        envs=[pb.KeyValue(key=k, value=v) for k, v in env],
        mounts=mounts(pod, c, volume_dir),
        labels={
            LABEL_CONTAINER_NAME: c.name,
            LABEL_POD_NAME: pod.name,
            LABEL_POD_NAMESPACE: pod.namespace,
            LABEL_POD_UID: pod.uid,
        },
        log_path=f"{c.name}/0.log",
        stdin=bool(c.spec.get("stdin")),
        stdin_once=bool(c.spec.get("stdinOnce")),
        tty=bool(c.spec.get("tty")),
        linux=pb.LinuxContainerConfig(
            resources=resources(pod, c), security_context=security_context(pod, c)
        ),
    )
    return cfg


def volume_path(volume_dir: Path, name: str, volume: dict[str, Any]) -> Path:
    """Where the kubelet-style directory of ``volume`` lives on the host (hostPath: itself)."""
    if "hostPath" in volume:
        return Path(str((volume["hostPath"] or {}).get("path", "")))
    kind = next(k for k in VOLUME_DIRS if k in volume)
    return volume_dir / VOLUME_DIRS[kind] / name


def mounts(pod: Pod, c: Container, volume_dir: Path) -> list[Any]:
    out = []
    for vm in c.spec.get("volumeMounts") or []:
        v = pod.volumes[vm["name"]]
        host = volume_path(volume_dir, vm["name"], v)
        if vm.get("subPath"):
            host = host / str(vm["subPath"])
        read_only = bool(vm.get("readOnly")) or "configMap" in v or "secret" in v
        prop = {
            "HostToContainer": pb.PROPAGATION_HOST_TO_CONTAINER,
            "Bidirectional": pb.PROPAGATION_BIDIRECTIONAL,
        }.get(str(vm.get("mountPropagation") or ""), pb.PROPAGATION_PRIVATE)
        out.append(
            pb.Mount(
                container_path=str(vm["mountPath"]),
                host_path=str(host),
                readonly=read_only,
                propagation=prop,
            )
        )
    return out


def security_context(pod: Pod, c: Container) -> Any:
    psc = _mapping(pod.spec.get("securityContext"), pod, "spec.securityContext")
    csc = _mapping(c.spec.get("securityContext"), pod, f"container {c.name}: securityContext")
    merged = {
        **{
            k: psc[k]
            for k in ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile")
            if k in psc
        },
        **csc,
    }
    where = f"container {c.name}: securityContext"
    sc = pb.LinuxContainerSecurityContext(
        privileged=bool(merged.get("privileged")),
        namespace_options=_namespaces(pod),
        readonly_rootfs=bool(merged.get("readOnlyRootFilesystem")),
        supplemental_groups=[
            _int(g, pod, "supplementalGroups") for g in psc.get("supplementalGroups") or []
        ]
        + ([_int(psc["fsGroup"], pod, "fsGroup")] if "fsGroup" in psc else []),
        no_new_privs=merged.get("allowPrivilegeEscalation") is False,
    )
    if "runAsUser" in merged:
        sc.run_as_user.value = _int(merged["runAsUser"], pod, where + ".runAsUser")
    if "runAsGroup" in merged:
        sc.run_as_group.value = _int(merged["runAsGroup"], pod, where + ".runAsGroup")
    if merged.get("runAsNonRoot") and merged.get("runAsUser") == 0:
        raise PodError(f"{pod.where}: {where}: runAsNonRoot is true but runAsUser is 0")
    caps = _mapping(merged.get("capabilities"), pod, where + ".capabilities")
    if caps:
        sc.capabilities.CopyFrom(
            pb.Capability(
                add_capabilities=[str(x) for x in caps.get("add") or []],
                drop_capabilities=[str(x) for x in caps.get("drop") or []],
            )
        )
    if not sc.privileged:
        sc.masked_paths.extend(MASKED_PATHS)
        sc.readonly_paths.extend(READONLY_PATHS)
    seccomp = _seccomp(merged.get("seccompProfile"), pod, where + ".seccompProfile")
    if seccomp is not None:
        sc.seccomp.CopyFrom(seccomp)
    return sc


def _seccomp(profile: Any, pod: Pod, where: str) -> Any | None:
    if not profile:
        return None
    profile = _mapping(profile, pod, where)
    kinds = {
        "RuntimeDefault": pb.SecurityProfile.RuntimeDefault,
        "Unconfined": pb.SecurityProfile.Unconfined,
        "Localhost": pb.SecurityProfile.Localhost,
    }
    t = str(profile.get("type"))
    if t not in kinds:
        raise PodError(
            f"{pod.where}: {where}.type: expected RuntimeDefault, Unconfined or Localhost, found {t!r}"
        )
    return pb.SecurityProfile(
        profile_type=kinds[t], localhost_ref=str(profile.get("localhostProfile") or "")
    )


def _mapping(v: Any, pod: Pod, what: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise PodError(f"{pod.where}: {what}: expected a mapping, found {type(v).__name__}")
    return v


def _int(v: Any, pod: Pod, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise PodError(f"{pod.where}: {what}: expected an integer, found {v!r}")
    return v
