"""TDX attester: a DCAP quote through configfs-tsm, the CC event log, runtime measurements (RTMRs).

Evidence is what :class:`~coco.tee.tdx.verifier.TdxVerifier` (and upstream's) takes:
``{"cc_eventlog": "<base64>" | null, "quote": "<base64 quote>"}``. The report data is zero-padded
to the 64-byte REPORTDATA. The event log is the firmware's CCEL ACPI table
(``/sys/firmware/acpi/tables/data/CCEL``, cut at its last record) followed by the Attestation
Agent's runtime-measurement entries (the AAEL file), so that the verifier's replay of RTMR[3]
covers them. Quotes need configfs-tsm (Linux 6.7+); ``/dev/tdx_guest``'s ``TDX_CMD_GET_REPORT0``
only gives the TDREPORT, which is enough to read MRCONFIGID (the init-data binding).
RTMRs are extended through ``/sys/class/misc/tdx_guest/measurements/rtmr<N>:sha384``.
"""

from __future__ import annotations

import base64
import fcntl
import os
import struct
from pathlib import Path
from typing import Any

from coco.errors import AttestationError
from coco.tee import tsm
from coco.tee._common import fit
from coco.tee.base import Attester
from coco.tee.tdx.quote import Quote

PROVIDER = "tdx_guest"
DEVICES = (Path("dev/tdx_guest"), Path("dev/tdx-guest"))
CCEL = Path("sys/firmware/acpi/tables/data/CCEL")
MEASUREMENTS = Path("sys/class/misc/tdx_guest/measurements")
# <linux/tdx-guest.h>: TDX_CMD_GET_REPORT0 = _IOWR('T', 1, struct tdx_report_req) (64 + 1024 bytes)
TDX_CMD_GET_REPORT0 = (3 << 30) | (1088 << 16) | (ord("T") << 8) | 1
TDREPORT_SIZE = 1024
TDREPORT_MRCONFIGID = 512 + 64  # TDINFO_STRUCT at 512, MRCONFIGID at +64
RUNTIME_ALGORITHM = "sha384"


def pcr_to_mr(pcr: int) -> int:
    """The CC measurement register index (1..4 = RTMR0..3) a TPM PCR maps to (upstream's map)."""
    if pcr in (1, 7):
        return 1
    if 2 <= pcr <= 6:
        return 2
    if 8 <= pcr <= 15:
        return 3
    return 4


def ccel_records_end(data: bytes) -> int:
    """The length of the used part of a CCEL table (header and TCG_PCR_EVENT2 records)."""
    if len(data) < 32:
        raise AttestationError(f"tdx attester: CCEL: {len(data)} bytes is too short for a header")
    (spec_size,) = struct.unpack_from("<I", data, 28)
    pos = 32 + spec_size
    spec = data[32 : 32 + spec_size]
    if len(spec) < 28:
        raise AttestationError("tdx attester: CCEL: truncated Spec ID event")
    (count,) = struct.unpack_from("<I", spec, 24)
    sizes = dict(struct.unpack_from("<HH", spec, 28 + 4 * i) for i in range(count))
    while len(data) - pos >= 12:
        index, etype, ndig = struct.unpack_from("<III", data, pos)
        if index == 0xFFFFFFFF or (index == 0 and etype == 0):
            break
        p = pos + 12
        for _ in range(ndig):
            (alg,) = struct.unpack_from("<H", data, p)
            if alg not in sizes:
                raise AttestationError(f"tdx attester: CCEL: undeclared digest algorithm 0x{alg:x}")
            p += 2 + sizes[alg]
        (size,) = struct.unpack_from("<I", data, p)
        pos = p + 4 + size
        if pos > len(data):
            raise AttestationError("tdx attester: CCEL: a record runs past the end of the table")
    return pos


