"""``coco aa``: the Attestation Agent: print evidence or a KBS token, export a TPM AK, or serve.

The TEE is detected as upstream's AA detects it (``--tee`` overrides; a TPM named by
``$TPM2TOOLS_TCTI`` such as ``swtpm:host=127.0.0.1,port=2321`` works with ``--tee tpm``).
"""

from __future__ import annotations

import base64
import binascii
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.cli._args import Commands, Parser, Usage, path, run_group, shown

DESCRIPTION = "The Attestation Agent: evidence, KBS tokens, TPM AK, ttRPC service."
_FILE = path(exists=True, dir_okay=False)
AA_SOCKET = "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock"


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, _COMMANDS)


def _tee_option(p: Parser) -> None:
    p.add_argument(
        "--tee",
        metavar="TEXT",
        help="Attester to use instead of the detected one (sample is INSECURE; tpm, snp, tdx).",
    )


def _config_options(p: Parser) -> None:
    p.add_argument(
        "-c", "--config", "--config-file", dest="config", type=_FILE, metavar="FILE",
        help="aa.toml (upstream's shape); default: the KBS of aa_kbc_params.",
    )  # fmt: skip
    p.add_argument(
        "-t", "--initdata-toml", dest="initdata_toml", type=_FILE, metavar="FILE",
        help="Init-data TOML: bound to the TEE at start and sent to the KBS when attesting.",
    )  # fmt: skip
    p.add_argument(
        "-i", "--initdata-digest", dest="initdata_digest", metavar="BASE64",
        help="Init-data digest (standard base64) to bind at start (--initdata-toml wins).",
    )  # fmt: skip


def _agent(
    tee: str | None, config: Path | None = None, initdata_toml: Path | None = None,
    eventlog: Path | None = None,
):  # type: ignore[no-untyped-def]  # fmt: skip
    from coco.guest.aa.config import AaConfig
    from coco.guest.aa.eventlog import DEFAULT_PATH
    from coco.guest.aa.service import AttestationAgent

    cfg = AaConfig.load(config) if config else AaConfig.from_kernel_cmdline()
    attester = None
    if tee:
        from coco.tee import get_attester

        attester = get_attester(tee)
    toml = initdata_toml.read_text(encoding="utf-8") if initdata_toml else None
    return AttestationAgent(
        cfg, attester, init_data_toml=toml, eventlog_path=eventlog or DEFAULT_PATH
    )


# --- evidence ---------------------------------------------------------------------------------


def _build_evidence(p: Parser) -> None:
    p.description = "Print this TEE's evidence (JSON) for the given runtime data."
    p.add_argument(
        "--runtime-data", default="", metavar="TEXT",
        help=shown("Runtime data (its UTF-8 bytes are the report data).", "empty"),
    )  # fmt: skip
    p.add_argument(
        "--runtime-data-base64", metavar="BASE64", help="Runtime data as standard base64 instead."
    )
    _tee_option(p)
    p.set_defaults(func=evidence)


