"""Task events back to containerd, as a 1.6 shim sends them: ttRPC
``containerd.services.events.ttrpc.v1.Events/Forward`` on ``$TTRPC_ADDRESS``.

Events leave in the order they were published (one sender), each with a non-zero timestamp and
an ``Any`` whose type_url is the bare message name (``containerd.events.TaskExit``); a failed send
is retried 5 times with growing delays, then logged and dropped. Without ``TTRPC_ADDRESS`` events
are only logged (as kata's shim does under CRI-O).
"""

from __future__ import annotations

import asyncio
import logging
import time

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from coco.errors import CocoError
from coco.rpc import Client, Stub
from coco.rpc.protos import containerd_events_pb2 as ev
from coco.rpc.protos import containerd_events_ttrpc_pb2
from coco.rpc.service import Service

log = logging.getLogger(__name__)

EVENTS = Service.from_proto(containerd_events_ttrpc_pb2, "Events")
TOPICS = {
    ev.TaskCreate: "/tasks/create",
    ev.TaskStart: "/tasks/start",
    ev.TaskExit: "/tasks/exit",
    ev.TaskDelete: "/tasks/delete",
    ev.TaskOOM: "/tasks/oom",
    ev.TaskExecAdded: "/tasks/exec-added",
    ev.TaskExecStarted: "/tasks/exec-started",
    ev.TaskPaused: "/tasks/paused",
    ev.TaskResumed: "/tasks/resumed",
}


def now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def pack(event: Message) -> any_pb2.Any:
    """An Any as containerd's typeurl reads it: no ``type.googleapis.com/`` prefix."""
    return any_pb2.Any(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString())


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        # containerd passes a bare socket path
        self.address = address if "://" in address or not address else f"unix://{address}"
        self.namespace = namespace
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._client: Client | None = None

    def publish(self, event: Message) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._send_all())
        self._queue.put_nowait(event)

    async def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to ``timeout`` s), then stop."""
        if self._task is not None:
            self._queue.put_nowait(None)
            try:
                async with asyncio.timeout(timeout):
                    await self._task
            except TimeoutError:
                self._task.cancel()
        if self._client is not None:
            await self._client.close()

    async def _send_all(self) -> None:
        while (event := await self._queue.get()) is not None:
            topic = TOPICS[type(event)]
            if not self.address:
                log.info("event %s (no TTRPC_ADDRESS): %s", topic, event)
                continue
            envelope = containerd_events_ttrpc_pb2.Envelope(
                timestamp=now(), namespace=self.namespace, topic=topic, event=pack(event)
            )
            request = containerd_events_ttrpc_pb2.ForwardRequest(envelope=envelope)
            for attempt in range(6):
                try:
                    if self._client is None:
                        self._client = await Client.connect(self.address, timeout=5)
                    await Stub(self._client, EVENTS, timeout=5).Forward(request)
                    break
                except CocoError as e:  # RpcError, or an address that does not parse
                    self._client = None
                    if attempt == 5:
                        log.error("event %s not delivered to %s: %s", topic, self.address, e)
                    else:
                        await asyncio.sleep(0.1 * 2**attempt)
