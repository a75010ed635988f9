"""Generic TPM verifier on upstream's tpm_evidence.json and corrupted copies."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from coco.errors import AttestationError
from coco.tee.tpm.quote import Attest
from coco.tee.tpm.verifier import TpmVerifier
from tests.tee.vectors import flip, load_json

NONCE48 = bytes.fromhex(
    "a04182b506878d4f29b91ee606a71a0d3361ccf1b22db20c98adcaa537bea393"
    "ef0e41a18b3569ab678f1497fbc5c120"
)


def evidence() -> dict[str, Any]:
    return load_json("tpm/tpm_evidence.json")


@pytest.fixture
def trusted(tmp_path: Path) -> Path:
    key = serialization.load_der_public_key(base64.b64decode(evidence()["ak_public"]))
    (tmp_path / "vector-ak.pub").write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return tmp_path


def test_vector_verifies_with_upstream_claims(trusted: Path) -> None:
    claims = TpmVerifier(trusted).verify(evidence(), expected_report_data=NONCE48).claims
    assert len(claims["report_data"]) == 128 and claims["report_data"].startswith("a04182b5")
    assert len(claims["init_data"]) == 64 and claims["init_data"] == claims["pcr08"]
    assert [f"pcr{i:02d}" for i in range(24)] == [k for k in claims if k.startswith("pcr")]
    assert claims["pcr17"] == "ff" * 32
    attest = Attest.parse(base64.b64decode(evidence()["tpm_quote"]["message"]))
    assert attest.pcr_selection == [(0x000B, list(range(24)))]


def test_untrusted_ak_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        AttestationError, match=r"the AK \(sha256 [0-9a-f]{64}\) is not one of the trusted AK keys"
    ):
        TpmVerifier(tmp_path).verify(evidence())


def test_wrong_report_data_is_refused(trusted: Path) -> None:
    with pytest.raises(
        AttestationError, match=r"report_data mismatch: expected nonce 00+, got a04182b5"
    ):
        TpmVerifier(trusted).verify(evidence(), expected_report_data=bytes(48))


def test_wrong_init_data_is_refused(trusted: Path) -> None:
    with pytest.raises(AttestationError, match=r"init_data mismatch: PCR8 is 0+"):
        TpmVerifier(trusted).verify(evidence(), expected_init_data=b"\x01" * 32)


@pytest.mark.parametrize(
    ("field", "offset"), [("message", 40), ("message", 170), ("signature", 100)]
)
def test_flipped_bit_is_refused(trusted: Path, field: str, offset: int) -> None:
    ev = evidence()
    raw = base64.b64decode(ev["tpm_quote"][field])
    ev["tpm_quote"][field] = base64.b64encode(flip(raw, offset)).decode()
    with pytest.raises(AttestationError, match="TPM quote signature does not verify"):
        TpmVerifier(trusted).verify(ev)


def test_altered_pcr_is_refused(trusted: Path) -> None:
    ev = evidence()
    ev["tpm_quote"]["pcrs"][8] = "01" * 32
    with pytest.raises(AttestationError, match="PCR digest mismatch"):
        TpmVerifier(trusted).verify(ev)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda ev: ev["tpm_quote"].__setitem__(
                "signature", base64.b64encode(b"\x00\x14\x00\x0b\x01\x00ab").decode()
            ),
            "truncated at signature",
        ),
        (
            lambda ev: ev["tpm_quote"].__setitem__(
                "signature", base64.b64encode(b"\x00\x99\x00\x0b").decode()
            ),
            "sigAlg: expected RSASSA",
        ),
        (lambda ev: ev["tpm_quote"]["pcrs"].pop(), "expected 24 SHA-256 PCR values, got 23"),
        (
            lambda ev: ev["tpm_quote"]["pcrs"].__setitem__(0, "00"),
            r"pcrs\[0\]: expected 32 bytes, got 1",
        ),
        (lambda ev: ev.__setitem__("ak_public", "!!"), r"ak_public: expected base64"),
        (lambda ev: ev.__setitem__("extra", 1), "unknown field"),
    ],
)
def test_malformed_evidence_is_refused(trusted: Path, mutate: Any, message: str) -> None:
    ev = copy.deepcopy(evidence())
    mutate(ev)
    with pytest.raises(AttestationError, match=message):
        TpmVerifier(trusted).verify(ev)


def test_attest_strict_parsing() -> None:
    raw = base64.b64decode(evidence()["tpm_quote"]["message"])
    with pytest.raises(AttestationError, match="magic: expected 0xff544347"):
        Attest.parse(flip(raw, 0))
    with pytest.raises(AttestationError, match=r"type: expected 0x8018 \(quote\)"):
        Attest.parse(raw[:5] + b"\x17" + raw[6:])
    with pytest.raises(AttestationError, match="trailing bytes"):
        Attest.parse(raw + b"\0")
    with pytest.raises(AttestationError, match="truncated"):
        Attest.parse(raw[:100])
