"""Azure SNP vTPM verifier: vTPM quote by the HCL's AK, HCL bound to an AMD-signed SNP report.

Evidence v0 ``{"quote": {byte arrays}, "report": [2600 bytes], "vcek": "<PEM>"}`` or v1/v2
``{"version": 1|2, "tpm_quote": {hex}, "hcl_report": "<base64url>", "vcek": "<base64url DER>"}``.
Checks: AK signature over the TPM quote, nonce == expected report data (exact), PCR digest,
SHA-256(HCL variable data) == SNP report_data[:32], (v2) HCL user-data starts with the expected
report data, the VCEK's chain to AMD's root, the SNP signature and TCB, VMPL 0, PCR8 init-data.
"""

from __future__ import annotations

import base64
from typing import Any

from cryptography import x509

from coco.errors import AttestationError
from coco.tee._common import (
    b64,
    byte_array,
    check_keys,
    cn,
    load_der_cert,
    load_object,
    load_pem_certs,
)
from coco.tee.base import Claims, Verifier
from coco.tee.hcl import (
    REPORT_TYPE_SNP,
    HclReport,
    parse_vtpm_quote,
    verify_vtpm,
    vtpm_claims,
)
from coco.tee.snp.certs import amd_roots, check_tcb, check_vek_chain, vek_info
from coco.tee.snp.report import AttestationReport
from coco.tee.snp.verifier import snp_claims, verify_report_signature


def parse_evidence(
    evidence: bytes | dict[str, Any], where: str
) -> tuple[int, Any, bytes, x509.Certificate]:
    obj = load_object(evidence, where)
    if "version" in obj:
        check_keys(obj, ["version", "tpm_quote", "hcl_report", "vcek"], [], where)
        version = obj["version"]
        if version not in (1, 2):
            raise AttestationError(f"{where}.version: expected 1 or 2, got {version!r}")
        quote = parse_vtpm_quote(obj["tpm_quote"], f"{where}.tpm_quote", byte_arrays=False)
        hcl = b64(obj["hcl_report"], f"{where}.hcl_report", urlsafe=True)
        vcek = load_der_cert(b64(obj["vcek"], f"{where}.vcek", urlsafe=True), f"{where}.vcek")
        return version, quote, hcl, vcek
    check_keys(obj, ["quote", "report", "vcek"], [], where)
    quote = parse_vtpm_quote(obj["quote"], f"{where}.quote", byte_arrays=True)
    hcl = byte_array(obj["report"], f"{where}.report")
    if not isinstance(obj["vcek"], str):
        raise AttestationError(f"{where}.vcek: expected a PEM string")
    certs = load_pem_certs(obj["vcek"].encode(), f"{where}.vcek")
    if len(certs) != 1:
        raise AttestationError(f"{where}.vcek: expected one certificate, got {len(certs)}")
    return 0, quote, hcl, certs[0]


def generation_of(report: AttestationReport, vcek: x509.Certificate, where: str) -> str:
    issuer = vcek.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    by_issuer = str(issuer[0].value).removeprefix("SEV-") if issuer else ""
    gen = report.generation or by_issuer
    if gen not in ("Milan", "Genoa", "Turin"):
        raise AttestationError(f"{where}: cannot tell the processor generation of the SNP report")
    return gen


class AzSnpVtpmVerifier(Verifier):
    tee = "az-snp-vtpm"

    def verify(
        self,
        evidence: bytes | dict[str, Any],
        expected_report_data: bytes | None = None,
        expected_init_data: bytes | None = None,
    ) -> Claims:
        where = "az-snp-vtpm evidence"
        version, quote, hcl_raw, vcek = parse_evidence(evidence, where)
        hcl = HclReport.parse(hcl_raw, f"{where}: HCL report")
        if hcl.report_type != REPORT_TYPE_SNP:
            raise AttestationError(
                f"{where}: HCL report_type: expected 2 (SNP), got {hcl.report_type}"
            )
        nonce = verify_vtpm(quote, hcl, version, expected_report_data, expected_init_data, where)
        report = AttestationReport.from_bytes(hcl.hw_report, f"{where}: SNP report")
        hcl.check_var_data_binding(report.get("report_data"), where)
        gen = generation_of(report, vcek, where)
        check_vek_chain(vcek, "VCEK", amd_roots(gen), f"{where}: VCEK {cn(vcek)!r} chain")
        verify_report_signature(report, vcek, f"{where}: SNP report")
        check_tcb(report, vek_info(vcek, f"{where}: VCEK"), f"{where}: SNP report")
        if report.vmpl != 0:
            raise AttestationError(f"{where}: SNP report vmpl: expected 0, got {report.vmpl}")
        claims = snp_claims(report, as_strings=True)
        claims.update(
            measurement=base64.b64encode(report.get("measurement")).decode(),
            report_data=base64.b64encode(report.get("report_data")).decode(),
            init_data=base64.b64encode(report.get("host_data")).decode(),
        )
        claims.update(vtpm_claims(quote, nonce))
        return Claims(tee="az-snp-vtpm", claims=claims, tee_class="cpu")
