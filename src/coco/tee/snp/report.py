"""The SEV-SNP ATTESTATION_REPORT: its 1184-byte binary layout and its serde JSON form.

The guest sends the report as the JSON the ``sev`` crate serializes; the signature covers the
binary form, so :meth:`AttestationReport.from_json` rebuilds the exact bytes and
:meth:`AttestationReport.signed_bytes` returns the signed part ``[0x000, 0x2A0)``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from coco.errors import AttestationError
from coco.tee._common import byte_array, check_keys, get_int, get_object

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
SIG_COMPONENT = 72  # r and s: little-endian, zero-padded to 72 bytes

MILAN, GENOA, TURIN = "Milan", "Genoa", "Turin"


def generation(family: int, model: int) -> str | None:
    """The processor generation named by CPUID family/model, or None if unknown."""
    if family == 0x19 and model <= 0x0F:
        return MILAN
    if family == 0x19 and (0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF):
        return GENOA
    if family == 0x1A and model <= 0x11:
        return TURIN
    return None


@dataclass(frozen=True)
class TcbVersion:
    """A TCB_VERSION: security patch levels of each firmware component."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None  # Turin only

    @classmethod
    def from_bytes(cls, raw: bytes, turin: bool) -> TcbVersion:
        if turin:
            return cls(fmc=raw[0], bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7])
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def to_bytes(self, turin: bool) -> bytes:
        if turin:
            return bytes(
                [self.fmc or 0, self.bootloader, self.tee, self.snp, 0, 0, 0, self.microcode]
            )
        return bytes([self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode])

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str, turin: bool) -> TcbVersion:
        check_keys(obj, ["bootloader", "tee", "snp", "microcode"], ["fmc"], where)
        fmc = obj.get("fmc")
        if fmc is not None:
            fmc = get_int(obj, "fmc", where, 8)
        if turin and fmc is None:
            raise AttestationError(f"{where}.fmc: expected an integer for a Turin report, got null")
        if not turin and fmc is not None:
            raise AttestationError(f"{where}.fmc: expected null before Turin, got {fmc}")
        return cls(
            bootloader=get_int(obj, "bootloader", where, 8),
            tee=get_int(obj, "tee", where, 8),
            snp=get_int(obj, "snp", where, 8),
            microcode=get_int(obj, "microcode", where, 8),
            fmc=fmc,
        )


@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    build: int


# (name, offset, size) of the plain byte-string fields
_BYTES_FIELDS = [
    ("family_id", 0x010, 16),
    ("image_id", 0x020, 16),
    ("report_data", 0x050, 64),
    ("measurement", 0x090, 48),
    ("host_data", 0x0C0, 32),
    ("id_key_digest", 0x0E0, 48),
    ("author_key_digest", 0x110, 48),
    ("report_id", 0x140, 32),
    ("report_id_ma", 0x160, 32),
    ("chip_id", 0x1A0, 64),
]
_TCB_FIELDS = [
    ("current_tcb", 0x038),
    ("reported_tcb", 0x180),
    ("committed_tcb", 0x1E0),
    ("launch_tcb", 0x1F0),
]


