"""SEV-SNP verifier on upstream's vectors, on corrupted copies and on a forged AMD chain."""

from __future__ import annotations

import copy
import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from coco.errors import AttestationError
from coco.tee import get_verifier
from coco.tee._common import load_der_cert
from coco.tee.snp.certs import amd_roots, check_tcb, check_vek_chain, vek_info
from coco.tee.snp.report import AttestationReport
from coco.tee.snp.verifier import SnpVerifier, verify_report_signature
from tests.tee.vectors import flip, load_json, vector

E2E = "snp/snp-evidence-e2e.json"
E2E_MEASUREMENT = (
    "6a6519d757e68c2e939c9dbbbc1828498e8de35d2766dd05f1a2cca5059d0cf4"
    "ae62a36d75c837974dd50b315506e73e"
)
E2E_REPORT_DATA = bytes.fromhex(
    "7e7320889600c7ac133aea7b896c51f41026002982292a7369559796999c1bf9"
    "29eef3ff23c46e858f0b1982f9a92b17c51b578d958cde6b0c92978f150cf9b0"
)


def e2e() -> dict[str, Any]:
    return load_json(E2E)


def verify(evidence: dict[str, Any], **kw: Any):
    return get_verifier("snp").verify(json.dumps(evidence).encode(), **kw)


# -- the good vector ----------------------------------------------------------------------------


def test_e2e_evidence_verifies_with_upstream_claims() -> None:
    claims = get_verifier("snp").verify(vector(E2E).read_bytes()).claims
    assert claims["measurement"] == E2E_MEASUREMENT
    assert claims["report_data"] == E2E_REPORT_DATA.hex()
    assert claims["init_data"] == "00" * 32
    assert len(claims["chip_id"]) == 128
    assert (
        claims["reported_tcb_bootloader"],
        claims["reported_tcb_tee"],
        claims["reported_tcb_snp"],
        claims["reported_tcb_microcode"],
    ) == (10, 0, 23, 25)
    # policy 0x30000: abi 0.0, SMT allowed, bit 17 reserved; plat_info 37 = 0b100101
    assert claims["policy_abi_major"] == 0 and claims["policy_abi_minor"] == 0
    assert claims["policy_smt_allowed"] is True
    assert claims["policy_debug_allowed"] is False
    assert claims["policy_migrate_ma"] is False and claims["policy_single_socket"] is False
    assert claims["platform_smt_enabled"] is True and claims["platform_tsme_enabled"] is False


def test_report_data_and_init_data_binding() -> None:
    ev = e2e()
    verify(ev, expected_report_data=E2E_REPORT_DATA, expected_init_data=b"\0" * 32)
    with pytest.raises(
        AttestationError, match=r"report_data mismatch: expected 7e7320.*0{32}, got"
    ):
        verify(ev, expected_report_data=E2E_REPORT_DATA[:48])  # padded to 64: differs
    with pytest.raises(AttestationError, match=r"init_data \(HOST_DATA\) mismatch"):
        verify(ev, expected_init_data=b"\x01" * 32)


def test_kbs_style_48_byte_digest_is_zero_padded(tmp_path: Path) -> None:
    # a report whose REPORT_DATA is digest || 0*16 accepts the 48-byte digest: build one with a
    # forged chain and check the padding rule through the shared binding check.
    from coco.tee.snp.verifier import check_bindings

    raw = bytearray(vector("snp/snp-evidence-e2e.reconstructed-report.bin").read_bytes())
    raw[0x50 + 48 : 0x90] = bytes(16)
    report = AttestationReport.from_bytes(bytes(raw))
    check_bindings(report, bytes(raw[0x50 : 0x50 + 48]), None, "w")
    with pytest.raises(AttestationError, match="report_data mismatch"):
        check_bindings(report, bytes(48), None, "w")


