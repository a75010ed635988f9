"""TPM attester: quotes all 24 SHA-256 PCRs with an attestation key, driving tpm2-tools.

The AK is a restricted signing primary key in the endorsement hierarchy (RSA-2048 RSASSA-SHA256
by default, or ECC P-256 ECDSA-SHA256 with ``ak_alg="ecc"``):
the same template on the same TPM always gives the same key, so the verifier can pin it
(:meth:`TpmAttester.ak_public_pem` gives the ``*.pub`` file its trusted-AK directory wants).
The report data is truncated to 32 bytes as qualifying data. Init-data is bound by extending
PCR8 once with its digest (:meth:`TpmAttester.bind_init_data`).

The TPM is named by a TCTI string (``swtpm:host=127.0.0.1,port=2321``, ``device:/dev/tpmrm0``),
from the constructor, ``$TPM2TOOLS_TCTI`` or the default ``device:/dev/tpmrm0``. Transient
objects are flushed after every command, so it also works without a resource manager.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from coco.errors import AttestationError
from coco.tee._common import fit
from coco.tee.base import Attester

AK_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"
AK_TEMPLATES = {"rsa": "rsa2048:rsassa-sha256:null", "ecc": "ecc256:ecdsa-sha256:null"}
ALL_PCRS = "sha256:" + ",".join(str(i) for i in range(24))
DEFAULT_TCTI = "device:/dev/tpmrm0"
NONCE_SIZE = 32
INITDATA_PCR = 8


class TpmAttester(Attester):
    tee = "tpm"

    def __init__(self, tcti: str | None = None, timeout: float = 30.0, ak_alg: str = "rsa") -> None:
        if ak_alg not in AK_TEMPLATES:
            raise AttestationError(
                f"tpm attester: AK algorithm: expected one of {', '.join(AK_TEMPLATES)}, got {ak_alg!r}"
            )
        self.tcti = tcti or os.environ.get("TPM2TOOLS_TCTI") or DEFAULT_TCTI
        self.timeout = timeout
        self.ak_alg = ak_alg

    # -- tpm2-tools --------------------------------------------------------------------------
    def _run(self, *args: str, cwd: Path) -> None:
        tool = shutil.which(args[0])
        if tool is None:
            raise AttestationError(f"tpm attester: {args[0]} not found (install tpm2-tools)")
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        try:
            proc = subprocess.run(
                [tool, *args[1:]],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise AttestationError(
                f"tpm attester: {args[0]} did not answer within {self.timeout:g} s (TCTI {self.tcti})"
            ) from None
        finally:
            if args[0] != "tpm2_flushcontext":
                self._flush(cwd, env)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"exit status {proc.returncode}"
            raise AttestationError(f"tpm attester: {args[0]} failed (TCTI {self.tcti}): {reason}")

    def _flush(self, cwd: Path, env: dict[str, str]) -> None:
        tool = shutil.which("tpm2_flushcontext")
        if tool:
            subprocess.run(
                [tool, "-t"],
                cwd=cwd,
                env=env,
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )

    def _create_ak(self, work: Path) -> None:
        self._run(
            "tpm2_createprimary",
            "-C", "e",
            "-G", AK_TEMPLATES[self.ak_alg],
            "-g", "sha256",
            "-a", AK_ATTRIBUTES,
            "-c", "ak.ctx",
            cwd=work,
        )  # fmt: skip

    # -- public API --------------------------------------------------------------------------
    def ak_public_der(self) -> bytes:
        """The AK's DER SubjectPublicKeyInfo."""
        with tempfile.TemporaryDirectory(prefix="coco-tpm-") as tmp:
            work = Path(tmp)
            self._create_ak(work)
            self._run("tpm2_readpublic", "-c", "ak.ctx", "-f", "der", "-o", "ak.der", cwd=work)
            return (work / "ak.der").read_bytes()

    def ak_public_pem(self) -> bytes:
        key = serialization.load_der_public_key(self.ak_public_der())
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def bind_init_data(self, init_data_digest: bytes) -> None:
        """Extend PCR8 with the init-data digest (fitted to 32 bytes), as the guest does at boot."""
        value = fit(init_data_digest, 32).hex()
        with tempfile.TemporaryDirectory(prefix="coco-tpm-") as tmp:
            self._run("tpm2_pcrextend", f"{INITDATA_PCR}:sha256={value}", cwd=Path(tmp))

    runtime_measurement_algorithm = "sha256"

    def measurement_register(self, pcr: int) -> int:
        return pcr

    def extend_runtime_measurement(self, digest: bytes, pcr: int) -> None:
        """Extend PCR ``pcr`` (SHA-256 bank) with a 32-byte ``digest`` (AA runtime measurements)."""
        if len(digest) != 32 or not 0 <= pcr < 24:
            raise AttestationError(
                f"tpm attester: PCR extend: expected PCR 0-23 and a 32-byte digest, got PCR {pcr} "
                f"and {len(digest)} bytes"
            )
        with tempfile.TemporaryDirectory(prefix="coco-tpm-") as tmp:
            self._run("tpm2_pcrextend", f"{pcr}:sha256={digest.hex()}", cwd=Path(tmp))

    def get_evidence(self, report_data: bytes) -> dict[str, Any]:
        nonce = fit(report_data, NONCE_SIZE)
        with tempfile.TemporaryDirectory(prefix="coco-tpm-") as tmp:
            work = Path(tmp)
            self._create_ak(work)
            self._run("tpm2_readpublic", "-c", "ak.ctx", "-f", "der", "-o", "ak.der", cwd=work)
            self._run(
                "tpm2_quote",
                "-c", "ak.ctx",
                "-l", ALL_PCRS,
                "-q", nonce.hex(),
                "-g", "sha256",
                "-m", "quote.msg",
                "-s", "quote.sig",
                "-o", "quote.pcrs",
                "-F", "values",
                cwd=work,
            )  # fmt: skip
            pcrs = (work / "quote.pcrs").read_bytes()
            if len(pcrs) != 24 * 32:
                raise AttestationError(
                    f"tpm attester: expected 24 SHA-256 PCR values from tpm2_quote, got {len(pcrs)} bytes"
                )
            return {
                "ak_public": base64.b64encode((work / "ak.der").read_bytes()).decode(),
                "tpm_quote": {
                    "signature": base64.b64encode((work / "quote.sig").read_bytes()).decode(),
                    "message": base64.b64encode((work / "quote.msg").read_bytes()).decode(),
                    "pcrs": [pcrs[i : i + 32].hex() for i in range(0, len(pcrs), 32)],
                },
            }
