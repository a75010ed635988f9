"""KBS error answers: the upstream ``ErrorInformation`` body and status codes.

Every refusal is ``{"type": "https://github.com/confidential-containers/kbs/errors/<Variant>",
"detail": "..."}``; the status is 401 for everything but ``InvalidRequestPath`` and
``PluginNotFound`` (404), and our transport-level refusals (405, 413, 431). Ours too, where
upstream's 401 or 500 would mislead: a request the KBS cannot read (a body that is not readable
JSON, a resource name longer than the storage allows) is 400, and a server at its limit of
pending sessions answers 503.
"""

from __future__ import annotations

import json

from coco.errors import KbsError
from coco.protocol.kbs import ERROR_TYPE_PREFIX

VARIANTS = (
    "AdminAuthInitialization", "AdminAuthAccess", "AttestationError", "HTTPFailed", "HTTPSFailed",
    "InvalidRequestPath", "JweError", "PluginManagerInitialization", "PluginNotFound",
    "PluginInternalError", "PolicyDeny", "ParsePolicyError", "PolicyEngineError", "RvpsError",
    "SerdeError", "StorageBackendInitialization", "TokenNotFound", "TokenVerifierError",
    "PrometheusError", "MethodNotAllowed", "PayloadTooLarge", "RequestHeaderFieldsTooLarge",
)  # fmt: skip
_STATUS = {
    "InvalidRequestPath": 404,
    "PluginNotFound": 404,
    "MethodNotAllowed": 405,
    "PayloadTooLarge": 413,
    "RequestHeaderFieldsTooLarge": 431,
}


class KbsHttpError(KbsError):
    """A refusal to send back as ErrorInformation."""

    def __init__(self, variant: str, detail: str, status: int | None = None):
        assert variant in VARIANTS, variant
        super().__init__(detail)
        self.variant = variant
        self.detail = detail
        self.status = status or _STATUS.get(variant, 401)

    def body(self) -> bytes:
        body = {"type": ERROR_TYPE_PREFIX + self.variant, "detail": self.detail}
        return json.dumps(body, separators=(",", ":")).encode()
