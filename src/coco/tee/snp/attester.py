"""SEV-SNP attester: the attestation report from configfs-tsm, or from ``/dev/sev-guest``.

Evidence is what :class:`~coco.tee.snp.verifier.SnpVerifier` (and upstream's) takes:
``{"attestation_report": <sev serde JSON>, "cert_chain": null | [{"cert_type", "data"}]}``. The
report data (48 bytes for SHA-384) is zero-padded to the 64-byte REPORT_DATA. The certificates come
from configfs-tsm's ``auxblob`` (the GHCB certificate table the host provides, often empty on
modern hosts); without them the verifier finds the VCEK in its offline store.
"""

from __future__ import annotations

import fcntl
import os
import struct
import uuid
from pathlib import Path
from typing import Any

from coco.errors import AttestationError
from coco.tee import tsm
from coco.tee._common import fit
from coco.tee.base import Attester
from coco.tee.snp.report import REPORT_SIZE, AttestationReport

DEVICE = Path("dev/sev-guest")
PROVIDER = "sev_guest"
# GHCB certificate table GUIDs -> sev crate CertType names
CERT_GUIDS = {
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ARK",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ASK",
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "VCEK",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "VLEK",
    uuid.UUID("92f81bc3-5811-4d3d-97ff-d19f88dc67ea"): "CRL",
}
_ENTRY = struct.Struct("<16sII")
# <linux/sev-guest.h>: SNP_GET_REPORT = _IOWR('S', 0x0, struct snp_guest_request_ioctl) (32 bytes)
SNP_GET_REPORT = (3 << 30) | (32 << 16) | (ord("S") << 8) | 0x0
_RESP_SIZE = 4000
_RESP_HEADER = 32  # MSG_REPORT_RSP: status u32, report_size u32, 24 reserved bytes


def cert_table(aux: bytes, where: str = "snp certificate table") -> list[dict[str, Any]]:
    """The GHCB certificate table (``{GUID, offset, length}`` entries up to an all-zero one) as
    the sev crate serializes it: ``[{"cert_type": "VCEK", "data": [DER bytes]}, ...]``."""
    out: list[dict[str, Any]] = []
    for pos in range(0, len(aux) - _ENTRY.size + 1, _ENTRY.size):
        guid, offset, length = _ENTRY.unpack_from(aux, pos)
        if guid == bytes(16) and offset == 0 and length == 0:
            return out
        if offset + length > len(aux):
            raise AttestationError(
                f"{where}: entry {len(out)}: offset {offset} + length {length} lies outside the "
                f"{len(aux)}-byte table"
            )
        ident = uuid.UUID(bytes=guid)
        kind: Any = CERT_GUIDS.get(ident) or CERT_GUIDS.get(uuid.UUID(bytes_le=guid))
        kind = kind or {"OTHER": str(ident)}
        out.append({"cert_type": kind, "data": list(aux[offset : offset + length])})
    raise AttestationError(f"{where}: no terminating all-zero entry in {len(aux)} bytes")


class SnpAttester(Attester):
    tee = "snp"

    def __init__(self, root: Path | str = "/", vmpl: int | None = None, **tsm_options: Any) -> None:
        self.root = Path(root)
        self.vmpl = vmpl
        self._tsm_options = tsm_options  # e.g. mkdir= for tests

    def report(self, report_data: bytes) -> tuple[bytes, bytes | None]:
        """The raw 1184-byte report and the certificate table (None when not given)."""
        data = fit(report_data, 64)
        if tsm.available(self.root):
            got = tsm.get_report(
                data, root=self.root, privlevel=self.vmpl, expect_provider=PROVIDER,
                **self._tsm_options,
            )  # fmt: skip
            return got.outblob, got.auxblob
        device = self.root / DEVICE
        if device.exists():
            return self._ioctl_report(device, data), None
        raise AttestationError(
            f"snp attester: neither configfs-tsm ({self.root / tsm.REPORT_DIR}) nor {device} "
            "is there: not an SEV-SNP guest?"
        )

    def _ioctl_report(self, device: Path, data: bytes) -> bytes:
        req = bytearray(data + struct.pack("<I", self.vmpl or 0) + bytes(28))
        resp = bytearray(_RESP_SIZE)
        req_buf = (ctypes_buffer(req), ctypes_buffer(resp))
        arg = bytearray(struct.pack("<B7xQQQ", 1, req_buf[0], req_buf[1], 0))
        try:
            fd = os.open(device, os.O_RDWR)
        except OSError as e:
            raise AttestationError(f"snp attester: cannot open {device}: {e.strerror}") from None
        try:
            fcntl.ioctl(fd, SNP_GET_REPORT, arg)
        except OSError as e:
            fw, vmm = struct.unpack_from("<II", arg, 24)
            raise AttestationError(
                f"snp attester: SNP_GET_REPORT on {device} failed: {e.strerror} "
                f"(firmware error 0x{fw:x}, VMM error 0x{vmm:x})"
            ) from None
        finally:
            os.close(fd)
        status, size = struct.unpack_from("<II", resp, 0)
        if status != 0 or size < REPORT_SIZE:
            raise AttestationError(
                f"snp attester: SNP_GET_REPORT: firmware status 0x{status:x}, report size {size}"
            )
        return bytes(resp[_RESP_HEADER : _RESP_HEADER + REPORT_SIZE])

    def get_evidence(self, report_data: bytes) -> dict[str, Any]:
        raw, aux = self.report(report_data)
        if len(raw) < REPORT_SIZE:
            raise AttestationError(
                f"snp attester: report: expected {REPORT_SIZE} bytes, got {len(raw)}"
            )
        report = AttestationReport.from_bytes(raw[:REPORT_SIZE], "snp attester: report")
        if report.get("report_data") != fit(report_data, 64):
            raise AttestationError(
                "snp attester: the report's REPORT_DATA is not the report data asked for "
                f"(expected {fit(report_data, 64).hex()}, got {report.get('report_data').hex()})"
            )
        chain = cert_table(aux, "snp attester: auxblob") if aux else None
        return {"attestation_report": report.to_json(), "cert_chain": chain or None}

    def host_data(self) -> bytes:
        """HOST_DATA of a fresh report: where the host put the init-data digest at launch."""
        raw, _ = self.report(bytes(64))
        return AttestationReport.from_bytes(raw[:REPORT_SIZE], "snp attester: report").get(
            "host_data"
        )


def ctypes_buffer(buf: bytearray) -> int:
    """The address of a bytearray's storage (for ioctl structures that point at buffers)."""
    import ctypes

    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
