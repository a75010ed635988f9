"""``coco attestation verify``: run one TEE verifier on an evidence file and print its claims."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from coco.cli._args import Commands, Parser, path, run_group
from coco.errors import AttestationError, UsageError
from coco.jsonio import loads

DESCRIPTION = "Attestation Service tools."


def _hex(value: str | None, opt: str) -> bytes | None:
    if value is None:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise UsageError(f"{opt}: expected hex, found {value[:40]!r}") from None


def _build_verify(p: Parser) -> None:
    p.description = "Verify EVIDENCE_FILE (the TEE's evidence JSON); print the claims as JSON."
    p.add_argument("--tee", required=True, help="TEE wire name: sample, tpm, snp, tdx, ...")
    p.add_argument(
        "evidence_file",
        metavar="EVIDENCE_FILE",
        type=path(exists=True, dir_okay=False, as_path=False),
    )
    p.add_argument("--expected-report-data", help="Hex of the report data the evidence must carry.")
    p.add_argument(
        "--expected-init-data", help="Hex of the init-data digest the evidence must carry."
    )
    p.set_defaults(func=verify)


def verify(tee: str, evidence_file: str, expected_report_data: str | None,
           expected_init_data: str | None) -> None:  # fmt: skip
    from coco.tee import get_verifier

    rd = _hex(expected_report_data, "--expected-report-data")
    init = _hex(expected_init_data, "--expected-init-data")
    try:
        with open(evidence_file, "rb") as f:
            evidence = f.read()
    except OSError as e:
        raise AttestationError(f"evidence {evidence_file}: cannot read it: {e.strerror}") from None
    # every TEE's evidence is a JSON document: refuse binary or absurdly deep input here, naming
    # the file (the verifier's own errors name the TEE)
    loads(evidence, what=f"evidence {evidence_file}", error=AttestationError)
    result = get_verifier(tee).verify(evidence, rd, init)
    # The claims object itself, as upstream's verifier returns it (scripts read its keys directly).
    print(json.dumps(result.claims, indent=2, sort_keys=True))


COMMANDS: Commands = {
    "verify": ("Verify an evidence file; print the claims as JSON.", _build_verify),
}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, COMMANDS)
