"""Relaying a ttRPC service: a server's handlers that re-issue each call to another server.

Used by the CAA's per-sandbox agent proxy (host) and by the forwarder in the pod VM (guest): both
serve ``grpc.AgentService`` and ``grpc.Health`` and pass every call on, with its deadline and
metadata, answering whatever status the other side answered. ``rewrite`` may change a request
(by method name) before it goes on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from google.protobuf.message import Message

from coco.rpc.client import Client
from coco.rpc.server import CallContext, Handler
from coco.rpc.service import Service

Rewrite = Callable[[Message], None]


def relay_handlers(
    service: Service,
    upstream: Callable[[], Awaitable[Client]],
    rewrite: Mapping[str, Rewrite] | None = None,
) -> dict[str, Handler]:
    """One handler per method of ``service``; ``upstream()`` gives the connection to call."""
    table: dict[str, Handler] = {}
    for name, method in service.methods.items():
        table[name] = _handler(
            service.name, name, method.response, upstream, (rewrite or {}).get(name)
        )
    return table


def _handler(
    service: str,
    method: str,
    response: type[Message],
    upstream: Callable[[], Awaitable[Client]],
    rewrite: Rewrite | None,
) -> Handler:
    async def relay(request: Message, ctx: CallContext) -> Message:
        if rewrite is not None:
            rewrite(request)
        client = await upstream()
        return await client.call(
            service, method, request, response, timeout=ctx.timeout, metadata=ctx.metadata
        )

    relay.__name__ = method
    return relay
