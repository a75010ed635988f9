"""The OCI runtime spec in its two forms, and requests as the agent policy sees them.

oci.proto names the fields after the OCI JSON keys in CamelCase (``Process.NoNewPrivileges`` is
``process.noNewPrivileges``); the few that do not follow the rule are listed in ``_RENAMED``.
:func:`spec_to_json` makes the ``config.json`` runc reads from the ``Spec`` the host sent, every
field that travels on the wire (zero values are left out, as Go's ``omitempty`` does);
:func:`spec_from_json` is the other way (what a shim does with containerd's ``config.json``);
OCI keys with no field in oci.proto (``process.scheduler``, ``linux.personality``) do not travel.

:func:`policy_input` is a request as upstream's agent hands it to the policy engine (serde over
the rust-protobuf structs): every field present, an unset message ``null``, the proto field
names, a field named ``type`` written ``type_``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from coco.guest.agent.errors import AgentError
from coco.rpc.protos import oci_pb2

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
_RUST_KEYWORDS = {"type"}


def json_key(proto_name: str) -> str:
    renamed = _RENAMED.get(proto_name)
    if renamed is not None:
        return renamed
    return proto_name[:1].lower() + proto_name[1:]


def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def _to_json(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _ALWAYS.get(msg.DESCRIPTOR.name, ()):
        out[json_key(name)] = getattr(msg, name)
    for f, value in msg.ListFields():
        if f.name in _SKIP:
            continue
        key = json_key(f.name)
        if _is_map(f):
            out[key] = dict(value)
        elif f.is_repeated:
            if f.message_type is not None:
                out[key] = [_to_json(v) for v in value]
            else:
                out[key] = list(value)
        elif f.message_type is not None:
            out[key] = _to_json(value)
        else:
            out[key] = value
    return out


def spec_to_json(spec: oci_pb2.Spec) -> dict[str, Any]:
    """``config.json`` for ``spec`` (``ociVersion``, ``process``, ``root``, ... ``linux``)."""
    return _to_json(spec)


def _from_json(doc: Any, cls: type[Message], where: str) -> Message:
    if not isinstance(doc, dict):
        raise AgentError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    msg = cls()
    desc: Descriptor = msg.DESCRIPTOR
    by_key = {json_key(f.name): f for f in desc.fields}
    for key, value in doc.items():
        f = by_key.get(key)
        if f is None or value is None:
            continue  # an OCI field oci.proto does not carry does not travel
        here = f"{where}.{key}"
        try:
            if _is_map(f):
                if not isinstance(value, dict):
                    raise AgentError(f"{here}: expected an object of strings")
                getattr(msg, f.name).update({str(k): str(v) for k, v in value.items()})
            elif f.is_repeated:
                if not isinstance(value, list):
                    raise AgentError(f"{here}: expected a list, got {type(value).__name__}")
                target = getattr(msg, f.name)
                if f.message_type is not None:
                    cls_ = type(target.add())
                    del target[:]
                    for i, v in enumerate(value):
                        target.append(_from_json(v, cls_, f"{here}[{i}]"))
                else:
                    target.extend(value)
            elif f.message_type is not None:
                sub = getattr(msg, f.name)
                sub.CopyFrom(_from_json(value, type(sub), here))
            else:
                setattr(msg, f.name, value)
        except (TypeError, ValueError) as e:
            raise AgentError(f"{here}: {e}") from None
    return msg


def spec_from_json(doc: dict[str, Any], where: str = "config.json") -> oci_pb2.Spec:
    """The ``Spec`` a shim sends for the OCI ``config.json`` document ``doc``."""
    return _from_json(doc, oci_pb2.Spec, where)  # type: ignore[return-value]


def process_to_json(process: oci_pb2.Process) -> dict[str, Any]:
    return _to_json(process)


def process_from_json(doc: dict[str, Any], where: str = "process") -> oci_pb2.Process:
    return _from_json(doc, oci_pb2.Process, where)  # type: ignore[return-value]


# --- the policy's view ----------------------------------------------------------------------------


def _field_value(f: FieldDescriptor, value: Any) -> Any:
    if f.message_type is not None:
        return policy_input(value)
    if f.type == FieldDescriptor.TYPE_BYTES:
        return list(value)
    return value


def policy_input(msg: Message) -> dict[str, Any]:
    """``msg`` as upstream's agent serializes it for the policy (see the module docstring)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        key = f.name + "_" if f.name in _RUST_KEYWORDS else f.name
        value = getattr(msg, f.name)
        if _is_map(f):
            out[key] = dict(value)
        elif f.is_repeated:
            out[key] = [_field_value(f, v) for v in value]
        elif f.message_type is not None:
            out[key] = policy_input(value) if msg.HasField(f.name) else None
        elif f.containing_oneof is not None and not msg.HasField(f.name):
            out[key] = None
        else:
            out[key] = _field_value(f, value)
    return out
