"""KBS error answers: the upstream ``ErrorInformation`` body and status codes.

Every refusal is ``{"type": "https://github.com/confidential-containers/kbs/errors/<Variant>",
"detail": "..."}``; the status is 401 for everything but ``InvalidRequestPath`` and
``PluginNotFound`` (404), and our transport-level refusals (405, 413, 431).
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

    def __init__(self, variant: str, detail: str):
        assert variant in VARIANTS, variant
        super().__init__(detail)
        self.variant = variant
        self.detail = detail

    @property
    def status(self) -> int:
        return _STATUS.get(self.variant, 401)

    def body(self) -> bytes:
        body = {"type": ERROR_TYPE_PREFIX + self.variant, "detail": self.detail}
        return json.dumps(body, separators=(",", ":")).encode()
