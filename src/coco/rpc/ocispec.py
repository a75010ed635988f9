"""The OCI runtime spec between its two forms: the Kata agent's protobuf (oci.proto, ``grpc.Spec``)
and the ``config.json`` document runc reads.

The one converter of the host's shim (config.json from containerd -> the ``Spec`` it sends) and
the guest's agent (the ``Spec`` received -> the config.json it hands runc). oci.proto names the
fields after the OCI JSON keys in CamelCase (``Process.NoNewPrivileges`` is
``process.noNewPrivileges``); the few that do not follow the rule are listed in ``_RENAMED``.
:func:`to_json` writes every field that travels on the wire (zero values are left out, as Go's
``omitempty`` does, except those runtime-spec always writes); :func:`from_json` is the other way.
OCI keys with no field in oci.proto (``process.scheduler``, ``linux.personality``) do not travel.
"""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from coco.errors import CocoError
from coco.rpc.protos import oci_pb2

M = TypeVar("M", bound=Message)

# proto field name -> OCI JSON key, where lower-casing the first letter is not the answer
_RENAMED = {
    "Version": "ociVersion",
    "UIDMappings": "uidMappings",
    "GIDMappings": "gidMappings",
    "UID": "uid",
    "GID": "gid",
    "OOMScoreAdj": "oomScoreAdj",
    "CPU": "cpu",
    "Pagesize": "pageSize",
    "errnoret": "errnoRet",
}
# fields runtime-spec writes without omitempty: written even when zero
_ALWAYS = {
    "User": ("UID", "GID"),
    "LinuxDeviceCgroup": ("Allow",),
    "LinuxIDMapping": ("HostID", "ContainerID", "Size"),
    "Root": ("Path",),
    "Process": ("Cwd",),
    "LinuxNamespace": ("Type",),
    "LinuxSeccompArg": ("Index", "Value", "Op"),
}
_SKIP = {"Solaris", "Windows"}  # not Linux: never written to config.json


def json_key(proto_name: str) -> str:
    """oci.proto field name -> OCI JSON key (``UIDMappings`` -> ``uidMappings``)."""
    renamed = _RENAMED.get(proto_name)
    if renamed is not None:
        return renamed
    return proto_name[:1].lower() + proto_name[1:]


def is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def to_json(msg: Message) -> dict[str, Any]:
    """The OCI JSON object of ``msg`` (a ``Spec``, ``Process``, ``Mount`` ...)."""
    out: dict[str, Any] = {}
    for name in _ALWAYS.get(msg.DESCRIPTOR.name, ()):
        out[json_key(name)] = getattr(msg, name)
    for f, value in msg.ListFields():
        if f.name in _SKIP:
            continue
        key = json_key(f.name)
        if is_map(f):
            out[key] = dict(value)
        elif f.is_repeated:
            if f.message_type is not None:
                out[key] = [to_json(v) for v in value]
            else:
                out[key] = list(value)
        elif f.message_type is not None:
            out[key] = to_json(value)
        else:
            out[key] = value
    return out


def from_json(doc: Any, cls: type[M], where: str, error: type[CocoError] = CocoError) -> M:
    """The ``cls`` message of the OCI JSON object ``doc``; a value of the wrong shape raises
    ``error`` naming where it is (``config.json.process.args``)."""
    if not isinstance(doc, dict):
        raise error(f"{where}: expected a JSON object, found {type(doc).__name__}")
    msg = cls()
    by_key = {json_key(f.name): f for f in msg.DESCRIPTOR.fields}
    for key, value in doc.items():
        f = by_key.get(key)
        if f is None or value is None:
            continue  # an OCI field oci.proto does not carry does not travel
        here = f"{where}.{key}"
        try:
            if is_map(f):
                if not isinstance(value, dict):
                    raise error(f"{here}: expected an object of strings")
                getattr(msg, f.name).update({str(k): str(v) for k, v in value.items()})
            elif f.is_repeated:
                if not isinstance(value, list):
                    raise error(f"{here}: expected a list, found {type(value).__name__}")
                target = getattr(msg, f.name)
                if f.message_type is not None:
                    item_cls = type(target.add())
                    del target[:]
                    for i, v in enumerate(value):
                        target.append(from_json(v, item_cls, f"{here}[{i}]", error))
                else:
                    target.extend(value)
            elif f.message_type is not None:
                getattr(msg, f.name).CopyFrom(
                    from_json(value, type(getattr(msg, f.name)), here, error)
                )
            else:
                setattr(msg, f.name, value)
        except (TypeError, ValueError) as e:
            raise error(f"{here}: value {value!r:.80} does not fit oci.proto: {e}") from None
    return msg


def spec_to_json(spec: oci_pb2.Spec) -> dict[str, Any]:
    """``config.json`` for ``spec`` (``ociVersion``, ``process``, ``root``, ... ``linux``)."""
    return to_json(spec)


def spec_from_json(
    doc: Any, where: str = "config.json", error: type[CocoError] = CocoError
) -> oci_pb2.Spec:
    """The ``Spec`` a shim sends for the OCI ``config.json`` document ``doc``."""
    return from_json(doc, oci_pb2.Spec, where, error)
