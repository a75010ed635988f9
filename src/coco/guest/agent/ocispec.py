"""The agent's side of the OCI spec, and requests as the agent policy sees them.

The conversion between the ``Spec`` the host sent and the ``config.json`` runc reads is
:mod:`coco.rpc.ocispec` (the host's shim uses the same one); here it raises the agent's error.

:func:`policy_input` is a request as upstream's agent hands it to the policy engine (serde over
the rust-protobuf structs): every field present, an unset message ``null``, the proto field
names, a field named ``type`` written ``type_``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from coco.guest.agent.errors import AgentError
from coco.rpc import ocispec
from coco.rpc.protos import oci_pb2

_RUST_KEYWORDS = {"type"}


def spec_to_json(spec: oci_pb2.Spec) -> dict[str, Any]:
    """``config.json`` for the ``Spec`` the host sent."""
    return ocispec.spec_to_json(spec)


def spec_from_json(doc: Any, where: str = "config.json") -> oci_pb2.Spec:
    return ocispec.spec_from_json(doc, where, AgentError)


def process_to_json(process: oci_pb2.Process) -> dict[str, Any]:
    return ocispec.to_json(process)


def process_from_json(doc: Any, where: str = "process") -> oci_pb2.Process:
    return ocispec.from_json(doc, oci_pb2.Process, where, AgentError)


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
        if ocispec.is_map(f):
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
