"""TDX verifier on upstream's quotes (v4, v5), on corrupted copies and on a forged PCK chain."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import json
import struct
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from coco.errors import AttestationError
from coco.tee import get_verifier
from coco.tee.eventlog import EventLog
from coco.tee.tdx.pck import intel_root, pck_info
from coco.tee.tdx.quote import Quote
from coco.tee.tdx.verifier import check_rtmrs, parse_claims, verify_quote
from tests.tee.vectors import flip, load_json, vector

MR_TD = {
    4: "705ee9381b8633a9fbe532b52345e8433343d2868959f57889d84ca377c395b689cac1599ccea1b7d420483a9ce5f031",
    5: "dfba221b48a22af8511542ee796603f37382800840dcd978703909bf8e64d4c8a1e9de86e7c9638bfcba422f3886400a",
}
Q6_MR_CONFIG_ID = bytes.fromhex(
    "889abf4718f037e38d74464c11e7c91a6e9890b5546409e1e7df9de7a51ca931"
    "52bf847bd2440328e90adb18b150ed67"
)
# v4 offsets: body at 48, report_data at 568, signature data from 636, QE report at 770
V4_MR_TD, V4_REPORT_DATA, V4_SIG, V4_AK, V4_QE_REPORT, V4_QE_AUTH = 184, 568, 636, 700, 770, 1220


def quote_bytes(n: int) -> bytes:
    return vector(f"tdx/tdx_quote_{n}.dat").read_bytes()


def evidence(quote: bytes, ccel: bytes | None = None) -> bytes:
    return json.dumps(
        {
            "cc_eventlog": None if ccel is None else base64.b64encode(ccel).decode(),
            "quote": base64.b64encode(quote).decode(),
        }
    ).encode()


def verify(quote: bytes, **kw: Any):
    return get_verifier("tdx").verify(evidence(quote), **kw)


# -- the good vectors ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 5, 6])
def test_upstream_quotes_verify(n: int) -> None:
    claims = verify(quote_bytes(n)).claims
    q = Quote.from_bytes(quote_bytes(n))
    assert claims["report_data"] == q.body["report_data"].hex()
    assert claims["init_data"] == q.body["mr_config_id"].hex()
    if n in MR_TD:
        assert claims["quote"]["body"]["mr_td"] == MR_TD[n]
    assert claims["quote"]["header"]["version"] == ("0500" if n == 5 else "0400")
    assert len(claims["platform_instance_id"]) == 32


def test_v5_quote_has_tdx15_fields() -> None:
    claims = verify(quote_bytes(5)).claims
    assert claims["quote"]["type"] == "0300" and claims["quote"]["size"] == "88020000"
    assert claims["quote"]["body"]["tcb_svn"].startswith("05010200")
    assert len(claims["quote"]["body"]["mr_servicetd"]) == 96
    assert claims["report_data"].startswith("6d6ab13b")


def test_quote4_claims_equal_upstream_expected_json() -> None:
    quote = Quote.from_bytes(quote_bytes(4))
    chain = verify_quote(quote, "w")
    log = EventLog.parse(vector("eventlog/CCEL_data").read_bytes())
    claims = parse_claims(quote, pck_info(chain[0], chain[1], "w"), log)
    assert claims == load_json("tdx/parse_tdx_claims_expected.json")
    assert claims["td_attributes"]["debug"] is True


def test_quote4_with_a_log_that_does_not_replay_to_its_rtmrs_is_refused() -> None:
    with pytest.raises(
        AttestationError, match="cc_eventlog replay of RTMR0 mismatch: the log gives 2dc71230"
    ):
        get_verifier("tdx").verify(
            evidence(quote_bytes(4), vector("eventlog/CCEL_data").read_bytes())
        )


def test_rtmr_replay_check_accepts_a_matching_log() -> None:
    log = EventLog.parse(vector("eventlog/CCEL_data_ovmf").read_bytes())
    quote = Quote.from_bytes(quote_bytes(4))
    body = dict(quote.body)
    for i, value in enumerate(log.replay_rtmrs()):
        body[f"rtmr_{i}"] = value
    check_rtmrs(log, dataclasses.replace(quote, body=body), "w")
    body["rtmr_2"] = bytes(48)
    with pytest.raises(AttestationError, match="RTMR2 mismatch"):
        check_rtmrs(log, dataclasses.replace(quote, body=body), "w")


def test_report_data_and_mr_config_id_binding_kbs_style() -> None:
    raw = quote_bytes(6)
    digest = Quote.from_bytes(raw).body["report_data"][:48]  # 48-byte digest + 16 zero bytes
    claims = verify(raw, expected_report_data=digest, expected_init_data=Q6_MR_CONFIG_ID).claims
    assert claims["init_data"] == Q6_MR_CONFIG_ID.hex()
    with pytest.raises(AttestationError, match=r"report_data mismatch: expected 0+, got"):
        verify(raw, expected_report_data=bytes(48))
    with pytest.raises(AttestationError, match=r"init_data \(MRCONFIGID\) mismatch"):
        verify(raw, expected_init_data=hashlib.sha384(b"other").digest())


# -- corrupted copies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "message"),
    [
        (30, "quote signature does not verify"),  # header.user_data
        (V4_MR_TD + 7, "quote signature does not verify"),  # body.mr_td
        (V4_REPORT_DATA, "quote signature does not verify"),  # body.report_data
        (V4_SIG + 5, "quote signature does not verify"),  # ECDSA r
        (V4_SIG + 40, "quote signature does not verify"),  # ECDSA s
        (V4_AK + 1, "quote signature does not verify"),  # attestation key
        (V4_QE_REPORT + 3, "QE report signature does not verify"),  # QE report cpu_svn
        (V4_QE_REPORT + 320, "QE report binding mismatch"),  # QE report report_data
        (V4_QE_AUTH + 2, "QE report binding mismatch"),  # QE auth data
    ],
)
def test_one_flipped_bit_is_refused(offset: int, message: str) -> None:
    with pytest.raises(AttestationError, match=message):
        verify(flip(quote_bytes(4), offset))


def test_one_flipped_bit_in_a_v5_body_is_refused() -> None:
    with pytest.raises(AttestationError, match="quote signature does not verify"):
        verify(flip(quote_bytes(5), 54 + 600))  # mr_servicetd


@pytest.mark.parametrize("size", [40, 600, 700, 1200, 2000])
def test_truncated_quote_is_refused(size: int) -> None:
    with pytest.raises(AttestationError, match="truncated"):
        verify(quote_bytes(4)[:size])


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, 3, "header.version: expected 4 or 5, got 3"),
        (2, 3, "att_key_type: expected 2"),
        (4, 0, r"tee_type: expected 0x81 \(TDX\), got 0x0"),
        (12, 0, "vendor_id: expected 939a7233"),
    ],
)
def test_bad_header_fields_are_named(offset: int, value: int, message: str) -> None:
    raw = bytearray(quote_bytes(4))
    raw[offset] = value
    with pytest.raises(AttestationError, match=message):
        verify(bytes(raw))


@pytest.mark.parametrize(
    ("ev", "message"),
    [
        ({"quote": "not base64!"}, r"tdx evidence\.quote: expected base64"),
        ({"quote": "", "extra": 1}, "unknown field.*extra"),
        ({"cc_eventlog": None}, "missing field.*quote"),
        (
            {"quote": "", "aa_eventlog": "x"},
            "aa_eventlog: a separate AA event log is not supported",
        ),
    ],
)
def test_malformed_evidence_is_refused(ev: dict[str, Any], message: str) -> None:
    with pytest.raises(AttestationError, match=message):
        get_verifier("tdx").verify(ev)


def test_corrupted_event_log_is_refused() -> None:
    log = vector("eventlog/CCEL_data_ovmf").read_bytes()
    with pytest.raises(AttestationError, match="cc_eventlog: truncated"):
        get_verifier("tdx").verify(evidence(quote_bytes(4), log[:200]))


# -- forged chains ------------------------------------------------------------------------------


def _pem_offset(raw: bytes) -> int:
    return raw.index(b"-----BEGIN CERTIFICATE-----")


def with_chain(raw: bytes, pem: bytes) -> bytes:
    """The v4 quote with its PCK chain replaced (length fields fixed up)."""
    start = _pem_offset(raw)
    out = bytearray(raw[:start] + pem)
    struct.pack_into("<I", out, start - 4, len(pem))
    struct.pack_into("<I", out, 766, len(out) - 770)  # QE certification data size
    struct.pack_into("<I", out, 632, len(out) - 636)  # signature data length
    return bytes(out)


def _intel_name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Intel Corporation"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )


def _cert(subject: x509.Name, issuer: x509.Name, key: Any, signer: Any, ext: Any = None):
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
    )
    if ext is not None:
        b = b.add_extension(ext, critical=False)
    return b.sign(signer, hashes.SHA256())


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def test_pck_chain_to_an_unknown_root_is_refused() -> None:
    """A quote whose every signature verifies, under a home-made 'Intel SGX Root CA'."""
    raw = bytearray(quote_bytes(4))
    original = Quote.from_bytes(bytes(raw))
    leaf = x509.load_pem_x509_certificates(original.pck_chain_pem)[0]
    sgx_ext = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.2.840.113741.1.13.1"))
    root_key, ca_key, pck_key, ak = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    root_name, ca_name = _intel_name("Intel SGX Root CA"), _intel_name("Intel SGX PCK Platform CA")
    root = _cert(root_name, root_name, root_key, root_key)
    ca = _cert(ca_name, root_name, ca_key, root_key)
    pck = _cert(_intel_name("Intel SGX PCK Certificate"), ca_name, pck_key, ca_key, sgx_ext.value)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (pck, ca, root))
    ak_xy = ak.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )[1:]
    raw[V4_MR_TD] ^= 0xFF  # the attacker's TD
    raw[V4_AK : V4_AK + 64] = ak_xy
    auth = bytes(raw[V4_QE_AUTH : V4_QE_AUTH + 32])
    raw[V4_QE_REPORT + 320 : V4_QE_REPORT + 384] = hashlib.sha256(ak_xy + auth).digest() + bytes(32)
    raw[V4_QE_REPORT + 384 : V4_QE_REPORT + 448] = _sign(
        pck_key, bytes(raw[V4_QE_REPORT : V4_QE_REPORT + 384])
    )
    raw[V4_SIG : V4_SIG + 64] = _sign(ak, bytes(raw[:632]))
    forged = with_chain(bytes(raw), pem)
    with pytest.raises(
        AttestationError,
        match="not at the trusted 'Intel SGX Root CA': certificate chain to an unknown root",
    ):
        verify(forged)
    # and appending Intel's real root after the forged one does not help
    real_root = intel_root().public_bytes(serialization.Encoding.PEM)
    with pytest.raises(
        AttestationError, match="does not verify with the key of 'Intel SGX Root CA'"
    ):
        verify(
            with_chain(
                bytes(raw), pem.replace(root.public_bytes(serialization.Encoding.PEM), real_root)
            )
        )


def test_swapped_chain_cert_is_refused() -> None:
    """quote 4 with quote 5's PCK chain: the chain is Intel's, but the QE report was not
    signed by that PCK key."""
    other = Quote.from_bytes(quote_bytes(5)).pck_chain_pem
    with pytest.raises(
        AttestationError, match="QE report signature does not verify with the PCK leaf key"
    ):
        verify(with_chain(quote_bytes(4), other))
