"""TPM attester against a real swtpm (socket mode), round-tripped through the TPM verifier."""

from __future__ import annotations

import base64
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from coco.errors import AttestationError
from coco.tee import get_attester
from coco.tee.tpm.attester import TpmAttester
from coco.tee.tpm.quote import init_data_pcr
from coco.tee.tpm.verifier import TpmVerifier
from tests.swtpm import free_port_pair, start_swtpm
from tests.tee.vectors import flip

pytestmark = pytest.mark.skipif(
    shutil.which("swtpm") is None or shutil.which("tpm2_quote") is None,
    reason="swtpm and tpm2-tools are required (scripts/ installs them)",
)

REPORT_DATA = hashlib.sha384(b"runtime data").digest()
INIT_DATA = hashlib.sha256(b"initdata toml").digest()


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[str]:
    """A fresh swtpm; yields its TCTI string."""
    with start_swtpm(tmp_path / "tpm") as tcti:
        yield tcti


def _trust(tmp_path: Path, attester: TpmAttester) -> Path:
    folder = tmp_path / "trusted"
    folder.mkdir(exist_ok=True)
    (folder / "ak.pub").write_bytes(attester.ak_public_pem())
    return folder


def test_round_trip_through_the_verifier(swtpm: str, tmp_path: Path) -> None:
    attester = get_attester("tpm")
    assert isinstance(attester, TpmAttester)
    attester = TpmAttester(swtpm)
    attester.bind_init_data(INIT_DATA)
    evidence = attester.get_evidence(REPORT_DATA)
    verifier = TpmVerifier(_trust(tmp_path, attester))
    claims = verifier.verify(evidence, REPORT_DATA, INIT_DATA).claims
    assert claims["report_data"] == REPORT_DATA[:32].hex()  # truncated to 32 bytes
    assert claims["init_data"] == init_data_pcr(INIT_DATA).hex()
    assert claims["pcr00"] == "00" * 32


def test_ecdsa_ak_round_trip(swtpm: str, tmp_path: Path) -> None:
    attester = TpmAttester(swtpm, ak_alg="ecc")
    evidence = attester.get_evidence(REPORT_DATA)
    assert base64.b64decode(evidence["tpm_quote"]["signature"])[:2] == b"\x00\x18"  # TPM_ALG_ECDSA
    verifier = TpmVerifier(_trust(tmp_path, attester))
    assert verifier.verify(evidence, REPORT_DATA).claims["report_data"] == REPORT_DATA[:32].hex()
    evidence["tpm_quote"]["message"] = base64.b64encode(
        flip(base64.b64decode(evidence["tpm_quote"]["message"]), 60)
    ).decode()
    with pytest.raises(AttestationError, match="TPM quote signature does not verify"):
        verifier.verify(evidence, REPORT_DATA)


def test_ak_is_stable_across_calls(swtpm: str) -> None:
    attester = TpmAttester(swtpm)
    assert attester.ak_public_der() == attester.ak_public_der()


def test_wrong_bindings_are_refused(swtpm: str, tmp_path: Path) -> None:
    attester = TpmAttester(swtpm)
    evidence = attester.get_evidence(REPORT_DATA)
    verifier = TpmVerifier(_trust(tmp_path, attester))
    with pytest.raises(AttestationError, match="report_data mismatch"):
        verifier.verify(evidence, hashlib.sha384(b"another session").digest())
    with pytest.raises(AttestationError, match="init_data mismatch: PCR8"):
        verifier.verify(evidence, REPORT_DATA, INIT_DATA)  # PCR8 was never extended


def test_quote_from_another_tpm_is_refused(swtpm: str, tmp_path: Path) -> None:
    trusted = _trust(tmp_path, TpmAttester(swtpm))
    with start_swtpm(tmp_path / "other-tpm") as other_tcti:
        evidence = TpmAttester(other_tcti).get_evidence(REPORT_DATA)
    with pytest.raises(AttestationError, match="is not one of the trusted AK keys"):
        TpmVerifier(trusted).verify(evidence, REPORT_DATA)


def test_pcr_values_swapped_after_the_quote_are_refused(swtpm: str, tmp_path: Path) -> None:
    attester = TpmAttester(swtpm)
    evidence = attester.get_evidence(REPORT_DATA)
    evidence["tpm_quote"]["pcrs"][8] = init_data_pcr(INIT_DATA).hex()
    with pytest.raises(AttestationError, match="PCR digest mismatch"):
        TpmVerifier(_trust(tmp_path, attester)).verify(evidence, REPORT_DATA, INIT_DATA)


def test_unreachable_tpm_gives_a_clear_error(tmp_path: Path) -> None:
    port = free_port_pair()
    with pytest.raises(
        AttestationError, match=r"tpm attester: tpm2_createprimary failed \(TCTI swtpm:"
    ):
        TpmAttester(f"swtpm:host=127.0.0.1,port={port}", timeout=10).get_evidence(REPORT_DATA)
