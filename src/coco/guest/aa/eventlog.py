"""The Attestation Agent's runtime-measurement event log (AAEL), in upstream's current format.

Every ``ExtendRuntimeMeasurement(domain, operation, content)`` becomes:

1. the AAEL text ``"<domain> <operation> <content>"`` (no newline anywhere; domain and operation
   without spaces, since readers split on the first two);
2. a tagged event ``u32le 0x4141454C ("AAEL") ‖ u32le len(text) ‖ text``;
3. a TCG2 event entry, all little-endian: ``u32 target register ‖ u32 6 (EV_EVENT_TAG) ‖ u32 1 ‖
   u16 algorithm id ‖ digest ‖ u32 event size ‖ tagged event``, where digest = H(tagged event)
   with the measured register's hash (SHA-256 for a TPM PCR, SHA-384 for a TDX RTMR);
4. appended to the log file (fsync'd), and the register extended with the digest.

Crash safety: before appending, a write-ahead file records the log's length and the entry; it is
removed once the register is extended. At start, a left-over write-ahead file means the last
entry may be torn or its extension may not have happened: the log is cut back to the recorded
length and the event reported lost (the caller got no OK for it). :func:`replay` recomputes the
registers from a log, so a verifier (or a test) can compare them with the hardware's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from coco.guest.aa.config import AaError

log = logging.getLogger(__name__)

DEFAULT_PATH = Path("/run/attestation-agent/eventlog")
WAL_NAME = ".wal_event_entry"
AAEL_TAG = 0x4141454C
EV_EVENT_TAG = 6
ALGORITHM_IDS = {"sha256": 0x0B, "sha384": 0x0C, "sha512": 0x0D, "sm3": 0x12}
_IDS = {v: k for k, v in ALGORITHM_IDS.items()}


class EventLogError(AaError):
    """A runtime measurement that cannot be recorded, or a log that does not parse."""


def event_text(domain: str, operation: str, content: str) -> str:
    for name, value in (("domain", domain), ("operation", operation), ("content", content)):
        if "\n" in value or "\r" in value:
            raise EventLogError(f"runtime measurement {name}: must not contain a line break")
    for name, value in (("domain", domain), ("operation", operation)):
        if not value or " " in value:
            raise EventLogError(
                f"runtime measurement {name} {value!r}: expected a non-empty word without spaces"
            )
    return f"{domain} {operation} {content}"


def tagged_event(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<II", AAEL_TAG, len(data)) + data


def entry(text: str, register: int, algorithm: str) -> tuple[bytes, bytes]:
    """The TCG2 entry of one AAEL text, and the digest to extend the register with."""
    if algorithm not in ALGORITHM_IDS:
        raise EventLogError(
            f"event log algorithm: expected one of {', '.join(ALGORITHM_IDS)}, found {algorithm!r}"
        )
    event = tagged_event(text)
    digest = hashlib.new(algorithm, event).digest()
    head = struct.pack("<IIIH", register, EV_EVENT_TAG, 1, ALGORITHM_IDS[algorithm])
    return head + digest + struct.pack("<I", len(event)) + event, digest


@dataclass(frozen=True)
class Record:
    register: int
    algorithm: str
    digest: bytes
    text: str


def parse(data: bytes, where: str = "AA event log") -> list[Record]:
    out: list[Record] = []
    pos = 0
    while pos < len(data):
        try:
            register, etype, count, alg = struct.unpack_from("<IIIH", data, pos)
            name = _IDS.get(alg)
            if etype != EV_EVENT_TAG or count != 1 or name is None:
                raise EventLogError(
                    f"{where}: entry at offset {pos}: expected one digest of an EV_EVENT_TAG "
                    f"event, found type {etype}, {count} digest(s), algorithm 0x{alg:x}"
                )
            size = hashlib.new(name).digest_size
            digest = data[pos + 14 : pos + 14 + size]
            (esize,) = struct.unpack_from("<I", data, pos + 14 + size)
            event = data[pos + 18 + size : pos + 18 + size + esize]
            tag, tlen = struct.unpack_from("<II", event, 0)
        except struct.error:
            raise EventLogError(f"{where}: entry at offset {pos} is truncated") from None
        if len(event) != esize or tag != AAEL_TAG or tlen != esize - 8:
            raise EventLogError(f"{where}: entry at offset {pos} is not a whole AAEL event")
        if hashlib.new(name, event).digest() != digest:
            raise EventLogError(f"{where}: entry at offset {pos}: digest does not match its event")
        out.append(Record(register, name, digest, event[8:].decode("utf-8", "replace")))
        pos += 18 + size + esize
    return out


def replay(records: list[Record], initial: dict[int, bytes] | None = None) -> dict[int, bytes]:
    """Register values after the records: ``R = H(R || digest)`` from ``initial`` (default zeros)."""
    regs = dict(initial or {})
    for r in records:
        size = hashlib.new(r.algorithm).digest_size
        prev = regs.get(r.register, bytes(size))
        regs[r.register] = hashlib.new(r.algorithm, prev + r.digest).digest()
    return regs


class RuntimeEventLog:
    """The AAEL file and its write-ahead companion."""

    def __init__(self, path: Path | str = DEFAULT_PATH) -> None:
        self.path = Path(path)
        self.wal = self.path.with_name(WAL_NAME)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EventLogError(
                f"event log {self.path}: cannot create its directory: {e.strerror}"
            ) from None
        self._recover()

    def _recover(self) -> None:
        if not self.wal.exists():
            return
        try:
            offset = struct.unpack(">Q", self.wal.read_bytes()[:8])[0]
        except (OSError, struct.error):
            offset = None
        if offset is not None and self.path.exists() and self.path.stat().st_size >= offset:
            with open(self.path, "r+b") as f:
                f.truncate(offset)
                os.fsync(f.fileno())
            log.warning(
                "event log %s: an interrupted measurement was found and dropped (log cut back "
                "to %d bytes)", self.path, offset,
            )  # fmt: skip
        self.wal.unlink(missing_ok=True)

    def records(self) -> list[Record]:
        if not self.path.exists():
            return []
        return parse(self.path.read_bytes(), f"event log {self.path}")

    def append(self, text: str, register: int, algorithm: str, extend) -> bytes:
        """Record ``text`` for ``register`` and call ``extend(digest)``; returns the digest."""
        data, digest = entry(text, register, algorithm)
        try:
            offset = self.path.stat().st_size if self.path.exists() else 0
            _write_sync(self.wal, struct.pack(">Q", offset) + data)
            with open(self.path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise EventLogError(
                f"event log {self.path}: cannot record the measurement: {e}"
            ) from None
        try:
            extend(digest)
        except BaseException:
            self._recover()  # the register was not extended: the entry must go
            raise
        self.wal.unlink(missing_ok=True)
        return digest


def _write_sync(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
