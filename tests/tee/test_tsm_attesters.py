"""SNP and TDX attesters through configfs-tsm, on a fake configfs tree fed with real reports.

The hardware is not here: ``FakeTsm`` makes each report entry the attester creates behave like the
kernel's (``provider``, ``generation``, ``outblob``, ``auxblob``; the attester writes ``inblob``)
and serves the upstream report vectors, so the evidence the attester builds must verify with our
own verifiers against the vectors' own report data.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import uuid
from pathlib import Path

import pytest

import coco.tee.tsm as tsm_mod
from coco.errors import AttestationError
from coco.tee import get_attester
from coco.tee.detect import detect_tee
from coco.tee.eventlog import EventLog
from coco.tee.snp.attester import SnpAttester, cert_table
from coco.tee.snp.report import AttestationReport
from coco.tee.snp.verifier import SnpVerifier
from coco.tee.tdx.attester import TdxAttester, ccel_records_end, pcr_to_mr
from coco.tee.tdx.quote import Quote
from coco.tee.tdx.verifier import TdxVerifier
from coco.tee.tsm import REPORT_DIR
from tests.tee.vectors import load_json, vector

VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")


class FakeTsm:
    """A root directory whose configfs-tsm report entries are filled as the kernel fills them."""

    def __init__(self, root: Path, provider: str, outblob: bytes, auxblob: bytes | None = None):
        self.root, self.provider, self.outblob, self.auxblob = root, provider, outblob, auxblob
        (root / REPORT_DIR).mkdir(parents=True)
        self.entries: list[Path] = []
        self.generation = 1  # the kernel counts writes: the attester writes inblob once

    def mkdir(self, entry: Path) -> None:
        entry.mkdir()
        self.entries.append(entry)
        (entry / "provider").write_text(self.provider + "\n")
        (entry / "outblob").write_bytes(self.outblob)
        if self.auxblob is not None:
            (entry / "auxblob").write_bytes(self.auxblob)
        (entry / "generation").write_text(f"{self.generation}\n")

    def attester_options(self) -> dict:
        def mkdir(entry: Path) -> None:
            self.mkdir(entry)

        return {"mkdir": mkdir}


@pytest.fixture(autouse=True)
def _rmdir_fake_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """configfs removes an entry with its attribute files on rmdir; a plain directory does not."""
    real = os.rmdir

    def rmdir(path: str | Path) -> None:
        for f in Path(path).iterdir():
            f.unlink()
        real(path)

    monkeypatch.setattr(tsm_mod.os, "rmdir", rmdir)


def _snp_e2e() -> tuple[bytes, bytes, bytes]:
    """The e2e SNP report (binary), its VCEK (DER) and its report data."""
    ev = load_json("snp/snp-evidence-e2e.json")
    raw = vector("snp/snp-evidence-e2e.reconstructed-report.bin").read_bytes()
    vcek = bytes(ev["cert_chain"][0]["data"])
    return raw, vcek, AttestationReport.from_bytes(raw).get("report_data")


def _table(certs: list[tuple[uuid.UUID, bytes]], guid_le: bool = False) -> bytes:
    head = (len(certs) + 1) * 24
    entries, blobs = b"", b""
    for guid, der in certs:
        gb = guid.bytes_le if guid_le else guid.bytes
        entries += struct.pack("<16sII", gb, head + len(blobs), len(der))
        blobs += der
    return entries + bytes(24) + blobs


def test_snp_evidence_from_configfs_verifies(tmp_path: Path) -> None:
    raw, vcek, report_data = _snp_e2e()
    fake = FakeTsm(tmp_path, "sev_guest", raw, _table([(VCEK_GUID, vcek)]))
    attester = SnpAttester(tmp_path, **fake.attester_options())
    evidence = attester.get_evidence(report_data)
    entry = fake.entries[0]
    assert not entry.exists()  # the entry is removed afterwards
    assert evidence["cert_chain"] == [{"cert_type": "VCEK", "data": list(vcek)}]
    claims = SnpVerifier(tmp_path / "no-kds").verify(evidence, report_data).claims
    assert claims["report_data"] == report_data.hex()
    assert claims["measurement"].startswith("6a6519d757e68c2e")
    # the report data asked for is what the attester wrote to inblob: a report for other data
    # (the fake always serves the vector) is refused by the attester itself
    with pytest.raises(AttestationError, match="REPORT_DATA is not the report data asked for"):
        attester.get_evidence(hashlib.sha384(b"other").digest())


def test_snp_inblob_is_the_padded_report_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, _, _ = _snp_e2e()
    fake = FakeTsm(tmp_path, "sev_guest", raw)
    written: dict[str, bytes] = {}
    real = tsm_mod._write

    def write(path: Path, data: bytes, entry: Path) -> None:
        written[path.name] = data
        real(path, data, entry)

    monkeypatch.setattr(tsm_mod, "_write", write)
    fake.generation = 2  # privlevel and inblob
    digest = hashlib.sha384(b"kbs binding").digest()
    with pytest.raises(AttestationError, match="REPORT_DATA is not the report data asked for"):
        SnpAttester(tmp_path, vmpl=0, **fake.attester_options()).get_evidence(digest)
    assert written["inblob"] == digest + bytes(16)
    assert written["privlevel"] == b"0"


def test_snp_without_certificates_uses_the_offline_store(tmp_path: Path) -> None:
    raw, vcek, report_data = _snp_e2e()
    fake = FakeTsm(tmp_path, "sev_guest", raw)
    evidence = SnpAttester(tmp_path, **fake.attester_options()).get_evidence(report_data)
    assert evidence["cert_chain"] is None
    with pytest.raises(AttestationError, match="no VCEK in cert_chain"):
        SnpVerifier(tmp_path / "empty-store").verify(evidence, report_data)
    report = AttestationReport.from_bytes(raw)
    t = report.tcbs["reported_tcb"]
    store = tmp_path / "kds"
    folder = store / "vcek" / report.get("chip_id").hex()
    folder.mkdir(parents=True)
    name = f"bl{t.bootloader:02d}_tee{t.tee:02d}_snp{t.snp:02d}_ucode{t.microcode:02d}_vcek.der"
    (folder / name).write_bytes(vcek)
    assert (
        SnpVerifier(store).verify(evidence, report_data).claims["report_data"] == report_data.hex()
    )


def test_snp_certificate_table_forms(tmp_path: Path) -> None:
    der = b"\x30\x03\x02\x01\x01"
    other = uuid.UUID("11111111-2222-3333-4444-555555555555")
    for le in (False, True):
        table = _table([(VCEK_GUID, der), (other, b"xyz")], guid_le=le)
        got = cert_table(table)
        assert got[0] == {"cert_type": "VCEK", "data": list(der)}
        assert list(got[1]["cert_type"]) == ["OTHER"]
    with pytest.raises(AttestationError, match="outside the"):
        cert_table(struct.pack("<16sII", VCEK_GUID.bytes, 48, 999) + bytes(24))
    with pytest.raises(AttestationError, match="no terminating all-zero entry"):
        cert_table(struct.pack("<16sII", VCEK_GUID.bytes, 24, 0))


def test_configfs_generation_race_is_retried_then_refused(tmp_path: Path) -> None:
    raw, _, report_data = _snp_e2e()
    fake = FakeTsm(tmp_path, "sev_guest", raw)
    fake.generation = 2  # another process wrote to the entry too
    with pytest.raises(AttestationError, match="generation changed"):
        SnpAttester(tmp_path, **fake.attester_options()).get_evidence(report_data)
    assert len(fake.entries) == 3  # bounded: three entries tried, none left behind
    assert not any(e.exists() for e in fake.entries)


def test_wrong_provider_and_missing_interfaces(tmp_path: Path) -> None:
    raw, _, report_data = _snp_e2e()
    (tmp_path / "a").mkdir()
    fake = FakeTsm(tmp_path / "a", "tdx_guest", raw)
    with pytest.raises(AttestationError, match="provider: expected sev_guest, found 'tdx_guest'"):
        SnpAttester(tmp_path / "a", **fake.attester_options()).get_evidence(report_data)
    with pytest.raises(AttestationError, match="not an SEV-SNP guest"):
        SnpAttester(tmp_path / "empty").get_evidence(report_data)
    with pytest.raises(AttestationError, match="need configfs-tsm"):
        TdxAttester(tmp_path / "empty").get_evidence(report_data)


@pytest.mark.parametrize(
    "name", ["tdx/tdx_quote_4.dat", "tdx/tdx_quote_5.dat", "tdx/tdx_quote_6.dat"]
)
def test_tdx_evidence_from_configfs_verifies(tmp_path: Path, name: str) -> None:
    raw = vector(name).read_bytes()
    report_data = Quote.from_bytes(raw).body["report_data"]
    fake = FakeTsm(tmp_path, "tdx_guest", raw)
    evidence = TdxAttester(tmp_path, **fake.attester_options()).get_evidence(report_data)
    assert evidence["cc_eventlog"] is None  # no CCEL table under this root
    assert base64.b64decode(evidence["quote"]) == raw
    claims = TdxVerifier().verify(evidence, report_data).claims
    assert claims["report_data"] == report_data.hex()


def test_tdx_event_log_is_the_ccel_plus_the_aa_entries(tmp_path: Path) -> None:
    ccel = vector("eventlog/CCEL_data").read_bytes()
    (tmp_path / "sys/firmware/acpi/tables/data").mkdir(parents=True)
    (tmp_path / "sys/firmware/acpi/tables/data/CCEL").write_bytes(ccel)
    text = b"github.com/confidential-containers PullImage {}"
    tagged = struct.pack("<II", 0x4141454C, len(text)) + text
    digest = hashlib.sha384(tagged).digest()
    entry = struct.pack("<IIIH", 4, 6, 1, 0x0C) + digest + struct.pack("<I", len(tagged)) + tagged
    aael = tmp_path / "aa.eventlog"
    aael.write_bytes(entry)
    raw = vector("tdx/tdx_quote_4.dat").read_bytes()
    fake = FakeTsm(tmp_path, "tdx_guest", raw)
    attester = TdxAttester(tmp_path, aa_eventlog=aael, **fake.attester_options())
    evidence = attester.get_evidence(Quote.from_bytes(raw).body["report_data"])
    log_bytes = base64.b64decode(evidence["cc_eventlog"])
    end = ccel_records_end(ccel)
    assert log_bytes == ccel[:end] + entry and end < len(ccel)
    log = EventLog.parse(log_bytes)
    assert len(log.events) == 6 and log.events[-1].index == 4
    rtmrs = log.replay_rtmrs()
    assert rtmrs[3] == hashlib.sha384(bytes(48) + digest).digest()
    assert rtmrs[0].hex().startswith("2dc712306a963ead")  # the CCEL's own RTMR0 is unchanged
    # the vector quote's RTMRs are not this log's: the verifier refuses the pair
    with pytest.raises(AttestationError, match="replay of RTMR"):
        TdxVerifier().verify(evidence, Quote.from_bytes(raw).body["report_data"])


def test_tdx_rtmr_extension_goes_to_the_measurement_file(tmp_path: Path) -> None:
    folder = tmp_path / "sys/class/misc/tdx_guest/measurements"
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"rtmr{i}:sha384").write_bytes(b"")
    attester = TdxAttester(tmp_path)
    digest = hashlib.sha384(b"x").digest()
    attester.extend_runtime_measurement(digest, 17)
    assert (folder / "rtmr3:sha384").read_bytes() == digest
    assert [pcr_to_mr(p) for p in (1, 7, 2, 6, 8, 15, 16, 17, 0)] == [1, 1, 2, 2, 3, 3, 4, 4, 4]
    with pytest.raises(AttestationError, match="48-byte"):
        attester.extend_runtime_measurement(b"short", 17)
    with pytest.raises(AttestationError, match="cannot extend RTMR3"):
        TdxAttester(tmp_path / "nothing").extend_runtime_measurement(digest, 17)


def test_registered_attesters() -> None:
    assert isinstance(get_attester("snp"), SnpAttester)
    assert isinstance(get_attester("tdx"), TdxAttester)


def _touch(root: Path, *rels: str) -> Path:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    return root


@pytest.mark.parametrize(
    ("files", "hcl", "tee"),
    [
        ((), None, "sample"),
        (("dev/tdx_guest",), None, "tdx"),
        (("dev/tdx_guest", "dev/tpmrm0"), 2, "tdx"),
        (("dev/sev-guest",), None, "snp"),
        (("dev/sev-guest", "dev/tpmrm0"), None, "snp"),
        (("dev/tpmrm0",), None, "tpm"),
        (("dev/tpm0",), None, "tpm"),
        (("dev/tpmrm0",), 2, "az-snp-vtpm"),
        (("dev/tpm0",), 4, "az-tdx-vtpm"),
        (("dev/tpm0",), 7, "tpm"),
    ],
)
def test_detect_tee(tmp_path: Path, files: tuple[str, ...], hcl: int | None, tee: str) -> None:
    probed: list[str] = []

    def probe(tcti: str) -> int | None:
        probed.append(tcti)
        return hcl

    assert detect_tee(_touch(tmp_path, *files), probe) == tee
    if any("tpm" in f for f in files) and "dev/tdx_guest" not in files:
        assert probed and probed[0].startswith("device:") and str(tmp_path) in probed[0]
