"""Errors of the agent. Each carries the ttRPC status code upstream's agent answers with."""

from __future__ import annotations

from coco.errors import CocoError
from coco.rpc.status import Code


class AgentError(CocoError):
    """A request the agent could not carry out; ``code`` is the status it answers (INTERNAL by
    default, as upstream's agent answers most failures)."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str, code: Code | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class StorageError(AgentError):
    """A storage that could not be mounted (bad options, wrong root hash, refused pull)."""
