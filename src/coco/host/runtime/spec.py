"""The OCI spec as the kata shim hands it to the agent (``grpc.Spec``, oci.proto).

:func:`to_proto` copies an OCI JSON document into oci.proto's messages (:mod:`coco.rpc.ocispec`,
the converter the guest's agent uses the other way; fields the proto lacks do not exist on the
wire). :func:`constrain`
then makes upstream's changes (``constrainGRPCSpec``): no hooks, no seccomp, only the cgroup
resources the guest applies, the network/cgroup/time namespaces removed and the other paths
emptied (a pid path becomes ``sandbox_pidns``), the guest rootfs, and the annotations the
guest must not or must see.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from coco.host.runtime import ShimError
from coco.integrity.initdata import ANNOTATION as INITDATA_ANNOTATION
from coco.integrity.initdata import ANNOTATION_LEGACY as INITDATA_ANNOTATION_LEGACY
from coco.rpc.ocispec import from_json, spec_from_json
from coco.rpc.protos import agent_pb2, oci_pb2

POLICY_ANNOTATION = "io.katacontainers.config.agent.policy"
HIDDEN_ANNOTATIONS = (POLICY_ANNOTATION, INITDATA_ANNOTATION, INITDATA_ANNOTATION_LEGACY)
GUEST_ROOT = "/run/kata-containers"
SHARED_DIR = "/run/kata-containers/shared/containers"


def fill(msg: Message, doc: Any, where: str) -> Message:
    """``msg`` with the JSON object ``doc`` merged in (nothing for ``None``); a value of the
    wrong shape is a ShimError."""
    if doc is not None:
        msg.MergeFrom(from_json(doc, type(msg), where, ShimError))
    return msg


def to_proto(spec: dict[str, Any], where: str = "config.json") -> oci_pb2.Spec:
    return spec_from_json(spec, where, ShimError)


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
