"""The state of one RCAR session, as the KBS keeps it between ``/auth``, ``/attest`` and resources.

A session is :class:`Authed` (a challenge waits for its ``/attest``) or :class:`Attested` (a token
was issued). Stored as upstream's serde enum (``{"Authed": {...}}`` / ``{"Attested": {...}}``) so
replicas sharing a database read each other's sessions; :func:`load` turns the stored bytes back
into the typed state, and anything unreadable counts as no session.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from coco.errors import KbsError
from coco.jsonfields import Fields
from coco.jsonio import loads
from coco.protocol.kbs import Challenge

_FIELDS = Fields(KbsError)


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(ts)))


@dataclass(frozen=True)
class Authed:
    """After ``/auth``: only what ``/attest`` needs (never the request: its extra-params may be large)."""

    id: str
    tee: str
    challenge: Challenge
    timeout: str

    def dump(self) -> bytes:
        body = {"tee": self.tee, "challenge": self.challenge.to_json(), "id": self.id,
                "timeout": self.timeout}  # fmt: skip
        return json.dumps({"Authed": body}).encode()


@dataclass(frozen=True)
class Attested:
    """After a successful ``/attest``: the token that resource requests in this session carry."""

    id: str
    token: str
    timeout: str

    def dump(self) -> bytes:
        body = {"token": self.token, "id": self.id, "timeout": self.timeout}
        return json.dumps({"Attested": body}).encode()


Session = Authed | Attested


def load(raw: bytes | None) -> Session | None:
    """The typed state of stored bytes; ``None`` for no session or one this KBS cannot read."""
    if raw is None:
        return None
    try:
        doc = _FIELDS.object(loads(raw, what="session", error=KbsError), "session")
        if "Authed" in doc:
            a = _FIELDS.get(doc, "Authed", "session", dict)
            return Authed(
                _FIELDS.string(a, "id", "session.Authed"),
                _FIELDS.string(a, "tee", "session.Authed"),
                Challenge.from_json(_FIELDS.get(a, "challenge", "session.Authed", dict)),
                _FIELDS.string(a, "timeout", "session.Authed"),
            )
        a = _FIELDS.get(doc, "Attested", "session", dict)
        return Attested(
            _FIELDS.string(a, "id", "session.Attested"),
            _FIELDS.string(a, "token", "session.Attested"),
            _FIELDS.string(a, "timeout", "session.Attested"),
        )
    except KbsError:  # ProtocolError included
        return None
