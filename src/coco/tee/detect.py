"""Which TEE this guest runs in, decided as upstream's Attestation Agent decides it.

In order: ``tdx`` (``/dev/tdx_guest``), ``az-tdx-vtpm`` / ``az-snp-vtpm`` (a TPM whose NV index
0x01400001 holds an Azure HCL report of type TDX / SNP), ``snp`` (``/dev/sev-guest``), ``tpm``
(``/dev/tpmrm0`` or ``/dev/tpm0``), else ``sample`` (INSECURE: no TEE at all). Every path is
looked up under ``root`` and the HCL probe is injectable, so the decision can be tested anywhere.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from coco.tee import get_attester
from coco.tee.base import Attester

log = logging.getLogger(__name__)

TDX_DEVICES = ("dev/tdx_guest", "dev/tdx-guest")
SNP_DEVICES = ("dev/sev-guest", "sys/devices/platform/sev-guest")
TPM_DEVICES = ("dev/tpmrm0", "dev/tpm0")
HCL_NV_INDEX = "0x01400001"
HCL_HEADER = 0x4D4  # up to the end of the IGVM request data
HCL_REPORT_TYPES = {2: "az-snp-vtpm", 4: "az-tdx-vtpm"}

HclProbe = Callable[[str], int | None]  # TCTI -> HCL report type, None when there is no report


def hcl_report_type(tcti: str) -> int | None:
    """The report type of the Azure HCL report in the TPM's NV index 0x01400001, if any."""
    tool = shutil.which("tpm2_nvread")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory(prefix="coco-hcl-") as tmp:
        out = Path(tmp) / "hcl.bin"
        try:
            proc = subprocess.run(
                [tool, "-C", "o", "-s", str(HCL_HEADER), "-o", str(out), HCL_NV_INDEX],
                env={**os.environ, "TPM2TOOLS_TCTI": tcti},
                capture_output=True,
                timeout=10,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None
        if proc.returncode != 0 or not out.exists():
            return None
        data = out.read_bytes()
    if len(data) < HCL_HEADER or data[:4] != b"HCLA":
        return None
    return struct.unpack_from("<I", data, 0x4C8)[0]


def tpm_device(root: Path = Path("/")) -> Path | None:
    for dev in TPM_DEVICES:
        if (root / dev).exists():
            return Path("/") / dev
    return None


def detect_tee(root: Path | str = "/", hcl_probe: HclProbe = hcl_report_type) -> str:
    """The wire name of the TEE found under ``root`` (see the module doc)."""
    root = Path(root)
    if any((root / d).exists() for d in TDX_DEVICES):
        return "tdx"
    tpm = tpm_device(root)
    if tpm is not None:
        kind = hcl_probe(f"device:{root / tpm.relative_to('/')}")
        if kind in HCL_REPORT_TYPES:
            return HCL_REPORT_TYPES[kind]
    if any((root / d).exists() for d in SNP_DEVICES):
        return "snp"
    if tpm is not None:
        return "tpm"
    return "sample"


def detect_attester(root: Path | str = "/") -> Attester:
    """An attester for the TEE :func:`detect_tee` finds (sample warns: it proves nothing)."""
    tee = detect_tee(root)
    if tee == "sample":
        log.warning("no TEE found: using the INSECURE sample attester")
    if tee == "tpm" and not os.environ.get("TPM2TOOLS_TCTI"):
        from coco.tee.tpm.attester import TpmAttester

        return TpmAttester(f"device:{tpm_device(Path(root))}")
    return get_attester(tee)


__all__ = ["detect_attester", "detect_tee", "hcl_report_type"]
