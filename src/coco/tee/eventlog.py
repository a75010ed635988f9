"""The confidential-computing event log (CCEL ACPI table data, TCG crypto-agile format).

:meth:`EventLog.parse` reads the log (a ``Spec ID Event03`` header in the SHA-1 layout, then
``TCG_PCR_EVENT2`` records up to the first empty slot); :meth:`EventLog.replay_rtmrs` computes
the four TDX RTMRs (``RTMR[i] = H(RTMR[i] || digest)`` over events with MR index ``i + 1``;
index 0 is MRTD and is skipped); :meth:`EventLog.to_claims` gives upstream's ``uefi_event_logs``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from coco.errors import AttestationError
from coco.tee.binary import ByteReader

ALGORITHMS: dict[int, tuple[str, int]] = {
    0x0004: ("SHA-1", 20),
    0x000B: ("SHA-256", 32),
    0x000C: ("SHA-384", 48),
    0x000D: ("SHA-512", 64),
    0x0012: ("SM3", 32),
}

EV_NO_ACTION = 0x3
EVENT_TYPES: dict[int, str] = {
    0x0: "EV_PREBOOT_CERT",
    0x1: "EV_POST_CODE",
    0x2: "EV_UNUSED",
    0x3: "EV_NO_ACTION",
    0x4: "EV_SEPARATOR",
    0x5: "EV_ACTION",
    0x6: "EV_EVENT_TAG",
    0x7: "EV_S_CRTM_CONTENTS",
    0x8: "EV_S_CRTM_VERSION",
    0x9: "EV_CPU_MICROCODE",
    0xA: "EV_PLATFORM_CONFIG_FLAGS",
    0xB: "EV_TABLE_OF_DEVICES",
    0xC: "EV_COMPACT_HASH",
    0xD: "EV_IPL",
    0xE: "EV_IPL_PARTITION_DATA",
    0xF: "EV_NONHOST_CODE",
    0x10: "EV_NONHOST_CONFIG",
    0x11: "EV_NONHOST_INFO",
    0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x13: "EV_POST_CODE2",
    0x80000000: "EV_EFI_EVENT_BASE",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x8000000D: "EV_EFI_GPT_EVENT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}
_STRING_TYPES = {0x1, 0x5, 0x8, 0xA, 0x80000007}
EV_IPL = 0xD
_VARIABLE_TYPES = {0x80000001, 0x80000002, 0x8000000C, 0x800000E0}
_DESCRIBED_TYPES = {0x8000000A, 0x8000000B}  # u8 length + description first
_IMAGE_TYPES = {0x80000003, 0x80000004, 0x80000005}  # UEFI_IMAGE_LOAD_EVENT
AAEL_TAG = 0x4141454C  # "AAEL": CoCo attestation-agent event log entries
_HASHES = {
    "SHA-1": "sha1",
    "SHA-256": "sha256",
    "SHA-384": "sha384",
    "SHA-512": "sha512",
    "SM3": "sm3",
}


@dataclass(frozen=True)
class Event:
    index: int  # the CC measurement register index (TDX: 0 MRTD, 1..4 RTMR0..3)
    event_type: int
    digests: list[tuple[str, bytes]]
    data: bytes

    @property
    def type_name(self) -> str:
        return EVENT_TYPES.get(self.event_type, f"UNKNOWN_0x{self.event_type:x}")

    def digest(self, alg: str) -> bytes | None:
        return next((d for a, d in self.digests if a == alg), None)

    def details(self) -> dict[str, Any]:
        return _details(self.event_type, self.data)

    def digest_matches_event(self) -> bool:
        if not self.digests:
            return False
        alg, digest = self.digests[0]
        try:
            h = hashlib.new(_HASHES[alg])
        except (KeyError, ValueError):
            return False
        h.update(self.data)
        return h.digest() == digest


@dataclass(frozen=True)
class EventLog:
    events: list[Event]
    algorithms: dict[int, int]  # alg id -> digest size, from the Spec ID event

    @classmethod
    def parse(cls, data: bytes, where: str = "event log") -> EventLog:
        cur = ByteReader(data, where)
        # header: TCG_PCR_EVENT (SHA-1 layout) carrying TCG_EfiSpecIDEvent
        cur.u32("header pcr index")
        header_type = cur.u32("header event type")
        cur.take(20, "header digest")
        spec = cur.take(cur.u32("header event size"), "header event")
        if header_type != EV_NO_ACTION or not spec.startswith(b"Spec ID Event03\0"):
            raise AttestationError(
                f"{where}: expected a 'Spec ID Event03' EV_NO_ACTION header, "
                f"got event type 0x{header_type:x}"
            )
        sc = ByteReader(spec, f"{where}: Spec ID event")
        sc.take(16 + 4 + 4, "signature, platform class, versions and uintn size")
        algorithms: dict[int, int] = {}
        for _ in range(sc.u32("number of algorithms")):
            alg, size = sc.u16("algorithm id"), sc.u16("digest size")
            algorithms[alg] = size
        events: list[Event] = []
        while len(data) - cur.pos >= 8:
            index, etype = struct.unpack_from("<II", data, cur.pos)
            if index == 0xFFFFFFFF or (index == 0 and etype == 0):
                break  # the unused tail of the ACPI table area
            cur.pos += 8
            digests: list[tuple[str, bytes]] = []
            count = cur.u32("digest count")
            if count > len(algorithms):
                raise AttestationError(
                    f"{where}: event {len(events)}: {count} digests, the header declares "
                    f"{len(algorithms)} algorithm(s)"
                )
            for _ in range(count):
                alg = cur.u16("digest algorithm")
                if alg not in algorithms:
                    raise AttestationError(
                        f"{where}: event {len(events)}: digest algorithm 0x{alg:x} not declared "
                        "in the header"
                    )
                name = ALGORITHMS.get(alg, (f"0x{alg:04x}", 0))[0]
                digests.append((name, cur.take(algorithms[alg], "digest")))
            event_data = cur.take(cur.u32("event size"), "event data")
            events.append(Event(index=index, event_type=etype, digests=digests, data=event_data))
        return cls(events=events, algorithms=algorithms)

    def replay_rtmrs(self, alg: str = "SHA-384") -> list[bytes]:
        """The four RTMR values this log produces (events on index 0 and EV_NO_ACTION skipped)."""
        size = hashlib.new(_HASHES[alg]).digest_size
        rtmrs = [bytes(size)] * 4
        for n, ev in enumerate(self.events):
            if ev.event_type == EV_NO_ACTION or not 1 <= ev.index <= 4:
                continue
            digest = ev.digest(alg)
            if digest is None:
                raise AttestationError(f"event log: event {n} has no {alg} digest to replay")
            h = hashlib.new(_HASHES[alg])
            h.update(rtmrs[ev.index - 1] + digest)
            rtmrs[ev.index - 1] = h.digest()
        return rtmrs

    def to_claims(self) -> list[dict[str, Any]]:
        return [
            {
                "index": ev.index,
                "type_name": ev.type_name,
                "digests": [{"alg": a, "digest": d.hex()} for a, d in ev.digests],
                "event": base64.b64encode(ev.data).decode(),
                "details": ev.details(),
                "digest_matches_event": ev.digest_matches_event(),
            }
            for ev in self.events
        ]


# -- event details -------------------------------------------------------------------------------


def _text(raw: bytes) -> str:
    """Printable text: valid UTF-8 split at control characters and joined by single spaces."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    parts, word = [], []
    for ch in text:
        if ch.isprintable() or ch == " ":
            word.append(ch)
        elif word:
            parts.append("".join(word))
            word = []
    if word:
        parts.append("".join(word))
    return " ".join(p for p in parts if p)


