"""SEV-SNP verifier: the report's ECDSA P-384 signature, the VEK chain to AMD's root, the TCB.

Evidence is ``{"attestation_report": {...sev serde...}, "cert_chain": null | [{cert_type, data}]}``.
When the evidence carries no VCEK/VLEK, the verifier looks in an offline KDS store laid out as
upstream's (``<store>/vcek/<hwid>/<blXX_teeXX_snpXX_ucodeXX>_vcek.der`` or ``.../vcek.der``); it
never fetches from AMD's KDS.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from coco.errors import AttestationError
from coco.tee._common import (
    byte_array,
    check_keys,
    cn,
    expect_equal,
    fit,
    load_der_cert,
    load_object,
)
from coco.tee.base import Claims, Verifier
from coco.tee.snp.certs import amd_roots, check_tcb, check_vek_chain, vek_info
from coco.tee.snp.report import TURIN, AttestationReport

log = logging.getLogger(__name__)

DEFAULT_KDS_STORE = Path("/opt/confidential-containers/attestation-service/kds-store")
_CERT_TYPES = {"ARK", "ASK", "VCEK", "VLEK", "ASVK", "CRL"}


def verify_report_signature(report: AttestationReport, vek: x509.Certificate, where: str) -> None:
    """ECDSA P-384 / SHA-384 over the first 0x2A0 bytes; r and s are little-endian."""
    if report.sig_algo != 1:
        raise AttestationError(
            f"{where}: signature_algo: expected 1 (ECDSA P-384 with SHA-384), got {report.sig_algo}"
        )
    key = vek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise AttestationError(f"{where}: {cn(vek)} key: expected an EC P-384 key")
    r = int.from_bytes(report.signature_r, "little")
    s = int.from_bytes(report.signature_s, "little")
    try:
        key.verify(encode_dss_signature(r, s), report.signed_bytes(), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError(
            f"{where}: report signature does not verify with the {cn(vek)} key "
            "(report forged or altered)"
        ) from None


def snp_claims(report: AttestationReport, *, as_strings: bool = False) -> dict[str, Any]:
    """Claims shaped as upstream's ``parse_tee_evidence`` (``_az``: values formatted as strings)."""
    policy, plat = report.policy, report.plat_info
    tcb = report.tcbs["reported_tcb"]
    values: dict[str, Any] = {
        "policy_abi_major": (policy >> 8) & 0xFF,
        "policy_abi_minor": policy & 0xFF,
        "policy_smt_allowed": bool(policy >> 16 & 1),
        "policy_migrate_ma": bool(policy >> 18 & 1),
        "policy_debug_allowed": bool(policy >> 19 & 1),
        "policy_single_socket": bool(policy >> 20 & 1),
        "reported_tcb_bootloader": tcb.bootloader,
        "reported_tcb_tee": tcb.tee,
        "reported_tcb_snp": tcb.snp,
        "reported_tcb_microcode": tcb.microcode,
        "platform_tsme_enabled": bool(plat >> 1 & 1),
        "platform_smt_enabled": bool(plat & 1),
    }
    if as_strings:
        values = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in values.items()}
    return values


