"""TDX TCB evaluation against Intel PCS collateral (upstream's tcbInfo/enclaveIdentity vectors)."""

from __future__ import annotations

import base64
import datetime
import json
import logging
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from coco.errors import AttestationError
from coco.tee.tdx.collateral import SignedDocument, raw_member
from coco.tee.tdx.verifier import TdxVerifier
from tests.tee.vectors import vector


def collateral(tmp_path: Path) -> Path:
    folder = tmp_path / "collateral"
    folder.mkdir()
    for name in ("tcbInfo.json", "enclaveIdentity.json"):
        shutil.copy(vector(f"tdx/{name}"), folder / name)
    return folder


def evidence(n: int) -> dict[str, object]:
    return {"quote": base64.b64encode(vector(f"tdx/tdx_quote_{n}.dat").read_bytes()).decode()}


def test_quote6_tcb_status_from_the_vector_collateral(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = TdxVerifier(collateral(tmp_path), insecure_skip_collateral_signature=True)
    with caplog.at_level(logging.WARNING):
        claims = verifier.verify(evidence(6)).claims
    assert "INSECURE" in caplog.text
    # PCK PCE SVN 11 < 13 of the UpToDate level: the OutOfDate level applies
    assert claims["tcb_status"] == "OutOfDate"
    assert claims["tcb_date"] == "2018-01-04T00:00:00Z"
    assert claims["tcb_eval_num"] == 17
    assert claims["collateral_expiration_status"] in ("0", "1")
    assert claims["quote"]["body"]["mr_td"].startswith("21e8dead")


def test_unauthenticated_collateral_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match=r"no tcb_signing_chain\.pem .*cannot authenticate"):
        TdxVerifier(collateral(tmp_path)).verify(evidence(6))


def test_collateral_of_another_platform_is_refused(tmp_path: Path) -> None:
    verifier = TdxVerifier(collateral(tmp_path), insecure_skip_collateral_signature=True)
    with pytest.raises(
        AttestationError,
        match="tcbInfo is for FMSPC 00a06d080000, the PCK certificate says 50806f000000",
    ):
        verifier.verify(evidence(4))


def test_revoked_tcb_is_refused(tmp_path: Path) -> None:
    folder = collateral(tmp_path)
    doc = json.loads((folder / "tcbInfo.json").read_text())
    for level in doc["tcbInfo"]["tcbLevels"]:
        level["tcbStatus"] = "Revoked"
    (folder / "tcbInfo.json").write_text(json.dumps(doc))
    with pytest.raises(AttestationError, match="TCB status Revoked"):
        TdxVerifier(folder, insecure_skip_collateral_signature=True).verify(evidence(6))


def test_qe_identity_mismatch_is_refused(tmp_path: Path) -> None:
    folder = collateral(tmp_path)
    doc = json.loads((folder / "enclaveIdentity.json").read_text())
    doc["enclaveIdentity"]["mrsigner"] = "00" * 32
    (folder / "enclaveIdentity.json").write_text(json.dumps(doc))
    with pytest.raises(AttestationError, match="QE mrsigner mismatch"):
        TdxVerifier(folder, insecure_skip_collateral_signature=True).verify(evidence(6))


def _self_signed(key: ec.EllipticCurvePrivateKey, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=99))
        .sign(key, hashes.SHA256())
    )  # fmt: skip


def test_signing_chain_to_an_unknown_root_is_refused(tmp_path: Path) -> None:
    folder = collateral(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = b"".join(
        _self_signed(key, cn).public_bytes(serialization.Encoding.PEM)
        for cn in ("Intel SGX TCB Signing", "Intel SGX Root CA")
    )
    (folder / "tcb_signing_chain.pem").write_bytes(pem)
    with pytest.raises(AttestationError, match="certificate chain to an unknown root"):
        TdxVerifier(folder).verify(evidence(6))


def test_collateral_signature_covers_the_exact_member_bytes(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    text = vector("tdx/tcbInfo.json").read_text()
    body = raw_member(text, "tcbInfo", "w")
    assert json.loads(body) == json.loads(text)["tcbInfo"]
    r, s = decode_dss_signature(key.sign(body, ec.ECDSA(hashes.SHA256())))
    signed = {"tcbInfo": "@", "signature": (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()}
    path = tmp_path / "tcbInfo.json"
    path.write_text(json.dumps(signed).replace('"@"', body.decode()))
    assert SignedDocument.load(path, "tcbInfo", key.public_key()).body["fmspc"] == "00A06D080000"
    path.write_text(path.read_text().replace('"pcesvn":13', '"pcesvn":1'))
    with pytest.raises(
        AttestationError, match="signature does not verify with the Intel SGX TCB Signing key"
    ):
        SignedDocument.load(path, "tcbInfo", key.public_key())