def test_turin_tcb_layout_and_fmc() -> None:
    rep = e2e()["attestation_report"]
    rep["cpuid_fam_id"], rep["cpuid_mod_id"] = 0x1A, 0x02
    with pytest.raises(
        AttestationError, match=r"current_tcb\.fmc: expected an integer for a Turin report"
    ):
        AttestationReport.from_json(rep)
    for name in ("current_tcb", "reported_tcb", "committed_tcb", "launch_tcb"):
        rep[name]["fmc"] = 9
    report = AttestationReport.from_json(rep)
    assert report.generation == "Turin"
    # Turin TCB_VERSION: fmc, bootloader, tee, snp, 0, 0, 0, microcode
    assert report.raw[0x180:0x188] == bytes([9, 10, 0, 23, 0, 0, 0, 25])
    assert report.tcbs["reported_tcb"].fmc == 9
    assert report.to_json() == rep


def test_golden_serialization_of_the_json_report() -> None:
    report = AttestationReport.from_json(e2e()["attestation_report"])
    assert report.raw == vector("snp/snp-evidence-e2e.reconstructed-report.bin").read_bytes()
    assert report.to_json() == e2e()["attestation_report"]
    assert report.generation == "Genoa" and report.signing_key == "VCEK"


# -- corrupted copies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        ("measurement", 0),
        ("report_data", 63),
        ("host_data", 5),
        ("chip_id", 0),
        ("guest_svn", None),
        ("policy", None),
    ],
)
def test_one_flipped_bit_in_the_signed_body_is_refused(path: tuple[str, int | None]) -> None:
    ev = e2e()
    rep = ev["attestation_report"]
    name, idx = path
    if idx is None:
        rep[name] ^= 1 << 20 if name == "policy" else 1
    else:
        rep[name][idx] ^= 1
    with pytest.raises(AttestationError, match="report signature does not verify"):
        verify(ev)


@pytest.mark.parametrize("part", ["r", "s"])
def test_flipped_signature_bit_is_refused(part: str) -> None:
    ev = e2e()
    ev["attestation_report"]["signature"][part][3] ^= 0x10
    with pytest.raises(AttestationError, match="report signature does not verify"):
        verify(ev)


def test_truncated_report_field_is_refused() -> None:
    ev = e2e()
    del ev["attestation_report"]["measurement"][-1]
    with pytest.raises(
        AttestationError, match=r"attestation_report\.measurement: expected 48 bytes, got 47"
    ):
        verify(ev)


def test_truncated_binary_report_is_refused() -> None:
    raw = vector("snp/test-report.bin").read_bytes()
    with pytest.raises(AttestationError, match="expected 1184 bytes, got 1000"):
        AttestationReport.from_bytes(raw[:1000])


def test_truncated_evidence_json_is_refused() -> None:
    data = vector(E2E).read_bytes()
    with pytest.raises(
        AttestationError, match="snp evidence: expected a JSON object, got invalid JSON"
    ):
        get_verifier("snp").verify(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda ev: ev["attestation_report"].pop("chip_id"), "missing field"),
        (lambda ev: ev["attestation_report"].__setitem__("extra", 1), "unknown field.*extra"),
        (lambda ev: ev.__setitem__("surprise", 1), "unknown field.*surprise"),
        (
            lambda ev: ev["attestation_report"].__setitem__("vmpl", "0"),
            r"vmpl: expected an integer",
        ),
        (
            lambda ev: ev["attestation_report"]["report_id"].__setitem__(0, 256),
            r"report_id\[0\]: expected a byte",
        ),
        (
            lambda ev: ev["attestation_report"].__setitem__("version", 7),
            "version: expected 2 to 5, got 7",
        ),
        (
            lambda ev: ev["cert_chain"][0].__setitem__("cert_type", "XYZ"),
            "cert_type: expected one of",
        ),
        (lambda ev: ev["cert_chain"][0].__setitem__("data", [1, 2, 3]), "expected a DER X.509"),
        (
            lambda ev: ev["attestation_report"]["current_tcb"].__setitem__("fmc", 1),
            "fmc: expected null before Turin",
        ),
    ],
)
def test_malformed_evidence_is_refused_naming_the_field(mutate: Any, message: str) -> None:
    ev = e2e()
    mutate(ev)
    with pytest.raises(AttestationError, match=message):
        verify(ev)


def test_version_2_report_is_refused() -> None:
    report = AttestationReport.from_bytes(vector("snp/test-report.bin").read_bytes())
    ev = {"attestation_report": report.to_json(), "cert_chain": None}
    with pytest.raises(AttestationError, match="report version: expected 3 to 5, got 2"):
        verify(ev)


