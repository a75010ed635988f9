"""Status codes and errors of ttRPC calls (the google.rpc codes that both Go and Rust ttRPC use).

A call either returns its reply or raises :class:`RpcError` carrying the status code and message
that the peer (or this side, for local failures) gave. Handlers raise ``RpcError`` to answer a
chosen status; any other exception reaches the caller as ``UNKNOWN`` with the exception's text.
"""

from __future__ import annotations

import enum

from coco.errors import CocoError


class Code(enum.IntEnum):
    """google.rpc.Code."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def code_name(code: int) -> str:
    """``NOT_FOUND`` for 5; the number itself for a code outside the enum."""
    try:
        return Code(code).name
    except ValueError:
        return str(code)


class RpcError(CocoError):
    """A ttRPC call that ended with a non-OK status, on either side of the wire.

    ``code`` is an int (a :class:`Code` when it is a known one), ``message`` the status message as
    sent on the wire; ``str()`` prefixes the code name for humans.
    """

    def __init__(self, code: int, message: str) -> None:
        self.code: int = Code(code) if code in Code._value2member_map_ else int(code)
        self.message = message
        super().__init__(f"{code_name(code)}: {message}")


class UnavailableError(RpcError):
    """The peer could not be reached, or the connection ended before the answer (UNAVAILABLE)."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.UNAVAILABLE, message)
