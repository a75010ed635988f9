"""Client of the KBS admin API (what ``coco kbs-client config ...`` calls).

Resources and policies are :class:`coco.protocol.admin.AdminClient`'s (the guest's key provider
uses them too); the owner side adds the reference-value calls of the built-in RVPS.
"""

from __future__ import annotations

from typing import Any

from coco.protocol.admin import AdminClient as _ResourceAdminClient
from coco.protocol.client import KbsRequestError
from coco.trustee.rvps import sample_message

__all__ = ["AdminClient"]


class AdminClient(_ResourceAdminClient):
    def __enter__(self) -> AdminClient:
        return self

    def register_reference_values(self, values: dict[str, Any]) -> None:
        self._call("POST", "reference-value", "set reference value", json=sample_message(values))

    def get_reference_value(self, name: str) -> Any:
        resp = self._call("GET", f"reference-value/{name}", f"get reference value {name}")
        try:
            return resp.json()
        except ValueError:
            raise KbsRequestError(
                f"KBS {self.url}: reference value {name}: not JSON", 200
            ) from None
