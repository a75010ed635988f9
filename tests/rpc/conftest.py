"""Helpers of the coco.rpc tests: run a coroutine with a bound, serve services in-process, and talk
raw frames to a server (so tests see exactly the bytes on the wire)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

from coco.rpc import Client, Server, Service
from coco.rpc.protos import ttrpc_pb2

HEADER = struct.Struct(">IIBB")


def arun(coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
    """Run ``coro`` on a fresh loop; a hang fails the test instead of blocking it."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, services: dict[Service, object], address: str | None = None
) -> AsyncIterator[str]:
    """A :class:`Server` with ``services`` listening on a unix socket in ``tmp_path`` (or
    ``address``); stopped when the block ends, even on failure."""
    server = Server()
    for service, impl in services.items():
        server.register(service, impl)
    bound = await server.listen(address or f"unix://{tmp_path}/rpc.sock")
    try:
        yield bound
    finally:
        await server.stop(grace=1)


@contextlib.asynccontextmanager
async def connected(tmp_path: Path, services: dict[Service, object]) -> AsyncIterator[Client]:
    """:func:`serving` plus a :class:`Client` connected to it."""
    async with serving(tmp_path, services) as address:
        client = await Client.connect(address)
        try:
            yield client
        finally:
            await client.close()


class RawConn:
    """A client that writes and reads frames byte by byte, without coco.rpc's client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, socket_path: str) -> RawConn:
        return cls(*await asyncio.open_unix_connection(socket_path))

    def send(self, sid: int, type_: int, body: bytes, flags: int = 0) -> None:
        self.writer.write(HEADER.pack(len(body), sid, type_, flags) + body)

    def request(self, sid: int, service: str, method: str, payload: bytes = b"", **kw) -> None:
        req = ttrpc_pb2.Request(service=service, method=method, payload=payload, **kw)
        self.send(sid, 1, req.SerializeToString())

    async def frame(self) -> tuple[int, int, int, bytes]:
        """(stream id, type, flags, body) of the next frame."""
        length, sid, type_, flags = HEADER.unpack(await self.reader.readexactly(10))
        return sid, type_, flags, await self.reader.readexactly(length)

    async def response(self) -> tuple[int, ttrpc_pb2.Response]:
        sid, type_, _, body = await self.frame()
        assert type_ == 2
        return sid, ttrpc_pb2.Response.FromString(body)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
