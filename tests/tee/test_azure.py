"""Azure vTPM verifiers (az-snp-vtpm, az-tdx-vtpm) on upstream's evidence and corrupted copies."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from coco.errors import AttestationError
from coco.tee import get_verifier
from coco.tee._common import load_pem_certs
from coco.tee.hcl import HclReport
from coco.tee.tpm.quote import init_data_pcr
from tests.tee.vectors import flip, load_json, vector

CHALLENGE = b"challenge"
V2_RD = bytes.fromhex(
    "982f5c6e45df0ed3f10b6f60b02f0c8390e281300f3805e2279c16168cd6ae9a"
    "a398f647caa2338748cd0fd9f5f819ef"
)
GENOA_RD = bytes.fromhex(
    "0218488bae25d2509232bf676f1a66a30d7372add909109b36016ef136f2938c"
    "a05475f8b46094de6b64270ea35d950f"
)
SNP_CASES = [
    (
        "evidence-v0.json",
        CHALLENGE,
        "e15c44796beabf46abcec7c57e590942041e47497e4ec27571c8b7664f48dced",
    ),
    (
        "evidence-v1.json",
        CHALLENGE,
        "e15c44796beabf46abcec7c57e590942041e47497e4ec27571c8b7664f48dced",
    ),
    ("evidence-v2.json", V2_RD, "84275b2f4312cd4fc6cbe6b152ad3c3683e513d9f1e23c34fca160c8cca7a6a7"),
    (
        "evidence-genoa.json",
        GENOA_RD,
        "afd689d0bb1c5f36f023fbaf574135f555a28a10c1f6b938d2a25e70c7783338",
    ),
]
TDX_PCR00 = "782b20b10f55cc46e2142cc2145d548698073e5beb82752c8d7f9279f0d8a273"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def snp(ev: Any, rd: bytes | None = CHALLENGE, **kw: Any):
    return get_verifier("az-snp-vtpm").verify(
        ev if isinstance(ev, bytes) else json.dumps(ev).encode(), rd, **kw
    )


def tdx(ev: Any, rd: bytes | None = CHALLENGE, **kw: Any):
    return get_verifier("az-tdx-vtpm").verify(
        ev if isinstance(ev, bytes) else json.dumps(ev).encode(), rd, **kw
    )


def unit_evidence() -> dict[str, Any]:
    """hcl-report.bin + tpm-quote-v1.json + vcek.pem (upstream's unit artefacts) as v1 evidence."""
    vcek = load_pem_certs(vector("az-snp-vtpm/vcek.pem").read_bytes(), "vcek")[0]
    return {
        "version": 1,
        "tpm_quote": load_json("az-snp-vtpm/tpm-quote-v1.json"),
        "hcl_report": b64url(vector("az-snp-vtpm/hcl-report.bin").read_bytes()),
        "vcek": b64url(vcek.public_bytes(serialization.Encoding.DER)),
    }


# -- az-snp-vtpm --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "rd", "pcr00"), SNP_CASES)
def test_az_snp_vectors_verify_with_upstream_claims(name: str, rd: bytes, pcr00: str) -> None:
    claims = snp(vector(f"az-snp-vtpm/{name}").read_bytes(), rd).claims
    assert claims["report_data"] == rd.hex()
    assert claims["tpm"]["pcr00"] == pcr00
    assert claims["init_data"] == claims["tpm"]["pcr08"]
    assert claims["policy_debug_allowed"] == "false"  # az claims are strings, as upstream's
    assert (
        base64.b64decode(claims["measurement"])
        and len(base64.b64decode(claims["measurement"])) == 48
    )


def test_az_snp_unit_artefacts_verify() -> None:
    claims = snp(unit_evidence()).claims
    assert claims["report_data"] == CHALLENGE.hex()


@pytest.mark.parametrize(("name", "rd", "pcr00"), SNP_CASES[:2])
def test_az_snp_wrong_nonce_is_refused(name: str, rd: bytes, pcr00: str) -> None:
    with pytest.raises(
        AttestationError, match="report_data mismatch: expected TPM quote nonce 6368616c6c656e6766"
    ):
        snp(vector(f"az-snp-vtpm/{name}").read_bytes(), b"challengf")


def test_az_snp_v2_user_data_carries_the_report_data() -> None:
    ev = load_json("az-snp-vtpm/evidence-v2.json")
    hcl = HclReport.parse(unb64url(ev["hcl_report"]))
    assert hcl.user_data("w").startswith(V2_RD)
    assert not hcl.user_data("w").startswith(bytes.fromhex("123abc"))


@pytest.mark.parametrize(
    ("offset", "message"),
    [
        (0x6E0, "HCL variable data digest mismatch"),  # variable data
        (0x540, "TPM quote signature does not verify with the AK"),  # the AK modulus
        (0x1A6, "SNP report: report signature does not verify"),  # SNP reported_tcb
        (0x20 + 0x90, "SNP report: report signature does not verify"),  # SNP measurement
        (0x20 + 0x2A0 + 4, "SNP report: report signature does not verify"),  # SNP signature r
    ],
)
def test_az_snp_flipped_hcl_bits_are_refused(offset: int, message: str) -> None:
    ev = unit_evidence()
    ev["hcl_report"] = b64url(flip(unb64url(ev["hcl_report"]), offset))
    with pytest.raises(AttestationError, match=message):
        snp(ev)


def test_az_snp_corrupted_tpm_quote_is_refused() -> None:
    ev = unit_evidence()
    msg = bytes.fromhex(ev["tpm_quote"]["message"])
    bad = copy.deepcopy(ev)
    bad["tpm_quote"]["message"] = flip(msg, 40).hex()
    with pytest.raises(AttestationError, match="TPM quote signature does not verify"):
        snp(bad)
    bad = copy.deepcopy(ev)
    bad["tpm_quote"]["signature"] = flip(bytes.fromhex(ev["tpm_quote"]["signature"]), 7).hex()
    with pytest.raises(AttestationError, match="TPM quote signature does not verify"):
        snp(bad)
    bad = copy.deepcopy(ev)
    bad["tpm_quote"]["pcrs"][3] = "11" * 32
    with pytest.raises(AttestationError, match="PCR digest mismatch"):
        snp(bad)
    bad = copy.deepcopy(ev)
    bad["tpm_quote"]["pcrs"] = bad["tpm_quote"]["pcrs"][:23]
    with pytest.raises(AttestationError, match="expected 24 PCR values"):
        snp(bad)


def test_az_snp_truncated_hcl_report_is_refused() -> None:
    ev = unit_evidence()
    ev["hcl_report"] = b64url(unb64url(ev["hcl_report"])[:2000])
    with pytest.raises(AttestationError, match="HCL report: expected 2600 bytes, got 2000"):
        snp(ev)


def test_az_snp_vcek_of_another_chip_is_refused() -> None:
    ev = unit_evidence()
    genoa = load_pem_certs(vector("az-snp-vtpm/vcek-genoa.pem").read_bytes(), "vcek")[0]
    ev["vcek"] = b64url(genoa.public_bytes(serialization.Encoding.DER))
    # the HCL's SNP report is version 2 (no CPUID): the VCEK picks the Genoa chain, which holds,
    # but the Milan chip's report does not verify with the Genoa chip's key
    with pytest.raises(
        AttestationError, match="report signature does not verify with the SEV-VCEK key"
    ):
        snp(ev)


def test_az_snp_init_data_pcr8_rule() -> None:
    # upstream vector: init-data hash 8505e4… must give PCR8 bddacc…
    digest = bytes.fromhex("8505e4e25e50a27c5dc8147af88efbece627fbea55291911eff832d9ee127781")
    assert (
        init_data_pcr(digest).hex()
        == "bddaccb9c52249e97a31baea61b7d91be8221a16e703d92148d04fb8e9c1dfdd"
    )
    with pytest.raises(AttestationError, match=r"init_data mismatch: PCR8 is 0+, expected SHA-256"):
        snp(unit_evidence(), expected_init_data=digest)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda ev: ev.__setitem__("version", 3), r"version: expected 1 or 2, got 3"),
        (lambda ev: ev.__setitem__("hcl_report", "a+b/"), "expected base64url"),
        (lambda ev: ev.pop("vcek"), "missing field.*vcek"),
        (
            lambda ev: ev["tpm_quote"].__setitem__("message", "zz"),
            r"tpm_quote\.message: expected hex",
        ),
    ],
)
def test_az_snp_malformed_evidence_is_refused(mutate: Any, message: str) -> None:
    ev = unit_evidence()
    mutate(ev)
    with pytest.raises(AttestationError, match=message):
        snp(ev)


