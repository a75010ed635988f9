"""Sample attester: evidence anyone can forge. Logs a warning whenever it is used."""

from __future__ import annotations

import base64
import logging
from typing import Any

from coco.tee.base import Attester

log = logging.getLogger(__name__)


class SampleAttester(Attester):
    tee = "sample"
    insecure = True

    def get_evidence(self, report_data: bytes) -> dict[str, Any]:
        log.warning("using the INSECURE sample attester: its evidence proves nothing")
        return {"svn": "1", "report_data": base64.b64encode(report_data).decode()}
