"""TDX verifier: quote signatures, QE report binding, PCK chain to Intel's root, CCEL replay.

Evidence is ``{"cc_eventlog": "<base64 CCEL>" | null, "quote": "<base64 DCAP quote>"}``.
Checked offline: the attestation key's ECDSA-P256 signature over header and body; the QE report
signed by the PCK leaf; the QE report binding ``report_data[:32] == SHA-256(AK || auth data)``;
the PCK chain to the bundled Intel SGX Root CA; report data and MRCONFIGID bindings; RTMR replay
of the CC event log when one is sent; the TCB status when Intel's collateral is configured.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from coco.errors import AttestationError
from coco.tee import eventlog
from coco.tee._common import b64, check_keys, expect_equal, fit, load_object, load_pem_certs
from coco.tee.base import Claims, Verifier
from coco.tee.tdx.collateral import Collateral
from coco.tee.tdx.pck import PckInfo, check_chain, pck_info
from coco.tee.tdx.quote import Quote


def _p256_verify(key_xy: bytes, sig_rs: bytes, data: bytes) -> bool:
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + key_xy)
    except ValueError:
        return False
    sig = encode_dss_signature(
        int.from_bytes(sig_rs[:32], "big"), int.from_bytes(sig_rs[32:], "big")
    )
    try:
        key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def verify_quote(quote: Quote, where: str) -> list[x509.Certificate]:
    """All the signatures of a quote; returns the PCK chain (leaf first)."""
    if not _p256_verify(quote.attestation_key, quote.signature, quote.signed):
        raise AttestationError(
            f"{where}: quote signature does not verify with the attestation key "
            "(header or TD report altered, or forged)"
        )
    expected = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    if quote.qe_report.report_data != expected:
        raise AttestationError(
            f"{where}: QE report binding mismatch: expected QE report_data "
            f"SHA-256(attestation key || auth data) = {expected[:32].hex()} + zeros, got "
            f"{quote.qe_report.report_data.hex()}"
        )
    chain = load_pem_certs(quote.pck_chain_pem, f"{where}: PCK certificate chain")
    check_chain(chain, f"{where}: PCK chain")
    leaf_key = chain[0].public_key()
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey):
        raise AttestationError(f"{where}: PCK leaf key: expected an EC P-256 key")
    try:
        r, s = quote.qe_report_signature[:32], quote.qe_report_signature[32:]
        leaf_key.verify(
            encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big")),
            quote.qe_report.raw,
            ec.ECDSA(hashes.SHA256()),
        )
    except InvalidSignature:
        raise AttestationError(
            f"{where}: QE report signature does not verify with the PCK leaf key"
        ) from None
    return chain


def quote_claims(quote: Quote) -> dict[str, Any]:
    """``quote.header``/``quote.body`` as hex (v5: ``quote.type``/``quote.size``) and
    ``td_attributes`` flags, as upstream's ``parse_tdx_claims``."""
    q: dict[str, Any] = {
        "header": {k: v.hex() for k, v in quote.header.items()},
        "body": {k: v.hex() for k, v in quote.body.items()},
    }
    if quote.version == 5:
        q["type"] = (quote.body_type or 0).to_bytes(2, "little").hex()
        q["size"] = (quote.body_size or 0).to_bytes(4, "little").hex()
    attrs = quote.td_attributes
    return {
        "quote": q,
        "td_attributes": {
            "debug": bool(attrs & 1),
            "septve_disable": bool(attrs >> 28 & 1),
            "protection_keys": bool(attrs >> 30 & 1),
            "key_locker": bool(attrs >> 31 & 1),
            "perfmon": bool(attrs >> 63 & 1),
        },
        "report_data": quote.body["report_data"].hex(),
        "init_data": quote.body["mr_config_id"].hex(),
    }


def parse_claims(quote: Quote, info: PckInfo, log: eventlog.EventLog | None) -> dict[str, Any]:
    """The claims of a verified quote (upstream's ``parse_tdx_claims``, without DCAP's)."""
    claims = quote_claims(quote)
    if log is not None:
        claims["uefi_event_logs"] = log.to_claims()
    if info.ca == "platform" and info.platform_instance_id is not None:
        # upstream prints the 16 bytes as one little-endian number
        claims["platform_instance_id"] = info.platform_instance_id[::-1].hex()
    return claims


def check_rtmrs(log: eventlog.EventLog, quote: Quote, where: str) -> None:
    replayed = log.replay_rtmrs()
    for i in range(4):
        found = quote.body[f"rtmr_{i}"]
        if replayed[i] != found:
            raise AttestationError(
                f"{where}: cc_eventlog replay of RTMR{i} mismatch: the log gives "
                f"{replayed[i].hex()}, the quote says {found.hex()}"
            )


class TdxVerifier(Verifier):
    """``collateral_dir`` (or ``$COCO_TDX_COLLATERAL_DIR``): Intel PCS collateral to evaluate the
    TCB status with (see :mod:`coco.tee.tdx.collateral`); without it the TCB status is not
    evaluated and no DCAP claims are produced."""

    tee = "tdx"

    def __init__(
        self,
        collateral_dir: Path | str | None = None,
        *,
        insecure_skip_collateral_signature: bool = False,
    ) -> None:
        chosen = collateral_dir or os.environ.get("COCO_TDX_COLLATERAL_DIR")
        self.collateral_dir = Path(chosen) if chosen else None
        self.insecure_skip_collateral_signature = insecure_skip_collateral_signature

    def verify(
        self,
        evidence: bytes | dict[str, Any],
        expected_report_data: bytes | None = None,
        expected_init_data: bytes | None = None,
    ) -> Claims:
        where = "tdx evidence"
        obj = load_object(evidence, where)
        check_keys(obj, ["quote"], ["cc_eventlog", "aa_eventlog"], where)
        if obj.get("aa_eventlog") is not None:
            raise AttestationError(
                f"{where}.aa_eventlog: a separate AA event log is not supported (expected null); "
                "AA events are read from the CCEL"
            )
        quote = Quote.from_bytes(b64(obj["quote"], f"{where}.quote"), f"{where}: quote")
        chain = verify_quote(quote, f"{where}: quote")
        check_bindings(quote, expected_report_data, expected_init_data, where)
        log = None
        ccel = obj.get("cc_eventlog")
        if ccel is not None:
            log = eventlog.EventLog.parse(b64(ccel, f"{where}.cc_eventlog"), f"{where}.cc_eventlog")
            check_rtmrs(log, quote, where)
        info = pck_info(chain[0], chain[1], f"{where}: PCK leaf")
        claims = parse_claims(quote, info, log)
        if self.collateral_dir is not None:
            collateral = Collateral.load(
                self.collateral_dir,
                insecure_skip_signature=self.insecure_skip_collateral_signature,
            )
            claims.update(collateral.evaluate(quote, info, f"{where}: collateral"))
        return Claims(tee="tdx", claims=claims, tee_class="cpu")


def check_bindings(
    quote: Quote,
    expected_report_data: bytes | None,
    expected_init_data: bytes | None,
    where: str,
) -> None:
    if expected_report_data is not None:
        expect_equal(
            f"{where}: report_data", fit(expected_report_data, 64), quote.body["report_data"]
        )
    if expected_init_data is not None:
        expect_equal(
            f"{where}: init_data (MRCONFIGID)",
            fit(expected_init_data, 48),
            quote.body["mr_config_id"],
        )