@dataclass(frozen=True)
class AttestationReport:
    """One SNP attestation report (versions 2 to 5)."""

    raw: bytes = field(repr=False)
    version: int
    guest_svn: int
    policy: int
    vmpl: int
    sig_algo: int
    plat_info: int
    key_info: int
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    current: Version
    committed: Version
    tcbs: dict[str, TcbVersion]
    fields: dict[str, bytes]
    signature_r: bytes
    signature_s: bytes

    # -- accessors ---------------------------------------------------------------------------
    def get(self, name: str) -> bytes:
        """A byte-string field by its name (``measurement``, ``report_data``, ``chip_id``...)."""
        return self.fields[name]

    @property
    def generation(self) -> str | None:
        if self.cpuid_fam_id is None or self.cpuid_mod_id is None:
            return None
        return generation(self.cpuid_fam_id, self.cpuid_mod_id)

    @property
    def signing_key(self) -> str:
        """Which key signed: ``VCEK`` (0), ``VLEK`` (1) or ``none`` (7)."""
        return {0: "VCEK", 1: "VLEK", 7: "none"}.get((self.key_info >> 2) & 7, "reserved")

    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    # -- binary ------------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, raw: bytes, where: str = "snp report") -> AttestationReport:
        if len(raw) != REPORT_SIZE:
            raise AttestationError(
                f"{where}: expected {REPORT_SIZE} bytes, got {len(raw)} (truncated or padded)"
            )
        version, guest_svn, policy = struct.unpack_from("<IIQ", raw, 0)
        if not 2 <= version <= 5:
            raise AttestationError(f"{where}: version: expected 2 to 5, got {version}")
        vmpl, sig_algo = struct.unpack_from("<II", raw, 0x30)
        plat_info, key_info = struct.unpack_from("<QI", raw, 0x40)
        if version >= 3:
            fam, mod, step = raw[0x188], raw[0x189], raw[0x18A]
            turin = generation(fam, mod) == TURIN
        else:
            fam = mod = step = None
            turin = False
        tcbs = {n: TcbVersion.from_bytes(raw[o : o + 8], turin) for n, o in _TCB_FIELDS}
        cur = Version(major=raw[0x1EA], minor=raw[0x1E9], build=raw[0x1E8])
        com = Version(major=raw[0x1EE], minor=raw[0x1ED], build=raw[0x1EC])
        fields = {n: raw[o : o + s] for n, o, s in _BYTES_FIELDS}
        return cls(
            raw=bytes(raw),
            version=version,
            guest_svn=guest_svn,
            policy=policy,
            vmpl=vmpl,
            sig_algo=sig_algo,
            plat_info=plat_info,
            key_info=key_info,
            cpuid_fam_id=fam,
            cpuid_mod_id=mod,
            cpuid_step=step,
            current=cur,
            committed=com,
            tcbs=tcbs,
            fields=fields,
            signature_r=raw[0x2A0 : 0x2A0 + SIG_COMPONENT],
            signature_s=raw[0x2E8 : 0x2E8 + SIG_COMPONENT],
        )

    # -- serde JSON --------------------------------------------------------------------------
    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = "attestation_report") -> AttestationReport:
        """Rebuild the binary report from the ``sev`` crate's serde JSON, strictly."""
        required = [
            "version", "guest_svn", "policy", "family_id", "image_id", "vmpl", "sig_algo",
            "current_tcb", "plat_info", "key_info", "report_data", "measurement", "host_data",
            "id_key_digest", "author_key_digest", "report_id", "report_id_ma", "reported_tcb",
            "chip_id", "committed_tcb", "current", "committed", "launch_tcb", "signature",
        ]  # fmt: skip
        optional = ["cpuid_fam_id", "cpuid_mod_id", "cpuid_step", "launch_mit_vector",
                    "current_mit_vector"]  # fmt: skip
        check_keys(obj, required, optional, where)
        version = get_int(obj, "version", where, 32)
        if not 2 <= version <= 5:
            raise AttestationError(f"{where}.version: expected 2 to 5, got {version}")
        raw = bytearray(REPORT_SIZE)
        struct.pack_into(
            "<IIQ",
            raw,
            0,
            version,
            get_int(obj, "guest_svn", where, 32),
            get_int(obj, "policy", where, 64),
        )
        struct.pack_into(
            "<II", raw, 0x30, get_int(obj, "vmpl", where, 32), get_int(obj, "sig_algo", where, 32)
        )
        struct.pack_into(
            "<QI",
            raw,
            0x40,
            get_int(obj, "plat_info", where, 64),
            get_int(obj, "key_info", where, 32),
        )
        turin = False
        if version >= 3:
            for name, off in (
                ("cpuid_fam_id", 0x188),
                ("cpuid_mod_id", 0x189),
                ("cpuid_step", 0x18A),
            ):
                if obj.get(name) is None:
                    raise AttestationError(
                        f"{where}.{name}: required from report version 3, missing"
                    )
                raw[off] = get_int(obj, name, where, 8)
            turin = generation(raw[0x188], raw[0x189]) == TURIN
        else:
            for name in ("cpuid_fam_id", "cpuid_mod_id", "cpuid_step"):
                if obj.get(name) is not None:
                    raise AttestationError(f"{where}.{name}: not part of a version 2 report")
        for name, off, size in _BYTES_FIELDS:
            raw[off : off + size] = byte_array(obj[name], f"{where}.{name}", size)
        for name, off in _TCB_FIELDS:
            tcb = TcbVersion.from_json(get_object(obj, name, where), f"{where}.{name}", turin)
            raw[off : off + 8] = tcb.to_bytes(turin)
        for name, off in (("current", 0x1E8), ("committed", 0x1EC)):
            v = get_object(obj, name, where)
            w = f"{where}.{name}"
            check_keys(v, ["major", "minor", "build"], [], w)
            raw[off : off + 3] = bytes(
                [get_int(v, "build", w, 8), get_int(v, "minor", w, 8), get_int(v, "major", w, 8)]
            )
        for name, off in (("launch_mit_vector", 0x1F8), ("current_mit_vector", 0x200)):
            if obj.get(name) is not None:
                if version < 5:
                    raise AttestationError(
                        f"{where}.{name}: only in report version 5, got version {version}"
                    )
                struct.pack_into("<Q", raw, off, get_int(obj, name, where, 64))
        sig = get_object(obj, "signature", where)
        check_keys(sig, ["r", "s"], [], f"{where}.signature")
        raw[0x2A0 : 0x2A0 + SIG_COMPONENT] = byte_array(
            sig["r"], f"{where}.signature.r", SIG_COMPONENT
        )
        raw[0x2E8 : 0x2E8 + SIG_COMPONENT] = byte_array(
            sig["s"], f"{where}.signature.s", SIG_COMPONENT
        )
        return cls.from_bytes(bytes(raw), where)

    def to_json(self) -> dict[str, Any]:
        """The ``sev`` crate's serde JSON of this report (the inverse of :meth:`from_json`)."""
        turin = self.generation == TURIN

        def tcb(t: TcbVersion) -> dict[str, Any]:
            return {
                "fmc": t.fmc if turin else None,
                "bootloader": t.bootloader,
                "tee": t.tee,
                "snp": t.snp,
                "microcode": t.microcode,
            }

        def ver(v: Version) -> dict[str, int]:
            return {"major": v.major, "minor": v.minor, "build": v.build}

        out: dict[str, Any] = {
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": self.policy,
            "family_id": list(self.fields["family_id"]),
            "image_id": list(self.fields["image_id"]),
            "vmpl": self.vmpl,
            "sig_algo": self.sig_algo,
            "current_tcb": tcb(self.tcbs["current_tcb"]),
            "plat_info": self.plat_info,
            "key_info": self.key_info,
        }
        for name in ("report_data", "measurement", "host_data", "id_key_digest",
                     "author_key_digest", "report_id", "report_id_ma"):  # fmt: skip
            out[name] = list(self.fields[name])
        out["reported_tcb"] = tcb(self.tcbs["reported_tcb"])
        if self.version >= 3:
            out["cpuid_fam_id"] = self.cpuid_fam_id
            out["cpuid_mod_id"] = self.cpuid_mod_id
            out["cpuid_step"] = self.cpuid_step
        out["chip_id"] = list(self.fields["chip_id"])
        out["committed_tcb"] = tcb(self.tcbs["committed_tcb"])
        out["current"] = ver(self.current)
        out["committed"] = ver(self.committed)
        out["launch_tcb"] = tcb(self.tcbs["launch_tcb"])
        if self.version >= 5:
            out["launch_mit_vector"], out["current_mit_vector"] = struct.unpack_from(
                "<QQ", self.raw, 0x1F8
            )
        out["signature"] = {"r": list(self.signature_r), "s": list(self.signature_s)}
        return out