# -- chains -------------------------------------------------------------------------------------


def test_swapped_chain_cert_is_refused() -> None:
    ev = e2e()
    ev["cert_chain"][0]["data"] = list(vector("snp/test-vcek.der").read_bytes())  # a Milan VCEK
    with pytest.raises(AttestationError, match=r"issued by .*SEV-Milan.*not by .*SEV-Genoa"):
        verify(ev)


def test_vlek_report_chains_through_asvk_but_vmpl_1_is_refused() -> None:
    report = AttestationReport.from_bytes(vector("snp/test-vlek-report.bin").read_bytes())
    assert report.signing_key == "VLEK" and report.generation == "Milan"
    ev = {
        "attestation_report": report.to_json(),
        "cert_chain": [
            {"cert_type": "VLEK", "data": list(vector("snp/test-vlek.der").read_bytes())}
        ],
    }
    with pytest.raises(AttestationError, match="vmpl: expected 0, got 1"):
        verify(ev)
    ev["attestation_report"]["measurement"][0] ^= 1
    with pytest.raises(AttestationError, match="report signature does not verify"):
        verify(ev)


def test_vlek_report_with_a_vcek_is_refused() -> None:
    report = AttestationReport.from_bytes(vector("snp/test-vlek-report.bin").read_bytes())
    ev = {
        "attestation_report": report.to_json(),
        "cert_chain": [
            {"cert_type": "VCEK", "data": list(vector("snp/test-vcek.der").read_bytes())}
        ],
    }
    with pytest.raises(AttestationError, match="signed by its VLEK but cert_chain holds a VCEK"):
        verify(ev)


def test_upstream_unit_vectors_signature_tcb_and_chain() -> None:
    raw = vector("snp/test-report.bin").read_bytes()
    vcek_der = vector("snp/test-vcek.der").read_bytes()
    vcek = load_der_cert(vcek_der, "vcek")
    report = AttestationReport.from_bytes(raw)
    assert report.get("measurement").hex().startswith("a1f3930413247bb3")
    assert report.tcbs["reported_tcb"].microcode == 0x73
    verify_report_signature(report, vcek, "w")
    check_tcb(report, vek_info(vcek, "w"), "w")
    check_vek_chain(vcek, "VCEK", amd_roots("Milan"), "w")
    with pytest.raises(AttestationError, match="signature does not verify"):
        verify_report_signature(AttestationReport.from_bytes(flip(raw, 42)), vcek, "w")
    with pytest.raises(
        AttestationError,
        match=r"reported_tcb\.bootloader mismatch: the VEK certificate says 3, the report says 2",
    ):
        check_tcb(AttestationReport.from_bytes(flip(raw, 384)), vek_info(vcek, "w"), "w")
    with pytest.raises(AttestationError):
        check_vek_chain(load_der_cert(flip(vcek_der, 42), "vcek"), "VCEK", amd_roots("Milan"), "w")
    with pytest.raises(AttestationError, match="issued by"):
        check_vek_chain(vcek, "VCEK", amd_roots("Genoa"), "w")


def test_vlek_chain_and_hwid_encodings() -> None:
    vlek = load_der_cert(vector("snp/test-vlek.der").read_bytes(), "vlek")
    check_vek_chain(vlek, "VLEK", amd_roots("Milan"), "w")
    with pytest.raises(AttestationError, match="issued by"):
        check_vek_chain(vlek, "VCEK", amd_roots("Milan"), "w")  # ASK is not its issuer
    assert vek_info(vlek, "w").hwid is None
    for name, ucode in (("test-vcek-invalid-legacy.der", 0xA9), ("test-vcek-invalid-new.der", 30)):
        info = vek_info(load_der_cert(vector(f"snp/{name}").read_bytes(), name), name)
        assert info.hwid == bytes(range(64))  # raw 64 bytes and DER OCTET STRING alike
        assert info.microcode == ucode


@pytest.mark.parametrize("gen", ["Milan", "Genoa", "Turin"])
def test_bundled_roots_are_self_consistent(gen: str) -> None:
    roots = amd_roots(gen)
    assert roots.ark.subject.rfc4514_string().startswith("CN=ARK-" + gen)
    assert "SEV-VLEK-" + gen in roots.asvk.subject.rfc4514_string()


