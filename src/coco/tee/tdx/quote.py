"""The Intel TDX DCAP quote (versions 4 and 5): header, TD report body, ECDSA signature data.

All integers are little-endian. The attestation key signs every byte before ``sig_data_len``;
the signature data carries that key, the Quoting Enclave's report (signed by the PCK key) with
its authentication data, and the PEM PCK certificate chain.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from coco.errors import AttestationError
from coco.tee.binary import ByteReader

HEADER_SIZE = 48
BODY_10_SIZE = 584  # TDX 1.0 TD report body
BODY_15_SIZE = 648  # TDX 1.5: + tee_tcb_svn2, mr_servicetd
QE_REPORT_SIZE = 384
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
TEE_TYPE_TDX = 0x81
ATT_KEY_ECDSA_P256 = 2
CERT_TYPE_QE_REPORT = 6
CERT_TYPE_PCK_CHAIN = 5

HEADER_FIELDS = [
    ("version", 0, 2),
    ("att_key_type", 2, 2),
    ("tee_type", 4, 4),
    ("reserved", 8, 4),
    ("vendor_id", 12, 16),
    ("user_data", 28, 20),
]
BODY_FIELDS = [
    ("tcb_svn", 0, 16),
    ("mr_seam", 16, 48),
    ("mrsigner_seam", 64, 48),
    ("seam_attributes", 112, 8),
    ("td_attributes", 120, 8),
    ("xfam", 128, 8),
    ("mr_td", 136, 48),
    ("mr_config_id", 184, 48),
    ("mr_owner", 232, 48),
    ("mr_owner_config", 280, 48),
    ("rtmr_0", 328, 48),
    ("rtmr_1", 376, 48),
    ("rtmr_2", 424, 48),
    ("rtmr_3", 472, 48),
    ("report_data", 520, 64),
]
BODY_15_FIELDS = [("tee_tcb_svn2", 584, 16), ("mr_servicetd", 600, 48)]


@dataclass(frozen=True)
class QeReport:
    """The 384-byte SGX report body of the Quoting Enclave."""

    raw: bytes = field(repr=False)

    @property
    def cpu_svn(self) -> bytes:
        return self.raw[0:16]

    @property
    def misc_select(self) -> int:
        return int(struct.unpack_from("<I", self.raw, 16)[0])

    @property
    def attributes(self) -> bytes:
        return self.raw[48:64]

    @property
    def mr_enclave(self) -> bytes:
        return self.raw[64:96]

    @property
    def mr_signer(self) -> bytes:
        return self.raw[128:160]

    @property
    def isv_prod_id(self) -> int:
        return int(struct.unpack_from("<H", self.raw, 256)[0])

    @property
    def isv_svn(self) -> int:
        return int(struct.unpack_from("<H", self.raw, 258)[0])

    @property
    def report_data(self) -> bytes:
        return self.raw[320:384]


@dataclass(frozen=True)
class Quote:
    raw: bytes = field(repr=False)
    version: int
    header: dict[str, bytes]
    body: dict[str, bytes]
    body_type: int | None  # v5 only: 2 (TDX 1.0) or 3 (TDX 1.5)
    body_size: int | None
    signed: bytes = field(repr=False)
    signature: bytes  # r || s, 64 bytes
    attestation_key: bytes  # x || y, 64 bytes
    qe_report: QeReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes = field(repr=False)

    @property
    def td_attributes(self) -> int:
        return int.from_bytes(self.body["td_attributes"], "little")

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "tdx quote") -> Quote:
        r = ByteReader(data, where)
        header_raw = r.take(HEADER_SIZE, "header")
        header = {n: header_raw[o : o + s] for n, o, s in HEADER_FIELDS}
        version, key_type, tee_type = struct.unpack_from("<HHI", header_raw, 0)
        if version not in (4, 5):
            raise AttestationError(f"{where}: header.version: expected 4 or 5, got {version}")
        if key_type != ATT_KEY_ECDSA_P256:
            raise AttestationError(
                f"{where}: header.att_key_type: expected 2 (ECDSA P-256), got {key_type}"
            )
        if tee_type != TEE_TYPE_TDX:
            raise AttestationError(
                f"{where}: header.tee_type: expected 0x81 (TDX), got 0x{tee_type:x}"
            )
        if header["vendor_id"] != INTEL_QE_VENDOR_ID:
            raise AttestationError(
                f"{where}: header.vendor_id: expected {INTEL_QE_VENDOR_ID.hex()} (Intel QE), "
                f"got {header['vendor_id'].hex()}"
            )
        body_type = body_size = None
        if version == 4:
            body_raw = r.take(BODY_10_SIZE, "body")
        else:
            body_type = r.u16("body type")
            body_size = r.u32("body size")
            expected = {2: BODY_10_SIZE, 3: BODY_15_SIZE}.get(body_type)
            if expected is None:
                raise AttestationError(
                    f"{where}: body type: expected 2 (TDX 1.0) or 3 (TDX 1.5), got {body_type}"
                )
            if body_size != expected:
                raise AttestationError(
                    f"{where}: body size: expected {expected} for type {body_type}, got {body_size}"
                )
            body_raw = r.take(body_size, "body")
        fields = BODY_FIELDS + (BODY_15_FIELDS if len(body_raw) == BODY_15_SIZE else [])
        body = {n: body_raw[o : o + s] for n, o, s in fields}
        signed = data[: r.pos]
        sig_len = r.u32("signature data length")
        sig = ByteReader(r.take(sig_len, "signature data"), f"{where}: signature data")
        if r.pos != len(data) and any(data[r.pos :]):
            raise AttestationError(
                f"{where}: {len(data) - r.pos} unexpected non-zero bytes after the signature data"
            )
        signature = sig.take(64, "ECDSA signature")
        att_key = sig.take(64, "attestation key")
        cert_type = sig.u16("certification data type")
        if cert_type != CERT_TYPE_QE_REPORT:
            raise AttestationError(
                f"{where}: certification data type: expected 6 (QE report), got {cert_type}"
            )
        cert_len = sig.u32("certification data size")
        qe = ByteReader(sig.take(cert_len, "QE report certification data"), f"{where}: QE data")
        qe_report = QeReport(qe.take(QE_REPORT_SIZE, "QE report"))
        qe_sig = qe.take(64, "QE report signature")
        auth = qe.take(qe.u16("QE authentication data size"), "QE authentication data")
        inner_type = qe.u16("PCK certification data type")
        if inner_type != CERT_TYPE_PCK_CHAIN:
            raise AttestationError(
                f"{where}: QE certification data type: expected 5 (PCK chain), got {inner_type}"
            )
        chain = qe.take(qe.u32("PCK chain size"), "PCK certificate chain")
        return cls(
            raw=bytes(data),
            version=version,
            header=header,
            body=body,
            body_type=body_type,
            body_size=body_size,
            signed=signed,
            signature=signature,
            attestation_key=att_key,
            qe_report=qe_report,
            qe_report_signature=qe_sig,
            qe_auth_data=auth,
            pck_chain_pem=chain.rstrip(b"\0"),
        )
