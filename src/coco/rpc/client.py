"""An asyncio ttRPC client (and a synchronous wrapper for command-line use).

One connection carries many calls at once: each call gets the next odd stream id (1, 3, 5, ...)
and its answer is matched by id, in whatever order the server sends them. A call with a
``timeout`` sends it as ``timeout_nano`` and also stops waiting locally. When the connection
ends, every call still waiting fails at once with :class:`UnavailableError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from coco.rpc import address as addr
from coco.rpc import frames
from coco.rpc.frames import MessageType
from coco.rpc.protos import ttrpc_pb2
from coco.rpc.status import Code, RpcError, UnavailableError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
Metadata = Mapping[str, str | Iterable[str]]

DEFAULT_TIMEOUT = 50.0  # what upstream's clients of the AA, the CDH and keyproviders use
_MAX_STREAM_ID = 0xFFFFFFFF


def _metadata(metadata: Metadata | None) -> list[ttrpc_pb2.KeyValue]:
    out = []
    for key, values in (metadata or {}).items():
        for value in [values] if isinstance(values, str) else values:
            out.append(ttrpc_pb2.KeyValue(key=key, value=value))
    return out


class Client:
    """A connection to a ttRPC server; make one with :meth:`connect`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, address: str = ""
    ) -> None:
        self.address = address
        self._reader = reader
        self._writer = writer
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._write_lock = asyncio.Lock()
        self._closed: UnavailableError | None = None
        self._receiving = asyncio.create_task(self._receive())

    @classmethod
    async def connect(cls, address: str, *, timeout: float | None = 10.0) -> Client:
        """Dial ``address`` (see :mod:`coco.rpc.address`); UNAVAILABLE if nobody answers."""
        parsed = addr.parse(address)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await addr.open_connection(parsed)
        except TimeoutError:
            raise UnavailableError(
                f"cannot connect to {parsed}: no answer within {timeout} s"
            ) from None
        except OSError as e:
            raise UnavailableError(f"cannot connect to {parsed}: {e.strerror or e}") from e
        return cls(reader, writer, address=str(parsed))

    @property
    def closed(self) -> bool:
        """Whether the connection has ended (every further call fails with UNAVAILABLE)."""
        return self._closed is not None

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> M:
        """One unary call; the decoded reply, or :class:`RpcError` with the status."""
        path = f"/{service}/{method}"
        if self._closed is not None:
            raise UnavailableError(f"{path}: {self._closed.message}")
        envelope = ttrpc_pb2.Request(
            service=service,
            method=method,
            payload=request.SerializeToString(),
            timeout_nano=int(timeout * 1e9) if timeout else 0,
            metadata=_metadata(metadata),
        )
        body = envelope.SerializeToString()
        if len(body) > frames.MAX_MESSAGE:
            raise frames.OversizedMessageError(len(body))
        sid = self._next_id
        if sid > _MAX_STREAM_ID:
            raise UnavailableError(f"{path}: stream ids of this connection are used up")
        self._next_id += 2
        answer = asyncio.get_running_loop().create_future()
        self._pending[sid] = answer
        try:
            try:
                async with self._write_lock:
                    self._writer.write(frames.encode(sid, MessageType.REQUEST, body))
                    await self._writer.drain()
            except (OSError, RuntimeError) as e:
                raise UnavailableError(f"{path}: sending to {self.address}: {e}") from e
            try:
                async with asyncio.timeout(timeout):
                    resp = await answer
            except TimeoutError:
                raise RpcError(
                    Code.DEADLINE_EXCEEDED, f"{path}: no answer within {timeout} s"
                ) from None
        finally:
            self._pending.pop(sid, None)
        if resp.HasField("status") and resp.status.code != Code.OK:
            raise RpcError(resp.status.code, resp.status.message)
        try:
            return response_type.FromString(resp.payload)
        except DecodeError as e:
            raise RpcError(
                Code.INTERNAL, f"{path}: reply is not a {response_type.__name__}: {e}"
            ) from None

    async def _receive(self) -> None:
        reason = "closed by the server"
        try:
            while True:
                frame = await frames.read_frame(self._reader)
                if frame is None:
                    break
                answer = self._pending.get(frame.stream_id)
                if answer is None or answer.done():
                    log.debug(
                        "ttrpc %s: frame for unknown stream %d", self.address, frame.stream_id
                    )
                    continue
                if isinstance(frame, frames.OversizedFrame):
                    answer.set_exception(
                        RpcError(Code.RESOURCE_EXHAUSTED, frames.oversize_message(frame.length))
                    )
                    continue
                if frame.type != MessageType.RESPONSE:
                    continue
                try:
                    answer.set_result(ttrpc_pb2.Response.FromString(frame.body))
                except DecodeError as e:
                    answer.set_exception(RpcError(Code.INTERNAL, f"unmarshal response error: {e}"))
        except asyncio.IncompleteReadError:
            reason = "closed by the server inside a frame"
        except OSError as e:
            reason = f"lost: {e}"
        except asyncio.CancelledError:
            reason = "closed by the client"
        finally:
            self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        if self._closed is None:
            self._closed = UnavailableError(f"connection to {self.address} {reason}")
        for sid, answer in list(self._pending.items()):
            if not answer.done():
                answer.set_exception(UnavailableError(f"stream {sid}: {self._closed.message}"))
        with contextlib.suppress(Exception):
            self._writer.close()

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with UNAVAILABLE."""
        self._receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._receiving
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SyncClient:
    """A :class:`Client` on a private event loop, for code that is not async (the CLI).

    Not for use from inside a running event loop.
    """

    def __init__(self, address: str, *, connect_timeout: float | None = 10.0) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._client = self._loop.run_until_complete(
                Client.connect(address, timeout=connect_timeout)
            )
        except BaseException:
            self._loop.close()
            raise

    @property
    def address(self) -> str:
        return self._client.address

    def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> M:
        return self._loop.run_until_complete(
            self._client.call(
                service, method, request, response_type, timeout=timeout, metadata=metadata
            )
        )

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._client.close())
            self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
