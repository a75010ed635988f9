"""Interop with an independent peer: openssl checks what our verifiers rebuild and trust.

Our SNP code rebuilds the binary report from the evidence JSON and checks the VCEK chain;
``openssl dgst``/``openssl verify`` must agree on the very same bytes and certificates, and must
refuse the corrupted copies our verifiers refuse.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from coco.tee._common import load_der_cert, load_pem_certs
from coco.tee.snp.certs import amd_roots
from coco.tee.snp.report import AttestationReport
from coco.tee.tdx.quote import Quote
from tests.tee.vectors import load_json, vector

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is required")
PEM = serialization.Encoding.PEM


def openssl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)


def _write_report_signature(tmp_path: Path, report: AttestationReport, vcek_der: bytes) -> None:
    vcek = load_der_cert(vcek_der, "vcek")
    (tmp_path / "vcek.pub").write_bytes(
        vcek.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    r = int.from_bytes(report.signature_r, "little")
    s = int.from_bytes(report.signature_s, "little")
    (tmp_path / "sig.der").write_bytes(encode_dss_signature(r, s))
    (tmp_path / "body.bin").write_bytes(report.signed_bytes())


def test_openssl_verifies_the_snp_report_we_rebuild_from_json(tmp_path: Path) -> None:
    ev = load_json("snp/snp-evidence-e2e.json")
    vcek_der = bytes(ev["cert_chain"][0]["data"])
    report = AttestationReport.from_json(ev["attestation_report"])
    _write_report_signature(tmp_path, report, vcek_der)
    args = ("dgst", "-sha384", "-verify", "vcek.pub", "-signature", "sig.der", "body.bin")
    assert openssl(*args, cwd=tmp_path).stdout.strip() == "Verified OK"
    ev["attestation_report"]["measurement"][5] ^= 1
    _write_report_signature(
        tmp_path, AttestationReport.from_json(ev["attestation_report"]), vcek_der
    )
    proc = openssl(*args, cwd=tmp_path)
    assert proc.returncode != 0 and "Verification failure" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("gen", "leaf", "untrusted"),
    [
        ("Genoa", "e2e", "ask"),
        ("Milan", "snp/test-vcek.der", "ask"),
        ("Milan", "snp/test-vlek.der", "asvk"),
    ],
)
def test_openssl_agrees_on_the_amd_chains(
    tmp_path: Path, gen: str, leaf: str, untrusted: str
) -> None:
    roots = amd_roots(gen)
    (tmp_path / "ark.pem").write_bytes(roots.ark.public_bytes(PEM))
    (tmp_path / "inter.pem").write_bytes(getattr(roots, untrusted).public_bytes(PEM))
    der = (
        bytes(load_json("snp/snp-evidence-e2e.json")["cert_chain"][0]["data"])
        if leaf == "e2e"
        else vector(leaf).read_bytes()
    )
    (tmp_path / "leaf.pem").write_bytes(load_der_cert(der, "leaf").public_bytes(PEM))
    args = ("verify", "-no_check_time", "-CAfile", "ark.pem", "-untrusted", "inter.pem", "leaf.pem")
    proc = openssl(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    other = amd_roots("Turin")  # a chain to the wrong root
    (tmp_path / "ark.pem").write_bytes(other.ark.public_bytes(PEM))
    (tmp_path / "inter.pem").write_bytes(other.ask.public_bytes(PEM))
    assert openssl(*args, cwd=tmp_path).returncode != 0


@pytest.mark.parametrize("n", [4, 5, 6])
def test_openssl_agrees_on_the_pck_chain_and_qe_report_signature(tmp_path: Path, n: int) -> None:
    quote = Quote.from_bytes(vector(f"tdx/tdx_quote_{n}.dat").read_bytes())
    leaf, ca, root = load_pem_certs(quote.pck_chain_pem, "pck chain")
    for name, cert in (("leaf.pem", leaf), ("ca.pem", ca), ("root.pem", root)):
        (tmp_path / name).write_bytes(cert.public_bytes(PEM))
    proc = openssl(
        "verify",
        "-no_check_time",
        "-CAfile",
        "root.pem",
        "-untrusted",
        "ca.pem",
        "leaf.pem",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (tmp_path / "pck.pub").write_bytes(
        leaf.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    sig = quote.qe_report_signature
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    (tmp_path / "qe.sig").write_bytes(der)
    (tmp_path / "qe.bin").write_bytes(quote.qe_report.raw)
    args = ("dgst", "-sha256", "-verify", "pck.pub", "-signature", "qe.sig", "qe.bin")
    assert openssl(*args, cwd=tmp_path).stdout.strip() == "Verified OK"
    (tmp_path / "qe.bin").write_bytes(bytes([quote.qe_report.raw[0] ^ 1]) + quote.qe_report.raw[1:])
    assert openssl(*args, cwd=tmp_path).returncode != 0


@pytest.mark.parametrize("n", [4, 5])
def test_openssl_agrees_on_the_signed_region_of_the_quote(tmp_path: Path, n: int) -> None:
    quote = Quote.from_bytes(vector(f"tdx/tdx_quote_{n}.dat").read_bytes())
    ak = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), b"\x04" + quote.attestation_key
    )
    (tmp_path / "ak.pub").write_bytes(
        ak.public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    sig = quote.signature
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    (tmp_path / "q.sig").write_bytes(der)
    (tmp_path / "q.bin").write_bytes(quote.signed)  # v5: header, body type and size, body
    args = ("dgst", "-sha256", "-verify", "ak.pub", "-signature", "q.sig", "q.bin")
    assert openssl(*args, cwd=tmp_path).stdout.strip() == "Verified OK"
    (tmp_path / "q.bin").write_bytes(quote.signed[:-1])
    assert openssl(*args, cwd=tmp_path).returncode != 0