# -- az-tdx-vtpm --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["evidence-v0.json", "evidence-v1.json"])
def test_az_tdx_vectors_verify_with_upstream_claims(name: str) -> None:
    claims = tdx(vector(f"az-tdx-vtpm/{name}").read_bytes()).claims
    assert claims["report_data"] == "6368616c6c656e6765"
    assert claims["tpm"]["pcr00"] == TDX_PCR00
    assert set(claims["quote"]) >= {"header", "body"}


def test_az_tdx_wrong_nonce_is_refused() -> None:
    with pytest.raises(AttestationError, match="report_data mismatch"):
        tdx(vector("az-tdx-vtpm/evidence-v1.json").read_bytes(), b"other")


@pytest.mark.parametrize(
    ("part", "offset", "message"),
    [
        ("hcl_report", 0x880, "TDREPORT: HCL variable data digest mismatch"),
        ("td_quote", 200, "td_quote: quote signature does not verify"),
        ("td_quote", 1100, "QE report binding mismatch"),
    ],
)
def test_az_tdx_flipped_bits_are_refused(part: str, offset: int, message: str) -> None:
    ev = load_json("az-tdx-vtpm/evidence-v1.json")
    ev[part] = b64url(flip(unb64url(ev[part]), offset))
    with pytest.raises(AttestationError, match=message):
        tdx(ev)


def test_az_tdx_hcl_of_snp_kind_is_refused() -> None:
    ev = load_json("az-tdx-vtpm/evidence-v1.json")
    ev["hcl_report"] = b64url(vector("az-snp-vtpm/hcl-report.bin").read_bytes())
    with pytest.raises(AttestationError, match=r"HCL report_type: expected 4 \(TDX\), got 2"):
        tdx(ev)