class SnpVerifier(Verifier):
    tee = "snp"

    def __init__(self, kds_store: Path | str | None = None) -> None:
        env = os.environ.get("COCO_SNP_KDS_STORE")
        self.kds_store = Path(kds_store or env or DEFAULT_KDS_STORE)

    def verify(
        self,
        evidence: bytes | dict[str, Any],
        expected_report_data: bytes | None = None,
        expected_init_data: bytes | None = None,
    ) -> Claims:
        where = "snp evidence"
        obj = load_object(evidence, where)
        check_keys(obj, ["attestation_report"], ["cert_chain"], where)
        rep_obj = obj["attestation_report"]
        if not isinstance(rep_obj, dict):
            raise AttestationError(f"{where}.attestation_report: expected a JSON object")
        report = AttestationReport.from_json(rep_obj, f"{where}.attestation_report")
        if not 3 <= report.version <= 5:
            raise AttestationError(
                f"{where}: report version: expected 3 to 5, got {report.version}"
            )
        gen = report.generation
        if gen is None:
            raise AttestationError(
                f"{where}: processor family 0x{report.cpuid_fam_id:x} model "
                f"0x{report.cpuid_mod_id:x}: expected Milan, Genoa or Turin"
            )
        roots = amd_roots(gen)
        chain = self._cert_chain(obj.get("cert_chain"), f"{where}.cert_chain")
        vek, kind = self._pick_vek(chain, report, gen, where)
        check_vek_chain(
            vek, kind, roots, f"{where}: {kind} chain", chain.get("ARK"), chain.get("ASK")
        )
        verify_report_signature(report, vek, where)
        check_tcb(report, vek_info(vek, f"{where}: {kind}"), where)
        if report.vmpl != 0:
            raise AttestationError(f"{where}: vmpl: expected 0, got {report.vmpl}")
        check_bindings(report, expected_report_data, expected_init_data, where)
        claims = snp_claims(report)
        claims.update(
            measurement=report.get("measurement").hex(),
            report_data=report.get("report_data").hex(),
            init_data=report.get("host_data").hex(),
            chip_id=report.get("chip_id").hex(),
        )
        return Claims(tee="snp", claims=claims, tee_class="cpu")

    @staticmethod
    def _cert_chain(value: Any, where: str) -> dict[str, x509.Certificate]:
        found: dict[str, x509.Certificate] = {}
        if value is None:
            return found
        if not isinstance(value, list):
            raise AttestationError(
                f"{where}: expected null or an array, got {type(value).__name__}"
            )
        for i, entry in enumerate(value):
            w = f"{where}[{i}]"
            if not isinstance(entry, dict):
                raise AttestationError(f"{w}: expected an object {{cert_type, data}}")
            check_keys(entry, ["cert_type", "data"], [], w)
            kind = entry["cert_type"]
            if isinstance(kind, dict) and list(kind) == ["OTHER"]:
                continue  # vendor-specific entries are not part of the chain
            if kind not in _CERT_TYPES:
                raise AttestationError(
                    f"{w}.cert_type: expected one of {', '.join(sorted(_CERT_TYPES))}, got {kind!r}"
                )
            if kind == "CRL":
                continue
            data = byte_array(entry["data"], f"{w}.data")
            found.setdefault(kind, load_der_cert(data, f"{w}.data"))
        return found

    def _pick_vek(
        self, chain: dict[str, x509.Certificate], report: AttestationReport, gen: str, where: str
    ) -> tuple[x509.Certificate, str]:
        wanted = report.signing_key
        if wanted not in ("VCEK", "VLEK"):
            raise AttestationError(
                f"{where}: key_info signing key: expected VCEK or VLEK, got {wanted}"
            )
        if wanted in chain:
            return chain[wanted], wanted
        other = "VLEK" if wanted == "VCEK" else "VCEK"
        if other in chain:
            raise AttestationError(
                f"{where}: the report is signed by its {wanted} but cert_chain holds a {other}"
            )
        if wanted == "VLEK":
            raise AttestationError(f"{where}: the report is signed by a VLEK, none in cert_chain")
        return self._offline_vcek(report, gen, where), "VCEK"

    def _offline_vcek(self, report: AttestationReport, gen: str, where: str) -> x509.Certificate:
        chip_id = report.get("chip_id")
        if not any(chip_id):
            raise AttestationError(
                f"{where}: no VCEK in cert_chain and chip_id is masked (all zero): cannot find one"
            )
        hwid = (chip_id[:8] if gen == TURIN else chip_id).hex()
        t = report.tcbs["reported_tcb"]
        name = f"bl{t.bootloader:02d}_tee{t.tee:02d}_snp{t.snp:02d}_ucode{t.microcode:02d}"
        if gen == TURIN:
            name += f"_fmc{(t.fmc or 0):02d}"
        folder = self.kds_store / "vcek" / hwid
        for path in (folder / f"{name}_vcek.der", folder / "vcek.der"):
            if path.is_file():
                return load_der_cert(path.read_bytes(), str(path))
        raise AttestationError(
            f"{where}: no VCEK in cert_chain and none in the offline KDS store {folder} "
            f"(looked for {name}_vcek.der and vcek.der); network fetch is not supported"
        )


def check_bindings(
    report: AttestationReport,
    expected_report_data: bytes | None,
    expected_init_data: bytes | None,
    where: str,
) -> None:
    if expected_report_data is not None:
        expect_equal(
            f"{where}: report_data", fit(expected_report_data, 64), report.get("report_data")
        )
    if expected_init_data is not None:
        expect_equal(
            f"{where}: init_data (HOST_DATA)", fit(expected_init_data, 32), report.get("host_data")
        )
