"""Client of the KBS admin API (what ``coco kbs-client config ...`` calls)."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from coco.errors import KbsError
from coco.protocol.client import KbsRequestError, _error_from, parse_resource_path, tls_verify
from coco.trustee.rvps import sample_message

__all__ = ["AdminClient"]


def _b64url(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


class AdminClient:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        verify: str | bool = True,
        timeout: float = 30.0,
    ):
        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(verify=tls_verify(verify), timeout=timeout, headers=headers)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def _call(self, method: str, path: str, what: str, **kw: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, f"{self.url}/kbs/v0/{path}", **kw)
        except httpx.HTTPError as e:
            raise KbsError(f"KBS {self.url}: {what}: {e}") from None
        if resp.status_code != 200:
            raise _error_from(resp, f"KBS {self.url}: {what}")
        return resp

    def set_resource(self, path: str, data: bytes) -> None:
        r, t, g = parse_resource_path(path)
        self._call("POST", f"resource/{r}/{t}/{g}", f"set resource {path}", content=data,
                   headers={"content-type": "application/octet-stream"})  # fmt: skip

    def delete_resource(self, path: str) -> None:
        r, t, g = parse_resource_path(path)
        self._call("DELETE", f"resource/{r}/{t}/{g}", f"delete resource {path}")

    def set_resource_policy(self, rego: str) -> None:
        self._call("POST", "resource-policy", "set resource policy",
                   json={"policy": _b64url(rego)})  # fmt: skip

    def set_attestation_policy(self, rego: str, policy_id: str = "default_cpu") -> None:
        body = {"type": "rego", "policy_id": policy_id, "policy": _b64url(rego)}
        self._call("POST", "attestation-policy", f"set attestation policy {policy_id}", json=body)

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
