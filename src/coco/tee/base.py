"""The contract every TEE package fulfils.

An :class:`Attester` produces evidence (the JSON the guest sends as ``tee-evidence``) bound to a
report-data digest; a :class:`Verifier` checks such evidence and returns :class:`Claims` shaped as
upstream's verifiers shape them. Report data is handed over as the raw digest the KBS computes
(48 bytes for SHA-384); each TEE fits it to its own field (zero-pad to 64 for SNP/TDX, truncate to
32 for TPM, exact for sample).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Claims:
    """What a verifier concluded: ``claims`` is the upstream-shaped JSON object (including
    ``report_data``/``init_data`` where the TEE has them); ``tee_class`` is ``cpu`` or ``gpu``."""

    tee: str
    claims: dict[str, Any]
    tee_class: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


class Verifier(ABC):
    """Checks evidence of one TEE. Raises :class:`coco.errors.AttestationError` with a reason."""

    tee: str = ""
    insecure: bool = False

    @abstractmethod
    def verify(
        self,
        evidence: bytes | dict[str, Any],
        expected_report_data: bytes | None = None,
        expected_init_data: bytes | None = None,
    ) -> Claims:
        """Verify ``evidence`` (the JSON the guest sent, raw or parsed)."""


class Attester(ABC):
    """Produces evidence of one TEE for the given report data."""

    tee: str = ""
    insecure: bool = False

    @abstractmethod
    def get_evidence(self, report_data: bytes) -> dict[str, Any]:
        """The evidence JSON object, to be sent as ``tee-evidence``."""