def evidence(runtime_data: str, runtime_data_base64: str | None, tee: str | None) -> None:
    data = runtime_data.encode()
    if runtime_data_base64 is not None:
        try:
            data = base64.b64decode(runtime_data_base64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise Usage(f"--runtime-data-base64: expected standard base64: {e}") from None
    aa = _agent(tee)
    sys.stdout.write(aa.get_evidence(data).decode() + "\n")


# --- token ------------------------------------------------------------------------------------


def _build_token(p: Parser) -> None:
    p.description = (
        "Attest to the KBS of the config and print the reply of GetToken(kbs): "
        '{"token": ..., "tee_keypair": <PEM>} (the key is the ephemeral TEE key).'
    )
    _config_options(p)
    _tee_option(p)
    p.set_defaults(func=token)


def token(
    config: Path | None, initdata_toml: Path | None, initdata_digest: str | None, tee: str | None
) -> None:
    aa = _agent(tee, config, initdata_toml)
    try:
        sys.stdout.write(aa.get_token("kbs").decode() + "\n")
    finally:
        aa.close()


# --- ak-public --------------------------------------------------------------------------------


def _build_ak_public(p: Parser) -> None:
    p.description = (
        "Print the TPM attestation key (PEM) for the KBS's trusted-AK directory "
        "(tpm_verifier.trusted_ak_keys_dir)."
    )
    p.add_argument(
        "--tcti", metavar="TEXT",
        help="TPM to use, e.g. device:/dev/tpmrm0 (default: $TPM2TOOLS_TCTI, else /dev/tpmrm0).",
    )  # fmt: skip
    p.add_argument(
        "--tpm-state", type=Path, metavar="DIR",
        help="A node's vTPM: the swtpm state directory its pod VMs boot on ([hypervisor.qemu] "
        "tpm_state), made here if it does not exist; the AK their guests make is printed.",
    )  # fmt: skip
    p.add_argument(
        "--ak-alg", default="rsa", choices=["rsa", "ecc"], metavar="[rsa|ecc]",
        help=shown("AK algorithm.", "rsa"),
    )  # fmt: skip
    p.set_defaults(func=ak_public)


def ak_public(tcti: str | None, tpm_state: Path | None, ak_alg: str) -> None:
    if tpm_state is not None:
        if tcti is not None:
            raise Usage("--tcti and --tpm-state name two TPMs: give one")
        from coco.host.podvm.vtpm import ak_public_pem

        sys.stdout.write(ak_public_pem(tpm_state, ak_alg).decode())
        return
    from coco.tee.tpm.attester import TpmAttester

    sys.stdout.write(TpmAttester(tcti, ak_alg=ak_alg).ak_public_pem().decode())


# --- serve ------------------------------------------------------------------------------------


def _build_serve(p: Parser) -> None:
    p.description = (
        "Serve attestation_agent.AttestationAgentService over ttRPC (GetEvidence, "
        "GetAdditionalEvidence, GetToken, ExtendRuntimeMeasurement, BindInitData, GetTeeType, "
        "GetAdditionalTees)."
    )
    p.add_argument(
        "-a", "--socket", "--attestation_sock", dest="socket", default=AA_SOCKET, metavar="ADDR",
        help=shown("ttRPC address (unix:///path).", AA_SOCKET),
    )  # fmt: skip
    _config_options(p)
    _tee_option(p)
    p.add_argument(
        "--eventlog", type=path(dir_okay=False), metavar="FILE",
        help=shown("Runtime-measurement event log.", "/run/attestation-agent/eventlog"),
    )  # fmt: skip
    p.set_defaults(func=serve)


def serve(
    socket: str, config: Path | None, initdata_toml: Path | None, initdata_digest: str | None,
    tee: str | None, eventlog: Path | None,
) -> None:  # fmt: skip
    import asyncio

    from coco.guest.aa.service import serve as run
    from coco.integrity.initdata import Initdata

    aa = _agent(tee, config, initdata_toml, eventlog)
    digest = None
    if initdata_toml is not None:
        digest = Initdata.parse(initdata_toml.read_bytes(), str(initdata_toml)).digest()
    elif initdata_digest is not None:
        try:
            digest = base64.b64decode(initdata_digest, validate=True)
        except (binascii.Error, ValueError) as e:
            raise Usage(f"--initdata-digest: expected standard base64: {e}") from None
    if digest is not None:
        aa.bind_init_data(digest)

    def ready(address: str) -> None:
        print(f"attestation agent ({aa.get_tee_type()}) listening on {address}", file=sys.stderr)

    asyncio.run(run(aa, socket, ready))


_COMMANDS: Commands = {
    "ak-public": ("Print the TPM attestation key (PEM).", _build_ak_public),
    "evidence": ("Print this TEE's evidence for the given runtime data.", _build_evidence),
    "serve": ("Serve the Attestation Agent over ttRPC.", _build_serve),
    "token": ("Attest to the KBS and print GetToken(kbs)'s reply.", _build_token),
}
