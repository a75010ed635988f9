"""AMD's key hierarchy: the bundled ARK/ASK/ASVK roots and the checks on a VCEK or VLEK.

The roots for Milan, Genoa and Turin are AMD's public certificates, kept in ``data/`` in the
order ASK, ARK, ASVK. A versioned endorsement key (VCEK, chip-specific, or VLEK, cloud-provider
specific) chains ARK -> ASK -> VCEK or ARK -> ASVK -> VLEK, all RSASSA-PSS SHA-384.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from coco.errors import AttestationError
from coco.tee._common import check_signed_by, cn, load_pem_certs
from coco.tee.snp.report import TURIN, AttestationReport

_AMD_OID = "1.3.6.1.4.1.3704.1"
OID_PRODUCT_NAME = x509.ObjectIdentifier(f"{_AMD_OID}.2")
OID_BL_SPL = x509.ObjectIdentifier(f"{_AMD_OID}.3.1")
OID_TEE_SPL = x509.ObjectIdentifier(f"{_AMD_OID}.3.2")
OID_SNP_SPL = x509.ObjectIdentifier(f"{_AMD_OID}.3.3")
OID_UCODE_SPL = x509.ObjectIdentifier(f"{_AMD_OID}.3.8")
OID_FMC_SPL = x509.ObjectIdentifier(f"{_AMD_OID}.3.9")
OID_HWID = x509.ObjectIdentifier(f"{_AMD_OID}.4")


@dataclass(frozen=True)
class AmdRoots:
    """The trust anchors of one processor generation."""

    generation: str
    ark: x509.Certificate
    ask: x509.Certificate
    asvk: x509.Certificate


@functools.cache
def amd_roots(generation: str) -> AmdRoots:
    """The bundled roots of ``generation`` (checked: ARK self-signed, ARK -> ASK, ARK -> ASVK)."""
    name = f"{generation.lower()}_ask_ark_asvk.pem"
    where = f"bundled AMD roots {name}"
    try:
        data = resources.files("coco.tee.snp").joinpath("data", name).read_bytes()
    except FileNotFoundError:
        raise AttestationError(f"no bundled AMD roots for generation {generation!r}") from None
    certs = load_pem_certs(data, where)
    if len(certs) != 3:
        raise AttestationError(
            f"{where}: expected 3 certificates (ASK, ARK, ASVK), got {len(certs)}"
        )
    ask, ark, asvk = certs
    check_signed_by(ark, ark, where)
    check_signed_by(ask, ark, where)
    check_signed_by(asvk, ark, where)
    return AmdRoots(generation=generation, ark=ark, ask=ask, asvk=asvk)


def _der_int(raw: bytes, where: str) -> int:
    if len(raw) < 3 or raw[0] != 0x02 or raw[1] != len(raw) - 2 or raw[1] > 8:
        raise AttestationError(f"{where}: expected a small DER INTEGER, got {raw.hex()}")
    return int.from_bytes(raw[2:], "big", signed=True)


def _ext(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        value = cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    if isinstance(value, x509.UnrecognizedExtension):
        return value.value
    return None


@dataclass(frozen=True)
class VekInfo:
    """What a VCEK/VLEK certificate says about the platform it was issued for."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None
    hwid: bytes | None


def vek_info(cert: x509.Certificate, where: str) -> VekInfo:
    """The SPL extensions (DER INTEGERs) and hardware ID (raw bytes or a DER OCTET STRING)."""

    def spl(oid: x509.ObjectIdentifier, name: str, required: bool = True) -> int | None:
        raw = _ext(cert, oid)
        if raw is None:
            if required:
                raise AttestationError(
                    f"{where}: certificate has no {name} extension ({oid.dotted_string})"
                )
            return None
        return _der_int(raw, f"{where}: extension {name}")

    hwid = _ext(cert, OID_HWID)
    if hwid is not None and len(hwid) >= 2 and hwid[0] == 0x04 and hwid[1] == len(hwid) - 2:
        hwid = hwid[2:]  # DER OCTET STRING form
    return VekInfo(
        bootloader=spl(OID_BL_SPL, "blSPL"),  # type: ignore[arg-type]
        tee=spl(OID_TEE_SPL, "teeSPL"),  # type: ignore[arg-type]
        snp=spl(OID_SNP_SPL, "snpSPL"),  # type: ignore[arg-type]
        microcode=spl(OID_UCODE_SPL, "ucodeSPL"),  # type: ignore[arg-type]
        fmc=spl(OID_FMC_SPL, "fmcSPL", required=False),
        hwid=hwid,
    )


def check_vek_chain(
    vek: x509.Certificate,
    kind: str,
    roots: AmdRoots,
    where: str,
    ark: x509.Certificate | None = None,
    ask: x509.Certificate | None = None,
) -> None:
    """Check ARK -> ASK/ASVK -> VEK, where a supplied ARK must be AMD's own and a supplied ASK
    must be signed by it."""
    if ark is not None and ark.fingerprint(hashes.SHA256()) != roots.ark.fingerprint(
        hashes.SHA256()
    ):
        raise AttestationError(
            f"{where}: ARK {cn(ark)!r} in the evidence is not AMD's {cn(roots.ark)!r} root: "
            "certificate chain to an unknown root"
        )
    if kind == "VLEK":
        intermediate = roots.asvk
    else:
        intermediate = ask if ask is not None else roots.ask
        if ask is not None:
            check_signed_by(ask, roots.ark, where)
    check_signed_by(vek, intermediate, where)


def check_tcb(report: AttestationReport, info: VekInfo, where: str) -> None:
    """The VEK was issued for exactly the TCB the report claims (and the chip, for a VCEK)."""
    tcb = report.tcbs["reported_tcb"]
    for name in ("bootloader", "tee", "snp", "microcode"):
        cert_v, rep_v = getattr(info, name), getattr(tcb, name)
        if cert_v != rep_v:
            raise AttestationError(
                f"{where}: reported_tcb.{name} mismatch: the VEK certificate says {cert_v}, "
                f"the report says {rep_v}"
            )
    if report.generation == TURIN and info.fmc != tcb.fmc:
        raise AttestationError(
            f"{where}: reported_tcb.fmc mismatch: the VEK certificate says {info.fmc}, "
            f"the report says {tcb.fmc}"
        )
    chip_id = report.get("chip_id")
    if info.hwid is not None and any(chip_id):
        expected = chip_id[: len(info.hwid)] if len(info.hwid) in (8, 64) else chip_id
        if info.hwid != expected:
            raise AttestationError(
                f"{where}: chip_id mismatch: the VCEK certificate is for {info.hwid.hex()}, "
                f"the report says {chip_id.hex()}"
            )
