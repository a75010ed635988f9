"""Reference Value Provider Service: ``sample`` messages in, reference values out.

A message is ``{"version": "0.1.0", "type": "sample", "payload": base64(JSON object)}``; each entry
``name: value`` of the payload is stored as
``{"version": "0.1.0", "name": ..., "expiration": <now + 12 months>, "value": ...}`` in the
``reference_value`` namespace, where the attestation policy reads it with
``query_reference_value(name)``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from typing import Any

from coco.errors import KbsError
from coco.jsonio import loads as json_loads
from coco.trustee.storage import NS_REFERENCE_VALUE, Store
from coco.trustee.storage.base import check_key

__all__ = ["Rvps", "RvpsError", "sample_message"]

RVPS_VERSION = "0.1.0"


class RvpsError(KbsError):
    """A reference-value message or query that cannot be served."""


def sample_message(values: dict[str, Any]) -> dict[str, str]:
    """The RVPS message that registers ``values`` with the sample extractor."""
    payload = base64.b64encode(json.dumps(values).encode()).decode()
    return {"version": RVPS_VERSION, "type": "sample", "payload": payload}


class Rvps:
    def __init__(self, store: Store):
        self.store = store

    def register(self, message: bytes | str | dict[str, Any]) -> list[str]:
        """Store the reference values of one message; returns their names."""
        if isinstance(message, bytes | str):
            message = json_loads(message, what="RVPS message", error=RvpsError)
        if not isinstance(message, dict):
            raise RvpsError("RVPS message: expected a JSON object")
        unknown = set(message) - {"version", "type", "payload"}
        if unknown:
            raise RvpsError(f"RVPS message: unknown field(s) {', '.join(sorted(unknown))}")
        version = message.get("version", RVPS_VERSION)
        if version != RVPS_VERSION:
            raise RvpsError(f"RVPS message: version: expected {RVPS_VERSION}, found {version!r}")
        kind = message.get("type")
        if kind != "sample":
            raise RvpsError(
                f"RVPS message: type: expected 'sample' (swid and corim are not supported), found {kind!r}"
            )
        payload = message.get("payload")
        if not isinstance(payload, str):
            raise RvpsError("RVPS message: payload: expected a base64 string")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RvpsError(
                f"RVPS message: payload: expected base64 of a JSON object: {e}"
            ) from None
        values = json_loads(raw, what="RVPS message: payload", error=RvpsError)
        if not isinstance(values, dict):
            raise RvpsError("RVPS message: payload: expected a JSON object of name -> value")
        expiration = (dt.datetime.now(dt.UTC) + dt.timedelta(days=365)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        for name in values:
            try:
                check_key(name)
            except KbsError:
                raise RvpsError(
                    f"RVPS message: reference value name {name!r} is not a valid id"
                ) from None
        for name, value in values.items():
            record = {
                "version": RVPS_VERSION,
                "name": name,
                "expiration": expiration,
                "value": value,
            }
            self.store.put(NS_REFERENCE_VALUE, name, json.dumps(record).encode())
        return list(values)

    def query(self, name: str) -> Any | None:
        raw = self.store.get(NS_REFERENCE_VALUE, name)
        if raw is None:
            return None
        return json.loads(raw)["value"]

    def all_values(self) -> dict[str, Any]:
        return {k: json.loads(v)["value"] for k, v in self.store.items(NS_REFERENCE_VALUE).items()}
