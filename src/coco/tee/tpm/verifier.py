"""Generic TPM 2.0 verifier: AK trust, quote signature, PCR digest, nonce and PCR8 bindings.

Evidence: ``{"ak_public": "<base64 DER SPKI>", "tpm_quote": {"signature": "<base64
TPMT_SIGNATURE>", "message": "<base64 TPMS_ATTEST>", "pcrs": ["<hex sha256>" x 24]}}``.

The AK must be one of the trusted keys: PEM public keys (``*.pub``) in ``trusted_ak_keys_dir``
(constructor argument, else ``$COCO_TPM_TRUSTED_AK_KEYS_DIR``, else ``/etc/tpm/trusted_ak_keys``),
as upstream requires; a verifier with no trusted AK refuses every quote.
The nonce (``extraData``) must be the expected report data fitted to its length: truncated to
32 bytes (our attester and the spec) or zero-padded to 64 (upstream's newer attester).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from coco.errors import AttestationError
from coco.tee._common import b64, check_keys, fit, get_object, load_object, unhex
from coco.tee.base import Claims, Verifier
from coco.tee.tpm.quote import INITDATA_PCR, Attest, Signature, check_init_data, check_pcr_digest

DEFAULT_TRUSTED_AK_KEYS_DIR = Path("/etc/tpm/trusted_ak_keys")
MAX_TRUSTED_AK_KEYS = 100


def parse_pcrs(value: Any, where: str) -> list[bytes]:
    if not isinstance(value, list) or len(value) != 24:
        n = len(value) if isinstance(value, list) else type(value).__name__
        raise AttestationError(f"{where}: expected 24 SHA-256 PCR values, got {n}")
    return [unhex(v, f"{where}[{i}]", 32) for i, v in enumerate(value)]


def check_nonce(attest: Attest, expected: bytes | None, where: str) -> None:
    if expected is None:
        return
    nonce = attest.extra_data
    if len(nonce) not in (32, 64):
        raise AttestationError(
            f"{where}: qualifying data (extraData): expected 32 or 64 bytes, got {len(nonce)}"
        )
    want = fit(expected, len(nonce))
    if nonce != want:
        raise AttestationError(
            f"{where}: report_data mismatch: expected nonce {want.hex()}, got {nonce.hex()}"
        )


def load_trusted_aks(folder: Path, limit: int = MAX_TRUSTED_AK_KEYS) -> set[bytes]:
    """SHA-256 of the DER SubjectPublicKeyInfo of every ``*.pub`` PEM key in ``folder``."""
    hashes: set[bytes] = set()
    if not folder.is_dir():
        return hashes
    for path in sorted(folder.glob("*.pub"))[:limit]:
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except ValueError as e:
            raise AttestationError(f"trusted AK {path}: expected a PEM public key: {e}") from e
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        hashes.add(hashlib.sha256(der).digest())
    return hashes


def pcr_claims(pcrs: list[bytes]) -> dict[str, str]:
    return {f"pcr{i:02d}": p.hex() for i, p in enumerate(pcrs)}


class TpmVerifier(Verifier):
    tee = "tpm"

    def __init__(self, trusted_ak_keys_dir: Path | str | None = None) -> None:
        env = os.environ.get("COCO_TPM_TRUSTED_AK_KEYS_DIR")
        self.trusted_ak_keys_dir = Path(trusted_ak_keys_dir or env or DEFAULT_TRUSTED_AK_KEYS_DIR)

    def verify(
        self,
        evidence: bytes | dict[str, Any],
        expected_report_data: bytes | None = None,
        expected_init_data: bytes | None = None,
    ) -> Claims:
        where = "tpm evidence"
        obj = load_object(evidence, where)
        check_keys(obj, ["ak_public", "tpm_quote"], [], where)
        ak_der = b64(obj["ak_public"], f"{where}.ak_public")
        quote = get_object(obj, "tpm_quote", where)
        qw = f"{where}.tpm_quote"
        check_keys(quote, ["signature", "message", "pcrs"], [], qw)
        signature = Signature.parse(b64(quote["signature"], f"{qw}.signature"), f"{qw}.signature")
        message = b64(quote["message"], f"{qw}.message")
        pcrs = parse_pcrs(quote["pcrs"], f"{qw}.pcrs")
        try:
            ak = serialization.load_der_public_key(ak_der)
        except ValueError as e:
            raise AttestationError(
                f"{where}.ak_public: expected a DER SubjectPublicKeyInfo: {e}"
            ) from e
        ak_hash = hashlib.sha256(ak_der).digest()
        if ak_hash not in load_trusted_aks(self.trusted_ak_keys_dir):
            raise AttestationError(
                f"{where}: the AK (sha256 {ak_hash.hex()}) is not one of the trusted AK keys in "
                f"{self.trusted_ak_keys_dir} (*.pub)"
            )
        signature.verify(ak, message, where)
        attest = Attest.parse(message, qw)
        check_pcr_digest(attest, pcrs, where)
        check_nonce(attest, expected_report_data, where)
        check_init_data(pcrs, expected_init_data, where)
        claims: dict[str, Any] = {
            "ak_public": obj["ak_public"],
            **pcr_claims(pcrs),
            "init_data": pcrs[INITDATA_PCR].hex(),
            "report_data": attest.extra_data.hex(),
        }
        return Claims(tee="tpm", claims=claims, tee_class="cpu")
