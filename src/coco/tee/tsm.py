"""Linux configfs-tsm: the kernel's one interface to TEE reports (``/sys/kernel/config/tsm/report``).

A report is asked for by creating an entry (``mkdir``), writing up to 64 bytes of report data to
its ``inblob``, reading ``outblob`` (the SNP attestation report, or the TDX quote) and ``auxblob``
(SNP: the certificate table), and removing the entry (``rmdir``). The kernel counts writes to the
entry in ``generation``: a value other than our own writes means another process wrote to the
same entry meanwhile, and the report is asked for again (a bounded number of times).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coco.errors import AttestationError

REPORT_DIR = Path("sys/kernel/config/tsm/report")  # under the root, "/" on a real guest
INBLOB_SIZE = 64
ATTEMPTS = 3


@dataclass(frozen=True)
class TsmReport:
    provider: str  # "sev_guest", "tdx_guest", ...
    outblob: bytes
    auxblob: bytes | None  # None when the provider has no auxblob


def available(root: Path = Path("/")) -> bool:
    return (root / REPORT_DIR).is_dir()


def get_report(
    inblob: bytes,
    *,
    root: Path = Path("/"),
    privlevel: int | None = None,
    expect_provider: str | None = None,
    mkdir: Callable[[Path], None] = os.mkdir,
) -> TsmReport:
    """One report for ``inblob`` (at most 64 bytes). ``privlevel``: SNP's VMPL to ask for.

    ``mkdir`` creates the entry (``os.mkdir``: the kernel populates it); tests pass a function
    that makes a directory behaving like a configfs entry.
    """
    base = root / REPORT_DIR
    if len(inblob) > INBLOB_SIZE:
        raise AttestationError(
            f"configfs-tsm: report data: expected at most {INBLOB_SIZE} bytes, got {len(inblob)}"
        )
    if not base.is_dir():
        raise AttestationError(
            f"configfs-tsm: {base} is not there (needs Linux 6.7+ with configfs mounted and the "
            "TEE's guest driver loaded)"
        )
    for _ in range(ATTEMPTS):
        entry = base / f"coco-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            mkdir(entry)
        except OSError as e:
            raise AttestationError(f"configfs-tsm: cannot create {entry}: {e.strerror}") from None
        try:
            report = _read_entry(entry, inblob, privlevel, expect_provider)
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(entry)
        if report is not None:
            return report
    raise AttestationError(
        f"configfs-tsm: {base}: the report entry was written by someone else during each of "
        f"{ATTEMPTS} attempts (generation changed): giving up"
    )


def _read_entry(
    entry: Path, inblob: bytes, privlevel: int | None, expect_provider: str | None
) -> TsmReport | None:
    provider = _read(entry / "provider", entry).decode(errors="replace").strip()
    if expect_provider is not None and provider != expect_provider:
        raise AttestationError(
            f"configfs-tsm: {entry}: provider: expected {expect_provider}, found {provider!r}"
        )
    writes = 0
    if privlevel is not None:
        _write(entry / "privlevel", str(privlevel).encode(), entry)
        writes += 1
    _write(entry / "inblob", inblob, entry)
    writes += 1
    outblob = _read(entry / "outblob", entry)
    aux_path = entry / "auxblob"
    auxblob = _read(aux_path, entry) if aux_path.exists() else None
    text = _read(entry / "generation", entry).decode(errors="replace").strip()
    try:
        generation = int(text)
    except ValueError:
        raise AttestationError(
            f"configfs-tsm: {entry}/generation: expected a number, found {text!r}"
        ) from None
    if generation != writes:
        return None  # a concurrent writer: ask again
    if not outblob:
        raise AttestationError(f"configfs-tsm: {entry}/outblob: the {provider} report is empty")
    return TsmReport(provider, outblob, auxblob or None)


def _read(path: Path, entry: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise AttestationError(f"configfs-tsm: cannot read {path}: {e.strerror}") from None


def _write(path: Path, data: bytes, entry: Path) -> None:
    try:
        with open(path, "wb", buffering=0) as f:
            f.write(data)
    except OSError as e:
        raise AttestationError(f"configfs-tsm: cannot write {path}: {e.strerror}") from None
