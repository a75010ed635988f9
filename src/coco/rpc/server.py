"""An asyncio ttRPC server: services registered by name, one task per request, any stream pair.

Behaviour on the wire follows containerd's Go server, with ttrpc-rust's codegen answer for a
method a service declares but the implementation lacks:

- unknown service: UNIMPLEMENTED ``service <name>``; unknown method: UNIMPLEMENTED ``method <name>``;
- declared, not implemented: NOT_FOUND ``/<pkg.Service>/<Method> is not supported``;
- request envelope that does not parse: INVALID_ARGUMENT ``unmarshal request error: ...``;
  payload that does not parse as the method's request: INTERNAL
  ``ttrpc: error unmarshalling payload: ...``;
- even stream id: INVALID_ARGUMENT ``StreamID must be odd for client initiated streams``; a request
  id not above the last one: INVALID_ARGUMENT ``StreamID cannot be re-used and must increment``;
  a Data frame (no streaming method exists here): INVALID_ARGUMENT ``StreamID is no longer active``;
- a frame over 4 MiB is skipped and answered RESOURCE_EXHAUSTED ``message length N exceed maximum
  message size of 4194304``; so is a reply that would be over the limit;
- ``timeout_nano`` bounds the handler: DEADLINE_EXCEEDED ``context deadline exceeded``;
- a handler raising :class:`RpcError` answers its status; any other exception answers UNKNOWN with
  its text and is logged; unknown frame types are ignored;
- a stream that ends inside a frame closes that connection only;
- at most ``max_inflight`` calls run at once per connection; past that the server stops reading
  that connection until one finishes (back-pressure on the peer, nothing refused).

A successful reply carries no status field, like ttrpc-rust's (the agent, AA and CDH are Rust).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError, Message

from coco.rpc import address as addr
from coco.rpc import frames
from coco.rpc.frames import MessageType
from coco.rpc.protos import ttrpc_pb2
from coco.rpc.service import Service
from coco.rpc.status import Code, RpcError

log = logging.getLogger(__name__)

Handler = Callable[[Any, "CallContext"], Awaitable[Message] | Message]


@dataclass(frozen=True)
class CallContext:
    """What a handler knows about its call besides the request message."""

    service: str
    method: str
    metadata: Mapping[str, list[str]]
    timeout: float | None  # seconds, from the request's timeout_nano; None = no deadline
    peer: str = ""


@dataclass
class _Bound:
    request: type[Message]
    response: type[Message]
    handler: Handler | None  # None: declared but not implemented


class Server:
    """Register services, then :meth:`listen` on addresses or :meth:`serve_stream` a stream pair."""

    def __init__(self, *, max_inflight: int = 1024) -> None:
        self.max_inflight = max_inflight
        self._services: dict[str, dict[str, _Bound]] = {}
        self._listeners: list[tuple[addr.Address, asyncio.Server]] = []
        self._serial_tasks: set[asyncio.Task] = set()
        self._connections: set[_Connection] = set()
        self._socket_files: list[tuple[Path, int]] = []
        self._stopped = asyncio.Event()

    def register(self, service: Service, impl: object | Mapping[str, Handler | None]) -> None:
        """Bind ``impl`` to ``service``: a mapping method -> handler, or an object whose
        attributes named like the methods are the handlers. A method without a handler answers
        NOT_FOUND "... is not supported". Handlers take ``(request, ctx)`` and return (or return
        an awaitable of) the response message."""
        if service.name in self._services:
            raise ValueError(f"ttrpc service {service.name} is registered twice")
        table = {}
        for name, method in service.methods.items():
            handler = impl.get(name) if isinstance(impl, Mapping) else getattr(impl, name, None)
            table[name] = _Bound(method.request, method.response, handler)
        if isinstance(impl, Mapping):
            unknown = set(impl) - set(service.methods)
            if unknown:
                raise ValueError(f"{service.name} declares no method {sorted(unknown)}")
        self._services[service.name] = table

    # -- transports ------------------------------------------------------------------------------

    async def listen(self, address: str) -> str:
        """Start serving on ``address``; returns it with the port filled in when 0 was asked."""
        parsed = addr.parse(address)
        if parsed.scheme == "serial":
            stream = await self._open_serial(parsed)
            task = asyncio.create_task(self._serve_serial(parsed, stream))
            self._serial_tasks.add(task)
            task.add_done_callback(self._serial_tasks.discard)
            return str(parsed)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername")
            await self.serve_stream(reader, writer, peer=f"{parsed}" if not peer else str(peer))

        server = await addr.start_listener(parsed, handle)
        if parsed.scheme == "unix" and not parsed.path.startswith("@"):
            path = Path(parsed.path)
            self._socket_files.append((path, path.lstat().st_ino))
        self._listeners.append((parsed, server))
        bound = addr.bound_address(parsed, server)
        log.info("ttrpc: serving on %s", bound)
        return str(bound)

    @staticmethod
    async def _open_serial(address: addr.Address):
        try:
            return await addr.open_char_device(address.path)
        except OSError as e:
            raise addr.AddressError(f"cannot open {address}: {e.strerror or e}") from e

    async def _serve_serial(self, address: addr.Address, stream) -> None:
        """One connection over the device, opened again each time the peer goes away."""
        while True:
            await self.serve_stream(*stream, peer=str(address))
            if self._stopped.is_set():
                return
            await asyncio.sleep(0.1)
            try:
                stream = await self._open_serial(address)
            except addr.AddressError as e:
                log.error("ttrpc: %s; no longer serving it", e)
                return

    async def serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, peer: str = ""
    ) -> None:
        """Serve one connection until the peer closes it, it breaks, or the server stops."""
        conn = _Connection(self, reader, writer, peer)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    async def stop(self, grace: float = 5.0) -> None:
        """Close the listeners, let calls in flight finish for up to ``grace`` seconds, then
        cancel what is left and close every connection."""
        self._stopped.set()
        for _, server in self._listeners:
            server.close()
        for task in list(self._serial_tasks):
            task.cancel()
        conns = list(self._connections)
        for conn in conns:
            conn.stop_reading()
        inflight = [t for c in conns for t in c.tasks]
        if inflight:
            await asyncio.wait(inflight, timeout=grace)
        for conn in conns:
            conn.close()
        for _, server in self._listeners:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        for path, ino in self._socket_files:
            with contextlib.suppress(OSError):
                if path.lstat().st_ino == ino:
                    os.unlink(path)
        self._listeners.clear()
        self._socket_files.clear()

    async def serve_forever(self) -> None:
        """Wait until :meth:`stop` is called."""
        await self._stopped.wait()

    # -- dispatch --------------------------------------------------------------------------------

    async def _call(self, req: ttrpc_pb2.Request, peer: str) -> bytes:
        methods = self._services.get(req.service)
        if methods is None:
            raise RpcError(Code.UNIMPLEMENTED, f"service {req.service}")
        bound = methods.get(req.method)
        if bound is None:
            raise RpcError(Code.UNIMPLEMENTED, f"method {req.method}")
        if bound.handler is None:
            raise RpcError(Code.NOT_FOUND, f"/{req.service}/{req.method} is not supported")
        try:
            request = bound.request.FromString(req.payload)
        except DecodeError as e:
            raise RpcError(Code.INTERNAL, f"ttrpc: error unmarshalling payload: {e}") from None
        metadata: dict[str, list[str]] = {}
        for kv in req.metadata:
            metadata.setdefault(kv.key, []).append(kv.value)
        timeout = req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
        ctx = CallContext(req.service, req.method, metadata, timeout, peer)
        try:
            async with asyncio.timeout(timeout) as deadline:
                reply = bound.handler(request, ctx)
                if inspect.isawaitable(reply):
                    reply = await reply
        except TimeoutError:
            if deadline.expired():
                raise RpcError(Code.DEADLINE_EXCEEDED, "context deadline exceeded") from None
            raise
        if not isinstance(reply, bound.response):
            raise RpcError(
                Code.INTERNAL,
                f"ttrpc: error unsupported response type: {type(reply).__name__} "
                f"(/{req.service}/{req.method} answers {bound.response.__name__})",
            )
        return reply.SerializeToString()


class _Connection:
    def __init__(
        self,
        server: Server,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.tasks: set[asyncio.Task] = set()
        self._slots = asyncio.Semaphore(server.max_inflight)
        self._write_lock = asyncio.Lock()
        self._reading: asyncio.Task | None = None

    async def run(self) -> None:
        self._reading = asyncio.current_task()
        try:
            await self._read_loop()
        except asyncio.CancelledError:
            if not self.server._stopped.is_set():
                raise
        finally:
            if not self.server._stopped.is_set():
                self.close()

    def stop_reading(self) -> None:
        if self._reading is not None:
            self._reading.cancel()

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            self.writer.close()

    async def _read_loop(self) -> None:
        last_id = 0
        while True:
            try:
                frame = await frames.read_frame(self.reader)
            except asyncio.IncompleteReadError as e:
                log.warning(
                    "ttrpc %s: stream ended inside a frame (%d bytes missing); closing",
                    self.peer,
                    (e.expected or 0) - len(e.partial),
                )
                return
            except OSError as e:
                log.info("ttrpc %s: connection lost: %s", self.peer, e)
                return
            if frame is None:
                return
            if isinstance(frame, frames.OversizedFrame):
                log.warning(
                    "ttrpc %s: stream %d: %s",
                    self.peer,
                    frame.stream_id,
                    frames.oversize_message(frame.length),
                )
                self._answer_status(
                    frame.stream_id, Code.RESOURCE_EXHAUSTED, frames.oversize_message(frame.length)
                )
                continue
            sid = frame.stream_id
            if sid % 2 != 1:
                self._answer_status(
                    sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
                )
                continue
            if frame.type == MessageType.DATA:
                self._answer_status(sid, Code.INVALID_ARGUMENT, "StreamID is no longer active")
                continue
            if frame.type != MessageType.REQUEST:
                log.debug("ttrpc %s: ignoring a frame of type %d", self.peer, frame.type)
                continue
            if sid <= last_id:
                self._answer_status(
                    sid, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
                )
                continue
            last_id = sid
            try:
                req = ttrpc_pb2.Request.FromString(frame.body)
            except DecodeError as e:
                self._answer_status(sid, Code.INVALID_ARGUMENT, f"unmarshal request error: {e}")
                continue
            await self._slots.acquire()
            self._spawn(self._dispatch(sid, req)).add_done_callback(lambda _: self._slots.release())

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _answer_status(self, sid: int, code: int, message: str) -> None:
        resp = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=code, message=message))
        self._spawn(self._send(sid, resp))

    async def _dispatch(self, sid: int, req: ttrpc_pb2.Request) -> None:
        try:
            payload = await self.server._call(req, self.peer)
            resp = ttrpc_pb2.Response(payload=payload)
        except RpcError as e:
            resp = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=e.code, message=e.message))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("ttrpc %s: /%s/%s failed", self.peer, req.service, req.method)
            resp = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=Code.UNKNOWN, message=str(e)))
        await self._send(sid, resp)

    async def _send(self, sid: int, resp: ttrpc_pb2.Response) -> None:
        body = resp.SerializeToString()
        if len(body) > frames.MAX_MESSAGE:
            log.warning("ttrpc %s: stream %d: reply refused, %d bytes", self.peer, sid, len(body))
            body = ttrpc_pb2.Response(
                status=ttrpc_pb2.Status(
                    code=Code.RESOURCE_EXHAUSTED, message=frames.oversize_message(len(body))
                )
            ).SerializeToString()
        try:
            async with self._write_lock:
                self.writer.write(frames.encode(sid, MessageType.RESPONSE, body))
                await self.writer.drain()
        except (OSError, RuntimeError) as e:
            log.info("ttrpc %s: stream %d: reply not delivered: %s", self.peer, sid, e)
