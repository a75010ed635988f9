"""``coco attestation verify``: run one TEE verifier on an evidence file and print its claims."""

from __future__ import annotations

import json

import click

from coco.errors import UsageError


def _hex(value: str | None, opt: str) -> bytes | None:
    if value is None:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise UsageError(f"{opt}: expected hex, found {value[:40]!r}") from None


@click.group("attestation")
def attestation() -> None:
    """Attestation Service tools."""


@attestation.command("verify")
@click.option("--tee", required=True, help="TEE wire name: sample, tpm, snp, tdx, ...")
@click.argument("evidence_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--expected-report-data", help="Hex of the report data the evidence must carry.")
@click.option("--expected-init-data", help="Hex of the init-data digest the evidence must carry.")
def verify(tee: str, evidence_file: str, expected_report_data: str | None,
           expected_init_data: str | None) -> None:  # fmt: skip
    """Verify EVIDENCE_FILE (the TEE's evidence JSON); print the claims as JSON."""
    from coco.tee import get_verifier

    rd = _hex(expected_report_data, "--expected-report-data")
    init = _hex(expected_init_data, "--expected-init-data")
    with open(evidence_file, "rb") as f:
        evidence = f.read()
    result = get_verifier(tee).verify(evidence, rd, init)
    # The claims object itself, as upstream's verifier returns it (scripts read its keys directly).
    click.echo(json.dumps(result.claims, indent=2, sort_keys=True))