def _ipl_text(raw: bytes) -> str:
    """An EV_IPL string: UTF-16LE section names (``.linux``, shown without the dot) or a
    NUL-terminated UTF-8 string (GRUB commands), cut at the first NUL."""
    if len(raw) >= 4 and len(raw) % 2 == 0 and not any(raw[1::2]):
        return raw.decode("utf-16-le").split("\0", 1)[0].lstrip(".")
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _guid(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _details(etype: int, data: bytes) -> dict[str, Any]:
    try:
        if etype in _STRING_TYPES:
            return {"string": _text(data)}
        if etype == EV_IPL:
            return {"string": _ipl_text(data)}
        if etype in _DESCRIBED_TYPES and data:
            return {"string": _text(data[1 : 1 + data[0]])}
        if etype in _VARIABLE_TYPES and len(data) >= 32:
            name_len, data_len = struct.unpack_from("<QQ", data, 16)
            name_end = 32 + 2 * name_len
            if name_end + data_len > len(data):
                return {}
            return {
                "unicode_name": data[32:name_end].decode("utf-16-le"),
                "unicode_name_length": name_len,
                "variable_data": base64.b64encode(data[name_end : name_end + data_len]).decode(),
                "variable_data_length": data_len,
                "variable_name": _guid(data[:16]),
            }
        if etype in _IMAGE_TYPES and len(data) >= 32:
            (length,) = struct.unpack_from("<Q", data, 24)
            paths = _device_paths(data[32 : 32 + length])
            return {"device_paths": paths} if paths else {}
        if etype == 0x6 and len(data) >= 8:
            tag, size = struct.unpack_from("<II", data, 0)
            body = data[8 : 8 + size]
            if tag == AAEL_TAG:
                return _aael(body)
            return {"string": _text(body)}
    except (UnicodeDecodeError, struct.error):
        return {}
    return {}


def _efi_guid(raw: bytes) -> str:
    """An EFI_GUID in its registry form (first three fields little-endian), upper case."""
    a, b, c = struct.unpack_from("<IHH", raw)
    return f"{a:08X}-{b:04X}-{c:04X}-{raw[8:10].hex().upper()}-{raw[10:16].hex().upper()}"


def _eisa_id(value: int) -> str:
    vendor = value & 0xFFFF
    letters = "".join(chr(((vendor >> s) & 0x1F) + ord("A") - 1) for s in (10, 5, 0))
    return f"{letters}{value >> 16:04X}"


def _device_paths(raw: bytes) -> list[str]:
    """UEFI device-path nodes as text, up to the end node; unknown nodes as Path(type,sub,hex)."""
    out: list[str] = []
    pos = 0
    while pos + 4 <= len(raw):
        kind, sub, length = struct.unpack_from("<BBH", raw, pos)
        if kind == 0x7F or length < 4 or pos + length > len(raw):
            break
        body = raw[pos + 4 : pos + length]
        pos += length
        if kind == 2 and sub == 1 and len(body) == 8:
            hid, uid = struct.unpack("<II", body)
            out.append(f"ACPI({_eisa_id(hid)},{uid})")
        elif kind == 1 and sub == 1 and len(body) == 2:
            out.append(f"Pci({body[0]},{body[1]})")
        elif kind == 4 and sub == 1 and len(body) == 38:
            part, start, size = struct.unpack_from("<IQQ", body)
            sig_type = body[37]
            if sig_type == 2:
                sig = _efi_guid(body[20:36])
                out.append(f"HD({part},GPT,{sig},0x{start:x},0x{size:x})")
            else:
                sig = f"0x{struct.unpack_from('<I', body, 20)[0]:08x}"
                out.append(f"HD({part},MBR,{sig},0x{start:x},0x{size:x})")
        elif kind == 4 and sub == 3 and len(body) >= 16:
            out.append(f"VenMedia({_efi_guid(body[:16])},{body[16:].hex()})")
        elif kind == 4 and sub == 4:
            out.append(f"File({body.decode('utf-16-le').rstrip(chr(0))})")
        else:
            out.append(f"Path({kind},{sub},{body.hex()})")
    return out


def _aael(body: bytes) -> dict[str, Any]:
    text = body.decode("utf-8")
    out: dict[str, Any] = {"string": text, "unicode_name": "AAEL"}
    parts = text.split(" ", 2)
    if len(parts) == 3:
        domain, operation, content = parts
        value: Any = content
        try:
            parsed = json.loads(content)
            if isinstance(parsed, dict | list):
                value = parsed
        except ValueError:
            pass
        out["data"] = {"domain": domain, "operation": operation, "content": value}
    return out
