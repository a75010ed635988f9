"""Azure TDX vTPM verifier: vTPM quote by the HCL's AK, HCL bound to an Intel-signed TD quote.

Evidence v0 ``{"tpm_quote": {hex}, "hcl_report": [2600 bytes], "td_quote": [bytes]}`` or v1
``{"version": 1, "tpm_quote": {hex}, "hcl_report": "<base64url>", "td_quote": "<base64url>"}``.
Checks: the vTPM quote (AK signature, nonce == expected report data, PCR digest, PCR8
init-data), the TD quote (signatures, QE binding, PCK chain to Intel's root), and that
SHA-256(HCL variable data) begins both the TDREPORT's and the TD quote's report data.
"""

from __future__ import annotations

from typing import Any

from coco.errors import AttestationError
from coco.tee._common import b64, byte_array, check_keys, load_object
from coco.tee.base import Claims, Verifier
from coco.tee.hcl import (
    REPORT_TYPE_TDX,
    TDREPORT_REPORT_DATA,
    HclReport,
    parse_vtpm_quote,
    verify_vtpm,
    vtpm_claims,
)
from coco.tee.tdx.pck import pck_info
from coco.tee.tdx.quote import Quote
from coco.tee.tdx.verifier import parse_claims, verify_quote


class AzTdxVtpmVerifier(Verifier):
    tee = "az-tdx-vtpm"

    def verify(
        self,
        evidence: bytes | dict[str, Any],
        expected_report_data: bytes | None = None,
        expected_init_data: bytes | None = None,
    ) -> Claims:
        where = "az-tdx-vtpm evidence"
        obj = load_object(evidence, where)
        if "version" in obj:
            check_keys(obj, ["version", "tpm_quote", "hcl_report", "td_quote"], [], where)
            version = obj["version"]
            if version != 1:
                raise AttestationError(f"{where}.version: expected 1, got {version!r}")
            hcl_raw = b64(obj["hcl_report"], f"{where}.hcl_report", urlsafe=True)
            td_raw = b64(obj["td_quote"], f"{where}.td_quote", urlsafe=True)
        else:
            check_keys(obj, ["tpm_quote", "hcl_report", "td_quote"], [], where)
            version = 0
            hcl_raw = byte_array(obj["hcl_report"], f"{where}.hcl_report")
            td_raw = byte_array(obj["td_quote"], f"{where}.td_quote")
        quote = parse_vtpm_quote(obj["tpm_quote"], f"{where}.tpm_quote", byte_arrays=version == 0)
        hcl = HclReport.parse(hcl_raw, f"{where}: HCL report")
        if hcl.report_type != REPORT_TYPE_TDX:
            raise AttestationError(
                f"{where}: HCL report_type: expected 4 (TDX), got {hcl.report_type}"
            )
        nonce = verify_vtpm(quote, hcl, version, expected_report_data, expected_init_data, where)
        td_quote = Quote.from_bytes(td_raw, f"{where}: td_quote")
        chain = verify_quote(td_quote, f"{where}: td_quote")
        tdreport_rd = hcl.hw_report[TDREPORT_REPORT_DATA : TDREPORT_REPORT_DATA + 64]
        hcl.check_var_data_binding(tdreport_rd, f"{where}: TDREPORT")
        hcl.check_var_data_binding(td_quote.body["report_data"], f"{where}: td_quote")
        claims = parse_claims(td_quote, pck_info(chain[0], chain[1], f"{where}: PCK leaf"), None)
        claims.update(vtpm_claims(quote, nonce))
        return Claims(tee="az-tdx-vtpm", claims=claims, tee_class="cpu")
