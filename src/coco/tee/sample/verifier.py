"""Sample verifier: checks only that the report data matches. INSECURE, warns when used."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

from coco.errors import AttestationError
from coco.tee.base import Claims, Verifier

log = logging.getLogger(__name__)


class SampleVerifier(Verifier):
    tee = "sample"
    insecure = True

    def verify(
        self,
        evidence: bytes | dict[str, Any],
        expected_report_data: bytes | None = None,
        expected_init_data: bytes | None = None,
    ) -> Claims:
        log.warning("verifying INSECURE sample evidence: it carries no hardware signature")
        if isinstance(evidence, bytes | str):
            try:
                evidence = json.loads(evidence)
            except ValueError as e:
                raise AttestationError(f"sample evidence: expected a JSON object, got: {e}") from e
        if not isinstance(evidence, dict):
            raise AttestationError(
                f"sample evidence: expected a JSON object, got {type(evidence).__name__}"
            )
        svn = evidence.get("svn")
        if not isinstance(svn, str):
            raise AttestationError(f"sample evidence: expected string field 'svn', got {svn!r}")
        rd_b64 = evidence.get("report_data", "")
        if not isinstance(rd_b64, str):
            raise AttestationError("sample evidence: 'report_data' must be a base64 string")
        try:
            report_data = base64.b64decode(rd_b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise AttestationError(f"sample evidence: report_data is not base64: {e}") from e
        if expected_report_data is not None and report_data != expected_report_data:
            raise AttestationError(
                "sample evidence: report data mismatch: expected "
                f"{expected_report_data.hex()}, got {report_data.hex()}"
            )
        claims: dict[str, Any] = {
            "svn": svn,
            "report_data": rd_b64,
            "launch_digest": "abcde",
            "platform_version": {"major": 1, "minor": 4},
            "debug": False,
        }
        if expected_init_data is not None:
            claims["init_data"] = base64.b64encode(expected_init_data).decode()
        return Claims(tee="sample", claims=claims, tee_class="cpu")
