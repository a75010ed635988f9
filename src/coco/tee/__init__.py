"""One package per TEE: its evidence format, its attester and its verifier.

Adding a TEE is adding a folder and one line in :data:`_VERIFIERS` / :data:`_ATTESTERS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from coco.errors import AttestationError
from coco.tee.base import Attester, Claims, Verifier

# wire name (kbs-types, serde lowercase) -> "module:Class"
_VERIFIERS: dict[str, str] = {
    "sample": "coco.tee.sample.verifier:SampleVerifier",
    "snp": "coco.tee.snp.verifier:SnpVerifier",
    "tdx": "coco.tee.tdx.verifier:TdxVerifier",
    "tpm": "coco.tee.tpm.verifier:TpmVerifier",
    "az-snp-vtpm": "coco.tee.az_snp_vtpm.verifier:AzSnpVtpmVerifier",
    "az-tdx-vtpm": "coco.tee.az_tdx_vtpm.verifier:AzTdxVtpmVerifier",
}
_ATTESTERS: dict[str, str] = {
    "sample": "coco.tee.sample.attester:SampleAttester",
    "snp": "coco.tee.snp.attester:SnpAttester",
    "tdx": "coco.tee.tdx.attester:TdxAttester",
    "tpm": "coco.tee.tpm.attester:TpmAttester",
}


def _load(table: dict[str, str], tee: str, what: str):
    try:
        target = table[tee]
    except KeyError:
        raise AttestationError(
            f"unknown TEE {tee!r} for {what}: expected one of {', '.join(sorted(table))}"
        ) from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def get_verifier(tee: str, settings: Mapping[str, Any] | None = None) -> Verifier:
    """The verifier registered for the wire name ``tee`` (``sample``, ``snp``, ``tdx``, ...).

    ``settings`` are its constructor's keyword arguments (``trusted_ak_keys_dir`` for ``tpm``,
    ``kds_store`` for ``snp``, ``collateral_dir`` for ``tdx``); a name it does not take is refused.
    """
    cls = _load(_VERIFIERS, tee, "verification")
    try:
        return cls(**(settings or {}))
    except TypeError as e:
        raise AttestationError(f"verifier settings for {tee}: {e}") from None


def get_attester(tee: str) -> Attester:
    return _load(_ATTESTERS, tee, "attestation")()


def verifier_names() -> list[str]:
    return sorted(_VERIFIERS)


def attester_names() -> list[str]:
    return sorted(_ATTESTERS)


__all__ = [
    "Attester",
    "Claims",
    "Verifier",
    "attester_names",
    "get_attester",
    "get_verifier",
    "verifier_names",
]
