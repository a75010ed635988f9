"""``coco process-user-data``: the pod VM's userdata, read, checked and written out (peer pods).

Upstream's ``process-user-data provision-files``, in one pass that writes nothing unless all of
it checks out:

1. **Find** the userdata: a config drive (an ISO 9660 volume labelled ``cidata`` holding
   ``user-data``: given as ``--config-drive``, else the first such ``/dev/vd*``, ``/dev/sr*``), the
   file ``/media/cidata/user-data``, or an IMDS-like ``--url`` (retried every 5 s until
   ``--timeout``).
2. **Parse** it strictly: ``#cloud-config`` YAML with ``write_files`` only; each entry's path must
   be on upstream's allow-list (``/run/peerpod/{aa.toml,cdh.toml,apf.json,auth.json,initdata,
   scratch-space.marker}``); other paths are refused with their name.
3. **Check the initdata** (``/run/peerpod/initdata``, gzip + base64 TOML) against what the TEE
   measured: on this project's pod VM the guest's init extends PCR 8 of the vTPM with the digest
   of the initdata disk the VM was launched with, so PCR 8 must equal
   SHA-256(0*32 || digest fitted to 32 bytes); with no initdata it must still be zero (else the
   host withheld what the VM was launched with). A mismatch refuses the pod: nothing is written,
   so neither the forwarder nor the agent gets a configuration. ``--tee none`` skips the check
   (insecure, logged as such).
4. **Write** the files (0644; auth.json 0600), the initdata's ``aa.toml``, ``cdh.toml`` and
   ``policy.rego`` beside them and ``initdata.digest`` (hex), all under ``--root``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coco import yamlio
from coco.crypto.digest import init_data_pcr
from coco.errors import CocoError, InitdataError
from coco.files import atomic_write
from coco.integrity import initdata as initdata_doc

log = logging.getLogger(__name__)

PEERPOD_DIR = "/run/peerpod"
ALLOWED = frozenset(
    f"{PEERPOD_DIR}/{n}"
    for n in ("aa.toml", "cdh.toml", "apf.json", "auth.json", "initdata", "scratch-space.marker")
)
INITDATA_PATH = f"{PEERPOD_DIR}/initdata"
INITDATA_FILES = ("aa.toml", "cdh.toml", "policy.rego")
MEDIA_USERDATA = Path("/media/cidata/user-data")
MAX_USERDATA = 1 << 20
SECTOR = 2048
TPM_DEVICE = "/dev/tpmrm0"
INITDATA_PCR = 8


class UserdataError(CocoError):
    """Userdata that could not be found, read or trusted inside the pod VM."""


# --- config drive (ISO 9660 with Rock Ridge names, read without mounting) ---------------------


def _dir_records(data: bytes):
    i = 0
    while i < len(data):
        length = data[i]
        if length == 0:  # records do not cross sectors: skip to the next one
            i = (i // SECTOR + 1) * SECTOR
            continue
        yield data[i : i + length]
        i += length


def _rock_ridge_name(record: bytes) -> str | None:
    name_len = record[32]
    su = record[33 + name_len + (1 - name_len % 2) :]
    j = 0
    while j + 4 <= len(su):
        sig, length = su[j : j + 2], su[j + 2]
        if length < 4:
            break
        if sig == b"NM":
            return su[j + 5 : j + length].decode("utf-8", "replace")
        j += length
    return None


def read_config_drive(path: Path, name: str = "user-data") -> bytes | None:
    """``name`` from the root directory of the ISO 9660 volume ``cidata`` at ``path`` (a device
    or an image file); ``None`` if ``path`` is not such a volume or lacks the file."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) < 17 * SECTOR:  # a block device refuses a seek past its end
                return None
            f.seek(16 * SECTOR)
            pvd = f.read(SECTOR)
            if len(pvd) < 190 or pvd[0] != 1 or pvd[1:6] != b"CD001":
                return None
            if pvd[40:72].decode("ascii", "replace").strip().lower() != "cidata":
                return None
            root = pvd[156:190]
            extent, size = (
                int.from_bytes(root[2:6], "little"),
                int.from_bytes(root[10:14], "little"),
            )
            if size > 1 << 20:
                raise UserdataError(f"config drive {path}: root directory of {size} bytes")
            f.seek(extent * SECTOR)
            directory = f.read(size)
            for rec in _dir_records(directory):
                if len(rec) < 34:
                    continue
                plain = rec[33 : 33 + rec[32]].decode("ascii", "replace").split(";")[0].rstrip(".")
                if (_rock_ridge_name(rec) or plain.lower()) == name:
                    fext = int.from_bytes(rec[2:6], "little")
                    flen = int.from_bytes(rec[10:14], "little")
                    if flen > MAX_USERDATA:
                        raise UserdataError(
                            f"config drive {path}: {name} is {flen} bytes, the limit is "
                            f"{MAX_USERDATA}"
                        )
                    f.seek(fext * SECTOR)
                    return f.read(flen)
    except OSError as e:
        raise UserdataError(f"config drive {path}: {e.strerror or e}") from None
    return None


def find_config_drive(candidates: list[Path] | None = None) -> tuple[bytes, str] | None:
    if candidates is None:
        dev = Path("/dev")
        candidates = sorted(dev.glob("vd*")) + sorted(dev.glob("sr*"))
        candidates = [c for c in candidates if not c.name[-1].isdigit() or c.name.startswith("sr")]
    for path in candidates:
        with_data = read_config_drive(path)
        if with_data is not None:
            return with_data, f"config drive {path}"
    return None


