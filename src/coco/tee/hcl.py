"""The Azure HCL (paravisor) attestation report shared by ``az-snp-vtpm`` and ``az-tdx-vtpm``.

Layout (2600 bytes, little-endian): a 32-byte header starting ``HCLA``; the hardware report at
0x20 (an SNP report, or a TDX TDREPORT); the IGVM request data at 0x4C0 (``data_size, version,
report_type (2 SNP, 4 TDX), report_data_hash_type (1 SHA-256), variable_data_size``) and the
variable data at 0x4D4: a JSON document with the vTPM's attestation key (``HCLAkPub``) and, from
evidence version 2, the ``user-data``. The hardware report's report data begins with
SHA-256(variable data), which binds the AK to the hardware-signed report.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from coco.errors import AttestationError
from coco.tee._common import byte_array, check_keys, unhex
from coco.tee.tpm.quote import (
    INITDATA_PCR,
    Attest,
    check_init_data,
    check_pcr_digest,
    verify_rsassa_sha256,
)

HCL_SIZE = 2600
HW_REPORT_OFFSET = 0x20
HW_REPORT_SIZE = 0x4A0
IGVM_OFFSET = 0x4C0
VAR_DATA_OFFSET = 0x4D4
REPORT_TYPE_SNP = 2
REPORT_TYPE_TDX = 4
TDREPORT_SIZE = 1024
TDREPORT_REPORT_DATA = 128


@dataclass(frozen=True)
class HclReport:
    raw: bytes = field(repr=False)
    report_type: int
    hash_type: int
    var_data: bytes = field(repr=False)

    @property
    def hw_report(self) -> bytes:
        size = HW_REPORT_SIZE if self.report_type == REPORT_TYPE_SNP else TDREPORT_SIZE
        return self.raw[HW_REPORT_OFFSET : HW_REPORT_OFFSET + size]

    @classmethod
    def parse(cls, raw: bytes, where: str = "HCL report") -> HclReport:
        if len(raw) != HCL_SIZE:
            raise AttestationError(f"{where}: expected {HCL_SIZE} bytes, got {len(raw)}")
        if raw[:4] != b"HCLA":
            raise AttestationError(f"{where}: expected the 'HCLA' signature, got {raw[:4]!r}")
        _size, _version, report_type, hash_type, var_size = struct.unpack_from(
            "<IIIII", raw, IGVM_OFFSET
        )
        if report_type not in (REPORT_TYPE_SNP, REPORT_TYPE_TDX):
            raise AttestationError(
                f"{where}: report_type: expected 2 (SNP) or 4 (TDX), got {report_type}"
            )
        if hash_type != 1:
            raise AttestationError(
                f"{where}: report_data_hash_type: expected 1 (SHA-256), got {hash_type}"
            )
        if VAR_DATA_OFFSET + var_size > HCL_SIZE:
            raise AttestationError(
                f"{where}: variable_data_size {var_size} runs past the end of the report"
            )
        var_data = raw[VAR_DATA_OFFSET : VAR_DATA_OFFSET + var_size]
        return cls(raw=bytes(raw), report_type=report_type, hash_type=hash_type, var_data=var_data)

    def check_var_data_binding(self, hw_report_data: bytes, where: str) -> None:
        digest = hashlib.sha256(self.var_data).digest()
        if hw_report_data[:32] != digest:
            raise AttestationError(
                f"{where}: HCL variable data digest mismatch: SHA-256(var data) is "
                f"{digest.hex()}, the hardware report data begins {hw_report_data[:32].hex()}"
            )

    def var_json(self, where: str) -> dict[str, Any]:
        try:
            doc = json.loads(self.var_data)
        except (ValueError, UnicodeDecodeError) as e:
            raise AttestationError(f"{where}: HCL variable data is not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise AttestationError(f"{where}: HCL variable data: expected a JSON object")
        return doc

    def ak_public(self, where: str) -> rsa.RSAPublicKey:
        """The vTPM attestation key ``HCLAkPub`` (an RSA JWK in the variable data)."""
        keys = self.var_json(where).get("keys")
        if not isinstance(keys, list):
            raise AttestationError(f"{where}: HCL variable data has no 'keys' array: no AKpub")
        for key in keys:
            if isinstance(key, dict) and key.get("kid") == "HCLAkPub":
                if key.get("kty") != "RSA":
                    raise AttestationError(
                        f"{where}: HCLAkPub: expected kty RSA, got {key.get('kty')!r}"
                    )
                try:
                    n = int.from_bytes(_b64url(key["n"]), "big")
                    e = int.from_bytes(_b64url(key["e"]), "big")
                    return rsa.RSAPublicNumbers(e, n).public_key()
                except (KeyError, TypeError, ValueError, binascii.Error) as err:
                    raise AttestationError(
                        f"{where}: HCLAkPub is not a usable RSA key: {err}"
                    ) from err
        raise AttestationError(f"{where}: HCL variable data has no HCLAkPub key: no AKpub")

    def user_data(self, where: str) -> bytes:
        value = self.var_json(where).get("user-data")
        if not isinstance(value, str):
            raise AttestationError(f"{where}: HCL variable data has no 'user-data' string")
        try:
            return bytes.fromhex(value)
        except ValueError as e:
            raise AttestationError(f"{where}: HCL user-data is not hex: {e}") from e


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- the vTPM part of Azure evidence -------------------------------------------------------------


@dataclass(frozen=True)
class VtpmQuote:
    signature: bytes
    message: bytes
    pcrs: list[bytes]


def parse_vtpm_quote(obj: Any, where: str, *, byte_arrays: bool) -> VtpmQuote:
    """``{signature, message, pcrs}`` as hex strings (v1+) or as byte arrays (legacy v0)."""
    if not isinstance(obj, dict):
        raise AttestationError(f"{where}: expected a JSON object")
    check_keys(obj, ["signature", "message", "pcrs"], [], where)
    read = (lambda v, w, n=None: byte_array(v, w, n)) if byte_arrays else unhex
    pcrs = obj["pcrs"]
    if not isinstance(pcrs, list) or len(pcrs) != 24:
        raise AttestationError(f"{where}.pcrs: expected 24 PCR values")
    return VtpmQuote(
        signature=read(obj["signature"], f"{where}.signature"),
        message=read(obj["message"], f"{where}.message"),
        pcrs=[read(p, f"{where}.pcrs[{i}]", 32) for i, p in enumerate(pcrs)],
    )


def verify_vtpm(
    quote: VtpmQuote,
    hcl: HclReport,
    version: int,
    expected_report_data: bytes | None,
    expected_init_data: bytes | None,
    where: str,
) -> bytes:
    """The vTPM quote checks common to both Azure verifiers; returns the quote's nonce."""
    ak = hcl.ak_public(where)
    verify_rsassa_sha256(ak, quote.signature, quote.message, where)
    attest = Attest.parse(quote.message, f"{where}: tpm quote")
    if expected_report_data is not None and attest.extra_data != expected_report_data:
        raise AttestationError(
            f"{where}: report_data mismatch: expected TPM quote nonce "
            f"{expected_report_data.hex()}, got {attest.extra_data.hex()}"
        )
    check_pcr_digest(attest, quote.pcrs, where)
    if version >= 2 and expected_report_data is not None:
        user_data = hcl.user_data(where)
        if not user_data.startswith(expected_report_data):
            raise AttestationError(
                f"{where}: HCL user-data mismatch: expected it to start with "
                f"{expected_report_data.hex()}, got {user_data.hex()}"
            )
    check_init_data(quote.pcrs, expected_init_data, where)
    return attest.extra_data


def vtpm_claims(quote: VtpmQuote, nonce: bytes) -> dict[str, Any]:
    return {
        "tpm": {f"pcr{i:02d}": p.hex() for i, p in enumerate(quote.pcrs)},
        "init_data": quote.pcrs[INITDATA_PCR].hex(),
        "report_data": nonce.hex(),
    }
