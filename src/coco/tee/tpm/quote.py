"""TPM 2.0 quotes: TPMS_ATTEST and TPMT_SIGNATURE parsing, signature, PCR-digest and PCR8 checks.

All TPM structures are big-endian. A quote is the ``TPMS_ATTEST`` bytes the TPM signed
(``magic 0xff544347``, ``type 0x8018``, ``extraData`` = the qualifying data / nonce, and a
``TPMS_QUOTE_INFO`` with the PCR selection and the digest of the selected PCR values).
Shared by the generic ``tpm`` verifier and the Azure vTPM verifiers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from coco.crypto.digest import init_data_pcr
from coco.errors import AttestationError
from coco.tee.binary import ByteReader

TPM_GENERATED = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_RSASSA, TPM_ALG_RSAPSS, TPM_ALG_ECDSA = 0x0014, 0x0016, 0x0018
HASH_ALGS: dict[int, tuple[str, hashes.HashAlgorithm]] = {
    0x0004: ("sha1", hashes.SHA1()),
    0x000B: ("sha256", hashes.SHA256()),
    0x000C: ("sha384", hashes.SHA384()),
    0x000D: ("sha512", hashes.SHA512()),
}
INITDATA_PCR = 8


class _Reader(ByteReader):
    """TPM structures are big endian and carry TPM2B (u16 size + bytes) fields."""

    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(data, where, ">")

    def tpm2b(self, what: str) -> bytes:
        return self.take(self.u16(f"{what} size"), what)


@dataclass(frozen=True)
class Attest:
    """A parsed TPMS_ATTEST of type quote."""

    raw: bytes = field(repr=False)
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_selection: list[tuple[int, list[int]]]  # (hash alg, selected PCR indices)
    pcr_digest: bytes

    @classmethod
    def parse(cls, raw: bytes, where: str = "TPM quote") -> Attest:
        r = _Reader(raw, f"{where}: TPMS_ATTEST")
        magic = r.u32("magic")
        if magic != TPM_GENERATED:
            raise AttestationError(
                f"{where}: TPMS_ATTEST magic: expected 0xff544347 (TPM_GENERATED), got 0x{magic:08x}"
            )
        kind = r.u16("type")
        if kind != TPM_ST_ATTEST_QUOTE:
            raise AttestationError(
                f"{where}: TPMS_ATTEST type: expected 0x8018 (quote), got 0x{kind:04x}"
            )
        signer = r.tpm2b("qualifiedSigner")
        extra = r.tpm2b("extraData")
        clock, resets, restarts, safe = (
            r.u64("clock"),
            r.u32("resetCount"),
            r.u32("restartCount"),
            r.u8("safe"),
        )
        fw = r.u64("firmwareVersion")
        selection = []
        for _ in range(r.u32("pcrSelect count")):
            alg = r.u16("pcrSelect hash")
            bitmap = r.take(r.u8("sizeofSelect"), "pcrSelect bitmap")
            pcrs = [i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1]
            selection.append((alg, pcrs))
        digest = r.tpm2b("pcrDigest")
        r.done()
        return cls(
            raw=bytes(raw),
            qualified_signer=signer,
            extra_data=extra,
            clock=clock,
            reset_count=resets,
            restart_count=restarts,
            safe=bool(safe),
            firmware_version=fw,
            pcr_selection=selection,
            pcr_digest=digest,
        )


@dataclass(frozen=True)
class Signature:
    """A TPMT_SIGNATURE (RSASSA, RSAPSS or ECDSA)."""

    alg: int
    hash_alg: int
    rsa: bytes = b""
    ecc_r: bytes = b""
    ecc_s: bytes = b""

    @classmethod
    def parse(cls, raw: bytes, where: str = "TPM quote signature") -> Signature:
        r = _Reader(raw, f"{where}: TPMT_SIGNATURE")
        alg, hash_alg = r.u16("sigAlg"), r.u16("hash")
        if alg in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
            sig = cls(alg=alg, hash_alg=hash_alg, rsa=r.tpm2b("signature"))
        elif alg == TPM_ALG_ECDSA:
            sig = cls(
                alg=alg, hash_alg=hash_alg, ecc_r=r.tpm2b("signatureR"), ecc_s=r.tpm2b("signatureS")
            )
        else:
            raise AttestationError(
                f"{where}: sigAlg: expected RSASSA (0x14), RSAPSS (0x16) or ECDSA (0x18), got 0x{alg:x}"
            )
        r.done()
        return sig

    def verify(self, key: object, message: bytes, where: str) -> None:
        if self.hash_alg not in HASH_ALGS:
            raise AttestationError(f"{where}: unsupported signature hash 0x{self.hash_alg:x}")
        h = HASH_ALGS[self.hash_alg][1]
        try:
            if self.alg in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
                if not isinstance(key, rsa.RSAPublicKey):
                    raise AttestationError(f"{where}: an RSA signature needs an RSA AK")
                pad: padding.AsymmetricPadding = (
                    padding.PKCS1v15()
                    if self.alg == TPM_ALG_RSASSA
                    else padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.AUTO)
                )
                key.verify(self.rsa, message, pad, h)
            else:
                if not isinstance(key, ec.EllipticCurvePublicKey):
                    raise AttestationError(f"{where}: an ECDSA signature needs an EC AK")
                sig = encode_dss_signature(
                    int.from_bytes(self.ecc_r, "big"), int.from_bytes(self.ecc_s, "big")
                )
                key.verify(sig, message, ec.ECDSA(h))
        except InvalidSignature:
            raise AttestationError(
                f"{where}: TPM quote signature does not verify with the AK (quote altered or forged)"
            ) from None


def verify_rsassa_sha256(key: object, signature: bytes, message: bytes, where: str) -> None:
    """A bare RSASSA-PKCS1-v1_5 SHA-256 signature (the Azure vTPM quote form)."""
    Signature(alg=TPM_ALG_RSASSA, hash_alg=0x000B, rsa=signature).verify(key, message, where)


def check_pcr_digest(attest: Attest, pcrs: list[bytes], where: str) -> None:
    """The quote's pcrDigest is the hash of the selected PCR values, in selection order."""
    if len(attest.pcr_selection) != 1:
        raise AttestationError(
            f"{where}: expected one PCR bank in the quote selection, got {len(attest.pcr_selection)}"
        )
    alg, selected = attest.pcr_selection[0]
    if alg != 0x000B:
        raise AttestationError(f"{where}: PCR bank: expected sha256 (0x000b), got 0x{alg:04x}")
    if any(i >= len(pcrs) for i in selected):
        raise AttestationError(
            f"{where}: the quote selects PCRs {selected}, the evidence holds {len(pcrs)} values"
        )
    digest = hashlib.sha256(b"".join(pcrs[i] for i in selected)).digest()
    if digest != attest.pcr_digest:
        raise AttestationError(
            f"{where}: PCR digest mismatch: the quote says {attest.pcr_digest.hex()}, the PCR "
            f"values in the evidence hash to {digest.hex()}"
        )
    if INITDATA_PCR not in selected:
        raise AttestationError(f"{where}: the quote does not cover PCR{INITDATA_PCR} (init-data)")


def check_init_data(pcrs: list[bytes], expected_init_data: bytes | None, where: str) -> None:
    if expected_init_data is None:
        return
    expected = init_data_pcr(expected_init_data)
    if pcrs[INITDATA_PCR] != expected:
        raise AttestationError(
            f"{where}: init_data mismatch: PCR{INITDATA_PCR} is {pcrs[INITDATA_PCR].hex()}, "
            f"expected SHA-256(0*32 || init_data) = {expected.hex()}"
        )