def fetch_url(url: str, timeout: float, interval: float = 5.0) -> bytes:
    """GET ``url`` (an IMDS-like endpoint), retried every ``interval`` s until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                data = resp.read(MAX_USERDATA + 1)
            if len(data) > MAX_USERDATA:
                raise UserdataError(f"userdata {url}: more than {MAX_USERDATA} bytes")
            return data
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
        if time.monotonic() + interval > deadline:
            raise UserdataError(f"userdata {url}: not reachable within {timeout:g} s: {reason}")
        time.sleep(interval)


# --- parsing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class File:
    path: str
    content: bytes


def parse_cloud_config(data: bytes, where: str) -> list[File]:
    if not data.startswith(b"#cloud-config"):
        raise UserdataError(f"{where}: expected a #cloud-config document, found {data[:20]!r}")
    doc = yamlio.load(data, what=where, error=UserdataError) or {}
    if not isinstance(doc, dict) or set(doc) - {"write_files"}:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise UserdataError(f"{where}: expected only write_files, found {keys}")
    entries = doc.get("write_files") or []
    if not isinstance(entries, list):
        raise UserdataError(f"{where}: write_files: expected a list")
    files = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise UserdataError(f"{where}: write_files[{i}]: expected a mapping with a path")
        path, content = entry["path"], entry.get("content", "")
        if path not in ALLOWED:
            raise UserdataError(
                f"{where}: write_files[{i}]: {path!r} is not one of {', '.join(sorted(ALLOWED))}"
            )
        if not isinstance(content, str) or entry.get("encoding") not in (None, "", "text/plain"):
            raise UserdataError(f"{where}: write_files[{i}] ({path}): expected text content")
        files.append(File(path, content.encode()))
    return files


# --- the TEE's measurement ----------------------------------------------------------------------


def read_pcr8(tcti: str) -> bytes:
    """PCR 8 (SHA-256 bank) through tpm2-tools."""
    with tempfile.TemporaryDirectory(prefix="coco-pcr-") as tmp:
        out = Path(tmp) / "pcr8.bin"
        env = {**os.environ, "TPM2TOOLS_TCTI": tcti}
        try:
            proc = subprocess.run(
                ["tpm2_pcrread", f"sha256:{INITDATA_PCR}", "-o", str(out)],
                capture_output=True, text=True, env=env, timeout=30, check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UserdataError(f"reading PCR {INITDATA_PCR} ({tcti}): {e}") from None
        if proc.returncode != 0 or not out.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserdataError(f"reading PCR {INITDATA_PCR} ({tcti}): tpm2_pcrread: {last}")
        return out.read_bytes()


def expected_pcr8(digest: bytes | None) -> bytes:
    if digest is None:
        return bytes(32)
    return init_data_pcr(digest)


def check_measured(digest: bytes | None, measured: bytes, where: str) -> None:
    expected = expected_pcr8(digest)
    if measured != expected:
        what = f"the initdata digest {digest.hex()}" if digest else "no initdata"
        raise UserdataError(
            f"{where}: {what} does not match the TEE's measurement: PCR {INITDATA_PCR} is "
            f"{measured.hex()}, expected {expected.hex()}; refusing to run the pod"
        )


# --- the whole step -----------------------------------------------------------------------------


def provision(
    data: bytes,
    where: str,
    root: Path,
    measured: Callable[[], bytes] | None,
) -> list[str]:
    """Parse, check and write; returns the paths written (relative to ``root``)."""
    files = parse_cloud_config(data, where)
    by_path = {f.path: f.content for f in files}
    doc = None
    digest = None
    if INITDATA_PATH in by_path:
        try:
            doc = initdata_doc.decode(by_path[INITDATA_PATH], f"{where}: {INITDATA_PATH}")
        except InitdataError as e:
            raise UserdataError(str(e)) from None
        digest = doc.digest()
    if measured is not None:
        check_measured(digest, measured(), where)
    else:
        log.warning("process-user-data: --tee none: the initdata is NOT checked (insecure)")
    out = dict(by_path)
    if doc is not None:
        for name in INITDATA_FILES:
            if name in doc.data:
                out[f"{PEERPOD_DIR}/{name}"] = doc.data[name].encode()
        out[f"{PEERPOD_DIR}/initdata.digest"] = digest.hex().encode()
    written = []
    for path, content in out.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        private = path.endswith(("auth.json", "apf.json"))
        atomic_write(target, content, 0o600 if private else 0o644)
        written.append(path)
    return sorted(written)


def load_userdata(config_drive: Path | None, url: str | None, timeout: float) -> tuple[bytes, str]:
    if config_drive is not None:
        data = read_config_drive(config_drive)
        if data is None:
            raise UserdataError(
                f"config drive {config_drive}: expected an ISO 9660 volume 'cidata' with user-data"
            )
        return data, f"config drive {config_drive}"
    if url:
        return fetch_url(url, timeout), url
    found = find_config_drive()
    if found is not None:
        return found
    if MEDIA_USERDATA.is_file():
        return MEDIA_USERDATA.read_bytes()[: MAX_USERDATA + 1], str(MEDIA_USERDATA)
    raise UserdataError(
        "userdata: expected a config drive labelled cidata, /media/cidata/user-data or --url; "
        "found none"
    )