class TdxAttester(Attester):
    tee = "tdx"
    runtime_measurement_algorithm = RUNTIME_ALGORITHM

    def __init__(
        self, root: Path | str = "/", aa_eventlog: Path | str | None = None, **tsm_options: Any
    ) -> None:
        self.root = Path(root)
        self.aa_eventlog = Path(aa_eventlog) if aa_eventlog else None
        self._tsm_options = tsm_options  # e.g. mkdir= for tests

    def quote(self, report_data: bytes) -> bytes:
        if not tsm.available(self.root):
            raise AttestationError(
                f"tdx attester: TDX quotes need configfs-tsm (Linux 6.7+): "
                f"{self.root / tsm.REPORT_DIR} is not there"
            )
        got = tsm.get_report(
            fit(report_data, 64), root=self.root, expect_provider=PROVIDER, **self._tsm_options
        )
        return got.outblob

    def event_log(self) -> bytes | None:
        """The CCEL records followed by the AA's runtime-measurement entries (None: no CCEL)."""
        path = self.root / CCEL
        if not path.exists():
            return None
        try:
            data = path.read_bytes()
            extra = (
                self.aa_eventlog.read_bytes()
                if self.aa_eventlog and self.aa_eventlog.exists()
                else b""
            )
        except OSError as e:
            raise AttestationError(f"tdx attester: cannot read the event log: {e}") from None
        return data[: ccel_records_end(data)] + extra

    def get_evidence(self, report_data: bytes) -> dict[str, Any]:
        raw = self.quote(report_data)
        quote = Quote.from_bytes(raw, "tdx attester: quote")
        if quote.body["report_data"] != fit(report_data, 64):
            raise AttestationError(
                "tdx attester: the quote's REPORTDATA is not the report data asked for "
                f"(expected {fit(report_data, 64).hex()}, got {quote.body['report_data'].hex()})"
            )
        log = self.event_log()
        return {
            "cc_eventlog": base64.b64encode(log).decode() if log is not None else None,
            "quote": base64.b64encode(raw).decode(),
        }

    def mr_config_id(self) -> bytes:
        """MRCONFIGID: the init-data digest the host set at launch (TDREPORT, else a quote)."""
        for dev in DEVICES:
            if (self.root / dev).exists():
                report = self._tdreport(self.root / dev, bytes(64))
                return report[TDREPORT_MRCONFIGID : TDREPORT_MRCONFIGID + 48]
        return Quote.from_bytes(self.quote(bytes(64)), "tdx attester: quote").body["mr_config_id"]

    @staticmethod
    def _tdreport(device: Path, report_data: bytes) -> bytes:
        buf = bytearray(report_data + bytes(TDREPORT_SIZE))
        try:
            fd = os.open(device, os.O_RDWR)
        except OSError as e:
            raise AttestationError(f"tdx attester: cannot open {device}: {e.strerror}") from None
        try:
            fcntl.ioctl(fd, TDX_CMD_GET_REPORT0, buf)
        except OSError as e:
            raise AttestationError(
                f"tdx attester: TDX_CMD_GET_REPORT0 on {device} failed: {e.strerror}"
            ) from None
        finally:
            os.close(fd)
        return bytes(buf[64:])

    def measurement_register(self, pcr: int) -> int:
        return pcr_to_mr(pcr)

    def extend_runtime_measurement(self, digest: bytes, pcr: int) -> None:
        """Extend the RTMR that ``pcr`` maps to with a SHA-384 ``digest``."""
        if len(digest) != 48:
            raise AttestationError(
                f"tdx attester: RTMR extend: expected a 48-byte SHA-384 digest, got {len(digest)} bytes"
            )
        rtmr = pcr_to_mr(pcr) - 1
        path = self.root / MEASUREMENTS / f"rtmr{rtmr}:sha384"
        try:
            with open(path, "wb", buffering=0) as f:
                f.write(digest)
        except OSError as e:
            raise AttestationError(
                f"tdx attester: cannot extend RTMR{rtmr} through {path}: {e.strerror} "
                "(needs Linux 6.16+ with the TDX guest driver)"
            ) from None
