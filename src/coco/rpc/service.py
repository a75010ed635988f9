"""Declaring a ttRPC service once: its wire name and, per method, the request and response types.

The same :class:`Service` serves both sides: :meth:`coco.rpc.server.Server.register` binds an
implementation to it, and :class:`Stub` turns it into client calls. A service is usually read
from the compiled .proto (:meth:`Service.from_proto`), so the proto file stays the one place that
names it; a hand-written table (``Service(name, {method: (Req, Resp)})``) adds aliases such as
methods upstream renamed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from coco.errors import CocoError


@dataclass(frozen=True)
class Method:
    request: type[Message]
    response: type[Message]


@dataclass(frozen=True, eq=False)
class Service:
    """``name`` is the fully qualified proto service name sent on the wire (``pkg.Service``)."""

    name: str
    methods: Mapping[str, Method] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "." not in self.name or "/" in self.name:
            raise CocoError(f"ttrpc service name: expected <package>.<Service>, got {self.name!r}")
        table = {
            m: spec if isinstance(spec, Method) else Method(*spec)
            for m, spec in self.methods.items()
        }
        object.__setattr__(self, "methods", table)

    @classmethod
    def from_proto(cls, module: ModuleType, service: str) -> Service:
        """The service ``service`` as declared in a generated ``*_pb2`` module (unary only)."""
        desc = module.DESCRIPTOR.services_by_name.get(service)
        if desc is None:
            raise CocoError(
                f"{module.__name__}: no service {service!r}; "
                f"it declares {sorted(module.DESCRIPTOR.services_by_name)}"
            )
        methods = {}
        for m in desc.methods:
            if m.client_streaming or m.server_streaming:
                raise CocoError(f"/{desc.full_name}/{m.name}: streaming methods are not supported")
            methods[m.name] = Method(GetMessageClass(m.input_type), GetMessageClass(m.output_type))
        return cls(desc.full_name, methods)

    def path(self, method: str) -> str:
        """``/pkg.Service/Method``, the form error texts use."""
        return f"/{self.name}/{method}"


class Stub:
    """Calls of one service through a client: ``await Stub(client, AA).GetTeeType()``.

    Works with :class:`coco.rpc.client.Client` (methods return awaitables) and
    :class:`coco.rpc.client.SyncClient` (methods return the reply). A method called without a
    request sends the empty request message.
    """

    def __init__(
        self,
        client: Any,
        service: Service,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self._client = client
        self._service = service
        self._timeout = timeout
        self._metadata = metadata

    def __getattr__(self, method: str) -> Any:
        spec = self._service.methods.get(method)
        if spec is None:
            raise AttributeError(f"{self._service.name} has no method {method!r}")

        def call(
            request: Message | None = None,
            *,
            timeout: float | None = self._timeout,
            metadata: Mapping[str, str] | None = self._metadata,
        ) -> Any:
            return self._client.call(
                self._service.name,
                method,
                spec.request() if request is None else request,
                spec.response,
                timeout=timeout,
                metadata=metadata,
            )

        call.__name__ = method
        return call
