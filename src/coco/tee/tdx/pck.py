"""Intel's PCK certificate hierarchy: the bundled SGX Root CA, the chain check, SGX extensions.

The Intel SGX Root CA is a public certificate, kept in ``data/intel_sgx_root_ca.pem`` (taken
from the upstream quote vectors). The PCK leaf carries an SGX extension
(``1.2.840.113741.1.13.1``) with the platform's FMSPC, TCB levels and, for multi-package
platforms (Platform CA), the platform instance ID; a tiny DER reader decodes it.
"""

from __future__ import annotations

import datetime
import functools
import itertools
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from coco.errors import AttestationError
from coco.tee._common import check_signed_by, cn, load_pem_certs

SGX_EXT = "1.2.840.113741.1.13.1"


@functools.cache
def intel_root() -> x509.Certificate:
    data = resources.files("coco.tee.tdx").joinpath("data", "intel_sgx_root_ca.pem").read_bytes()
    (root,) = load_pem_certs(data, "bundled Intel SGX Root CA")
    check_signed_by(root, root, "bundled Intel SGX Root CA")
    return root


def check_chain(
    chain: list[x509.Certificate],
    where: str,
    root: x509.Certificate | None = None,
    at: datetime.datetime | None = None,
) -> None:
    """Leaf first, root last; every certificate signed by the next; the last one must be the
    trusted Intel SGX Root CA (byte-for-byte) and every certificate valid at ``at`` if given."""
    root = root or intel_root()
    if len(chain) < 2:
        raise AttestationError(
            f"{where}: expected a leaf and Intel's root, got {len(chain)} cert(s)"
        )
    last = chain[-1]
    if last.fingerprint(hashes.SHA256()) != root.fingerprint(hashes.SHA256()):
        raise AttestationError(
            f"{where}: the chain ends at {cn(last)!r} "
            f"(sha256 {last.fingerprint(hashes.SHA256()).hex()[:16]}…), not at the trusted "
            f"{cn(root)!r}: certificate chain to an unknown root"
        )
    for cert, issuer in itertools.pairwise(chain):
        check_signed_by(cert, issuer, where)
    if at is not None:
        for cert in chain:
            if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
                raise AttestationError(
                    f"{where}: certificate {cn(cert)!r} is not valid at {at.isoformat()} "
                    f"(valid {cert.not_valid_before_utc.isoformat()} to "
                    f"{cert.not_valid_after_utc.isoformat()})"
                )


# -- a minimal DER reader (definite lengths only) ------------------------------------------------


def _der_items(data: bytes, where: str) -> list[tuple[int, bytes]]:
    items, pos = [], 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise AttestationError(f"{where}: truncated DER at offset {pos}")
        tag, length = data[pos], data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or pos + n > len(data):
                raise AttestationError(f"{where}: bad DER length at offset {pos}")
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        if pos + length > len(data):
            raise AttestationError(f"{where}: truncated DER value at offset {pos}")
        items.append((tag, data[pos : pos + length]))
        pos += length
    return items


def _oid(raw: bytes) -> str:
    first = raw[0]
    parts = [first // 40, first % 40]
    value = 0
    for b in raw[1:]:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))


def _decode(tag: int, raw: bytes, where: str) -> Any:
    if tag == 0x30:  # SEQUENCE of (OID, value) pairs or of such sequences
        out: dict[str, Any] = {}
        for t, v in _der_items(raw, where):
            if t != 0x30:
                raise AttestationError(f"{where}: expected SEQUENCE entries, got tag 0x{t:02x}")
            pair = _der_items(v, where)
            if len(pair) != 2 or pair[0][0] != 0x06:
                raise AttestationError(f"{where}: expected (OID, value) pairs")
            out[_oid(pair[0][1])] = _decode(pair[1][0], pair[1][1], where)
        return out
    if tag in (0x02, 0x0A):  # INTEGER, ENUMERATED
        return int.from_bytes(raw, "big", signed=False)
    if tag == 0x01:  # BOOLEAN
        return raw != b"\0"
    if tag == 0x04:  # OCTET STRING
        return bytes(raw)
    raise AttestationError(f"{where}: unexpected DER tag 0x{tag:02x}")


@dataclass(frozen=True)
class PckInfo:
    """What the PCK leaf says about the platform."""

    ca: str  # "platform" or "processor"
    fmspc: bytes
    pce_id: bytes
    pce_svn: int
    cpu_svn: bytes
    tcb_components: list[int]
    sgx_type: int
    platform_instance_id: bytes | None = None
    configuration: dict[str, bool] = field(default_factory=dict)


def pck_info(leaf: x509.Certificate, issuer: x509.Certificate, where: str) -> PckInfo:
    try:
        ext = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXT)).value
    except x509.ExtensionNotFound:
        raise AttestationError(f"{where}: PCK certificate has no SGX extension {SGX_EXT}") from None
    if not isinstance(ext, x509.UnrecognizedExtension):
        raise AttestationError(f"{where}: SGX extension could not be read")
    items = _der_items(ext.value, where)
    if len(items) != 1:
        raise AttestationError(f"{where}: SGX extension: expected one SEQUENCE")
    sgx = _decode(items[0][0], items[0][1], f"{where}: SGX extension")
    p = SGX_EXT + "."
    try:
        tcb = sgx[p + "2"]
        comps = [int(tcb[f"{p}2.{i}"]) for i in range(1, 17)]
        issuer_cn = cn(issuer)
        config = sgx.get(p + "7", {})
        return PckInfo(
            ca="platform" if "Platform" in issuer_cn else "processor",
            fmspc=sgx[p + "4"],
            pce_id=sgx[p + "3"],
            pce_svn=int(tcb[p + "2.17"]),
            cpu_svn=tcb[p + "2.18"],
            tcb_components=comps,
            sgx_type=int(sgx[p + "5"]),
            platform_instance_id=sgx.get(p + "6"),
            configuration={
                name: bool(config[p + f"7.{i}"])
                for i, name in ((1, "dynamic_platform"), (2, "cached_keys"), (3, "smt_enabled"))
                if p + f"7.{i}" in config
            },
        )
    except (KeyError, TypeError) as e:
        raise AttestationError(f"{where}: SGX extension lacks field {e}") from None
