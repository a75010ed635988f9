"""The built-in Attestation Service: verifiers, the Rego attestation policy and EAR tokens."""

from coco.trustee.attestation.ear import TokenSigner, ear_status
from coco.trustee.attestation.service import AttestationService, VerificationRequest

__all__ = ["AttestationService", "TokenSigner", "VerificationRequest", "ear_status"]
