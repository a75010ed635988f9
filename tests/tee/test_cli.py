"""``coco attestation verify`` on the upstream vectors and on corrupted copies (real CLI process)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.tee.vectors import load_json, vector

COCO = Path(sys.executable).with_name("coco")


def coco(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(COCO), "attestation", "verify", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def refused(proc: subprocess.CompletedProcess[str], reason: str) -> None:
    assert proc.returncode == 1, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one clear line, no traceback
    assert reason in lines[0]
    assert proc.stdout == ""


def write(tmp_path: Path, name: str, doc: object) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def tdx_evidence(tmp_path: Path, quote: bytes) -> str:
    return write(
        tmp_path, "tdx.json", {"cc_eventlog": None, "quote": base64.b64encode(quote).decode()}
    )


def test_snp_vector_and_forgery(tmp_path: Path) -> None:
    claims = ok(coco("--tee", "snp", str(vector("snp/snp-evidence-e2e.json"))))
    assert claims["measurement"].startswith("6a6519d7")
    ev = load_json("snp/snp-evidence-e2e.json")
    ev["attestation_report"]["measurement"][0] ^= 1
    refused(
        coco("--tee", "snp", write(tmp_path, "forged.json", ev)), "report signature does not verify"
    )
    ev = load_json("snp/snp-evidence-e2e.json")
    ev["attestation_report"]["report_data"].pop()
    refused(
        coco("--tee", "snp", write(tmp_path, "short.json", ev)),
        "attestation_report.report_data: expected 64 bytes, got 63",
    )
    ev = load_json("snp/snp-evidence-e2e.json")
    ev["cert_chain"][0]["data"] = list(vector("snp/test-vcek.der").read_bytes())
    refused(coco("--tee", "snp", write(tmp_path, "chain.json", ev)), "not by")
    refused(
        coco(
            "--tee",
            "snp",
            str(vector("snp/snp-evidence-e2e.json")),
            "--expected-report-data",
            "00" * 48,
        ),
        "report_data mismatch",
    )


def test_tdx_vectors_and_flipped_bit(tmp_path: Path) -> None:
    for n in (4, 5, 6):
        claims = ok(
            coco(
                "--tee",
                "tdx",
                tdx_evidence(tmp_path, vector(f"tdx/tdx_quote_{n}.dat").read_bytes()),
            )
        )
        assert claims["quote"]["header"]["tee_type"] == "81000000"
    raw = bytearray(vector("tdx/tdx_quote_6.dat").read_bytes())
    digest = raw[568 : 568 + 48].hex()
    ok(coco("--tee", "tdx", tdx_evidence(tmp_path, bytes(raw)), "--expected-report-data", digest))
    raw[200] ^= 0x04
    refused(
        coco("--tee", "tdx", tdx_evidence(tmp_path, bytes(raw))), "quote signature does not verify"
    )


def test_az_vectors(tmp_path: Path) -> None:
    claims = ok(
        coco("--tee", "az-snp-vtpm", str(vector("az-snp-vtpm/evidence-v1.json")),
             "--expected-report-data", b"challenge".hex())
    )  # fmt: skip
    assert claims["tpm"]["pcr00"].startswith("e15c4479")
    claims = ok(
        coco("--tee", "az-tdx-vtpm", str(vector("az-tdx-vtpm/evidence-v1.json")),
             "--expected-report-data", b"challenge".hex())
    )  # fmt: skip
    assert claims["report_data"] == b"challenge".hex()
    refused(
        coco("--tee", "az-snp-vtpm", str(vector("az-snp-vtpm/evidence-v0.json")),
             "--expected-report-data", b"challengf".hex()),
        "report_data mismatch",
    )  # fmt: skip


def test_tpm_vector_with_and_without_a_trusted_ak(tmp_path: Path) -> None:
    path = str(vector("tpm/tpm_evidence.json"))
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(
        coco("--tee", "tpm", path, env={"COCO_TPM_TRUSTED_AK_KEYS_DIR": str(empty)}),
        "trusted AK keys",
    )
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    key = serialization.load_der_public_key(
        base64.b64decode(load_json("tpm/tpm_evidence.json")["ak_public"])
    )
    (trusted / "ak.pub").write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    claims = ok(coco("--tee", "tpm", path, env={"COCO_TPM_TRUSTED_AK_KEYS_DIR": str(trusted)}))
    assert claims["report_data"].startswith("a04182b5")


@pytest.mark.parametrize("tee", ["snp", "tdx", "tpm", "az-snp-vtpm", "az-tdx-vtpm"])
def test_garbage_evidence_is_refused_in_one_line(tmp_path: Path, tee: str) -> None:
    path = tmp_path / "garbage.json"
    path.write_bytes(b'{"truncated": ')
    refused(coco("--tee", tee, str(path)), f"evidence {path}: expected JSON, found invalid JSON")
