"""``coco process-user-data``: read the pod VM's userdata, check its initdata, write its files."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.cli._args import Parser

DESCRIPTION = "Peer-pod VM: write the userdata's files after checking its initdata."


def _arguments(p: Parser) -> None:
    p.description = (
        "Read the userdata (a cidata config drive, /media/cidata/user-data or --url), refuse it "
        "unless its initdata digest matches what the TEE measured (PCR 8 of the vTPM), then write "
        "apf.json, auth.json, the initdata's aa.toml/cdh.toml/policy.rego and initdata.digest "
        "under ROOT/run/peerpod."
    )
    p.add_argument("--config-drive", type=Path, help="A device or ISO image labelled cidata.")
    p.add_argument("--url", help="An IMDS-like URL to GET the userdata from.")
    p.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="How long --url is retried, seconds (default 180).",
    )
    p.add_argument(
        "--root", type=Path, default=Path("/"), help="Where /run/peerpod is (default /)."
    )
    p.add_argument(
        "--tee",
        choices=("tpm", "none"),
        default="tpm",
        help="Check the initdata against the vTPM's PCR 8 (tpm), or not (none: insecure).",
    )
    p.add_argument("--tpm-tcti", default="device:/dev/tpmrm0",
                   help="The TPM to read PCR 8 from (a tpm2-tools TCTI).")  # fmt: skip


def run(config_drive: Path | None, url: str | None, timeout: float, root: Path, tee: str,
        tpm_tcti: str) -> None:  # fmt: skip
    from coco.guest.userdata import load_userdata, provision, read_pcr8

    data, where = load_userdata(config_drive, url, timeout)
    measured = None if tee == "none" else (lambda: read_pcr8(tpm_tcti))
    written = provision(data, where, root, measured)
    sys.stderr.write(f"process-user-data: {where}: wrote {', '.join(written) or 'nothing'}\n")


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    _arguments(group)
    values = vars(group.parse_args(argv))
    return run, values
