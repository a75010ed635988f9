"""ttRPC framing: the 10-byte header, the 4 MiB limit, and reading/writing frames on asyncio streams.

Header (big-endian): u32 length of the body (header excluded), u32 stream id, u8 message type,
u8 flags. A body longer than :data:`MAX_MESSAGE` is refused by a sender before anything is
written, and skipped by a receiver, which then answers RESOURCE_EXHAUSTED on that stream as
containerd's Go implementation does (:class:`OversizedFrame`).
"""

from __future__ import annotations

import asyncio
import enum
import struct
from dataclasses import dataclass

from coco.rpc.status import Code, RpcError

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_MESSAGE = 4 << 20  # 4 MiB, both directions
_DISCARD_CHUNK = 64 << 10


class MessageType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flag(enum.IntFlag):
    REMOTE_CLOSED = 0x01
    REMOTE_OPEN = 0x02
    NO_DATA = 0x04


@dataclass(frozen=True)
class Frame:
    stream_id: int
    type: int  # a MessageType value, or an unknown type that receivers ignore
    flags: int
    body: bytes


def oversize_message(length: int) -> str:
    """Go's status text for a message over the limit (the same on both sides)."""
    return f"message length {length} exceed maximum message size of {MAX_MESSAGE}"


class OversizedMessageError(RpcError):
    """A message this side refused to send because it is over :data:`MAX_MESSAGE`."""

    def __init__(self, length: int) -> None:
        super().__init__(Code.RESOURCE_EXHAUSTED, oversize_message(length))
        self.length = length


@dataclass(frozen=True)
class OversizedFrame:
    """A frame whose body was over the limit and was skipped; answer it, then read on."""

    stream_id: int
    type: int
    length: int


def encode(stream_id: int, type_: int, body: bytes, flags: int = 0) -> bytes:
    """Header + body of one frame; raises :class:`OversizedMessageError` past the limit."""
    if len(body) > MAX_MESSAGE:
        raise OversizedMessageError(len(body))
    return HEADER.pack(len(body), stream_id, type_, flags) + body


def decode_header(header: bytes) -> tuple[int, int, int, int]:
    """``(length, stream_id, type, flags)`` of a 10-byte header."""
    if len(header) != HEADER_SIZE:
        raise ValueError(f"ttrpc frame header: expected {HEADER_SIZE} bytes, got {len(header)}")
    return HEADER.unpack(header)


async def read_frame(reader: asyncio.StreamReader) -> Frame | OversizedFrame | None:
    """The next frame, an :class:`OversizedFrame` marker, or None at a clean end of stream.

    A stream that ends inside a frame raises :class:`asyncio.IncompleteReadError`.
    """
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise
    length, stream_id, type_, flags = HEADER.unpack(header)
    if length > MAX_MESSAGE:
        remaining = length
        while remaining:
            chunk = await reader.read(min(remaining, _DISCARD_CHUNK))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(chunk)
        return OversizedFrame(stream_id, type_, length)
    body = await reader.readexactly(length) if length else b""
    return Frame(stream_id, type_, flags, body)