# -- a forged chain: a valid signature under an unknown root ------------------------------------


def _name(cn: str) -> x509.Name:
    """AMD's own distinguished names, so that only the keys tell the forgery apart."""
    roots = amd_roots("Genoa")
    for cert in (roots.ark, roots.ask):
        if cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn:
            return cert.subject
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str, issuer: str, key: Any, signer: Any, exts: list[Any] = ()
) -> x509.Certificate:
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
    )
    for ext in exts:
        b = b.add_extension(ext, critical=False)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    return b.sign(signer, hashes.SHA384(), rsa_padding=pss)


@pytest.fixture(scope="module")
def forged() -> dict[str, Any]:
    """A report re-signed by a VCEK under a home-made ARK/ASK with AMD's names."""
    ark_key = rsa.generate_private_key(65537, 2048)
    ask_key = rsa.generate_private_key(65537, 2048)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    ev = e2e()
    report = AttestationReport.from_json(ev["attestation_report"])
    spl = [
        x509.UnrecognizedExtension(
            x509.ObjectIdentifier(f"1.3.6.1.4.1.3704.1.3.{i}"), bytes([2, 1, v])
        )
        for i, v in ((1, 10), (2, 0), (3, 23), (8, 25))
    ]
    ark = _cert("ARK-Genoa", "ARK-Genoa", ark_key, ark_key)
    ask = _cert("SEV-Genoa", "ARK-Genoa", ask_key, ark_key)
    vcek = _cert("SEV-VCEK", "SEV-Genoa", vcek_key, ask_key, spl)
    raw = bytearray(report.raw)
    raw[0x90] ^= 0xFF  # a different measurement: the attacker's guest
    sig = vcek_key.sign(bytes(raw[:0x2A0]), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(sig)
    raw[0x2A0 : 0x2A0 + 72] = r.to_bytes(72, "little")
    raw[0x2E8 : 0x2E8 + 72] = s.to_bytes(72, "little")
    der = serialization.Encoding.DER
    return {
        "report": AttestationReport.from_bytes(bytes(raw)).to_json(),
        "ark": list(ark.public_bytes(der)),
        "ask": list(ask.public_bytes(der)),
        "vcek": list(vcek.public_bytes(der)),
    }


def test_chain_to_an_unknown_root_is_refused(forged: dict[str, Any]) -> None:
    full = {
        "attestation_report": forged["report"],
        "cert_chain": [
            {"cert_type": "VCEK", "data": forged["vcek"]},
            {"cert_type": "ASK", "data": forged["ask"]},
            {"cert_type": "ARK", "data": forged["ark"]},
        ],
    }
    with pytest.raises(
        AttestationError, match="not AMD's 'ARK-Genoa' root: certificate chain to an unknown root"
    ):
        verify(full)
    vcek_only = {
        "attestation_report": forged["report"],
        "cert_chain": [{"cert_type": "VCEK", "data": forged["vcek"]}],
    }
    with pytest.raises(
        AttestationError,
        match="signature of certificate 'SEV-VCEK' does not verify with the key of 'SEV-Genoa'",
    ):
        verify(vcek_only)
    ask_too = copy.deepcopy(full)
    del ask_too["cert_chain"][2]
    with pytest.raises(
        AttestationError, match="'SEV-Genoa' does not verify with the key of 'ARK-Genoa'"
    ):
        verify(ask_too)


# -- offline KDS store --------------------------------------------------------------------------


def test_offline_kds_store(tmp_path: Path) -> None:
    ev = e2e()
    vcek = bytes(ev["cert_chain"][0]["data"])
    ev["cert_chain"] = None
    chip = bytes(ev["attestation_report"]["chip_id"]).hex()
    with pytest.raises(
        AttestationError, match="no VCEK in cert_chain and none in the offline KDS store"
    ):
        SnpVerifier(kds_store=tmp_path).verify(ev)
    folder = tmp_path / "vcek" / chip
    folder.mkdir(parents=True)
    (folder / "bl10_tee00_snp23_ucode25_vcek.der").write_bytes(vcek)
    claims = SnpVerifier(kds_store=tmp_path).verify(ev).claims
    assert claims["measurement"] == E2E_MEASUREMENT
