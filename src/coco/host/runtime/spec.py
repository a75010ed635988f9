"""The OCI spec as the kata shim hands it to the agent (``grpc.Spec``, oci.proto).

:func:`to_proto` copies an OCI JSON document into oci.proto's messages by field name (CamelCase
there, camelCase in JSON; fields the proto lacks do not exist on the wire). :func:`constrain`
then makes upstream's changes (``constrainGRPCSpec``): no hooks, no seccomp, only the cgroup
resources the guest applies, the network/cgroup/time namespaces removed and the other paths
emptied (a pid path becomes ``sandbox_pidns``), the guest rootfs, and the annotations the
guest must not or must see.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.message import Message

from coco.host.runtime import ShimError
from coco.integrity.initdata import ANNOTATION as INITDATA_ANNOTATION
from coco.integrity.initdata import ANNOTATION_LEGACY as INITDATA_ANNOTATION_LEGACY
from coco.rpc.protos import agent_pb2, oci_pb2

POLICY_ANNOTATION = "io.katacontainers.config.agent.policy"
HIDDEN_ANNOTATIONS = (POLICY_ANNOTATION, INITDATA_ANNOTATION, INITDATA_ANNOTATION_LEGACY)
GUEST_ROOT = "/run/kata-containers"
SHARED_DIR = "/run/kata-containers/shared/containers"
_SPECIAL = {"Version": "ociVersion", "errnoret": "errnoRet", "Pagesize": "pageSize"}


def json_name(field: str) -> str:
    """oci.proto field name -> OCI JSON key (``UIDMappings`` -> ``uidMappings``)."""
    if field in _SPECIAL:
        return _SPECIAL[field]
    m = re.match(r"[A-Z0-9]+", field)
    if not m:
        return field
    run = m.group(0)
    if len(run) == len(field) or len(run) == 1:
        return run.lower() + field[len(run) :]
    return run[:-1].lower() + field[len(run) - 1 :]


def fill(msg: Message, doc: Any, where: str) -> Message:
    """Copy the JSON object ``doc`` into ``msg``; a value of the wrong type is a ShimError."""
    if doc is None:
        return msg
    if not isinstance(doc, dict):
        raise ShimError(f"{where}: expected an object, found {type(doc).__name__}")
    for f in msg.DESCRIPTOR.fields:
        key = json_name(f.name)
        if key not in doc or doc[key] is None:
            continue
        value = doc[key]
        here = f"{where}.{key}"
        try:
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                getattr(msg, f.name).update({str(k): str(v) for k, v in value.items()})
            elif f.message_type is not None:
                if f.is_repeated:
                    for i, item in enumerate(value):
                        fill(getattr(msg, f.name).add(), item, f"{here}[{i}]")
                else:
                    fill(getattr(msg, f.name), value, here)
            elif f.is_repeated:
                getattr(msg, f.name).extend(value)
            else:
                setattr(msg, f.name, value)
        except (TypeError, ValueError, AttributeError) as e:
            raise ShimError(f"{here}: value {value!r} does not fit oci.proto: {e}") from None
    return msg


def to_proto(spec: dict[str, Any], where: str = "config.json") -> oci_pb2.Spec:
    return fill(oci_pb2.Spec(), spec, where)


def constrain(
    spec: oci_pb2.Spec, cid: str, container_type: str, bundle: str
) -> tuple[oci_pb2.Spec, bool]:
    """Upstream's changes to the spec; returns it and whether to join the sandbox's pid ns."""
    spec.ClearField("Hooks")
    linux = spec.Linux
    linux.ClearField("Seccomp")
    res = linux.Resources
    for name in ("Devices", "Pids", "BlockIO", "Network"):
        res.ClearField(name)
    res.CPU.Cpus = ""
    res.CPU.Mems = ""
    sandbox_pidns = False
    keep = []
    for ns in linux.Namespaces:
        if ns.Type in ("network", "cgroup", "time"):
            continue
        if ns.Type == "pid":
            sandbox_pidns = bool(ns.Path)
            continue
        keep.append(oci_pb2.LinuxNamespace(Type=ns.Type, Path=""))
    del linux.Namespaces[:]
    linux.Namespaces.extend(keep)
    spec.Root.Path = f"{GUEST_ROOT}/{cid}/rootfs"
    for key in HIDDEN_ANNOTATIONS:
        spec.Annotations.pop(key, None)
    spec.Annotations["io.katacontainers.pkg.oci.bundle_path"] = bundle
    spec.Annotations["io.katacontainers.pkg.oci.container_type"] = container_type
    return spec, sandbox_pidns


def guest_pull_storage(cid: str, source: str, annotations: dict[str, str]) -> agent_pb2.Storage:
    """The ``image_guest_pull`` storage of a container (source ``pause`` for the sandbox)."""
    import json

    meta = {k: v for k, v in annotations.items() if k not in HIDDEN_ANNOTATIONS}
    return agent_pb2.Storage(
        driver="image_guest_pull",
        driver_options=["image_guest_pull=" + json.dumps({"metadata": meta}, sort_keys=True)],
        source=source,
        fstype="overlay",
        mount_point=f"{GUEST_ROOT}/{cid}/rootfs",
    )
