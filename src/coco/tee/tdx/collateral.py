"""Intel TDX TCB collateral: authenticate Intel PCS ``tcbInfo``/``enclaveIdentity`` and evaluate
a quote's TCB status against them, offline.

A collateral directory holds ``tcbInfo.json`` and ``enclaveIdentity.json`` exactly as Intel PCS
(v4) serves them, and ``tcb_signing_chain.pem``: the ``TCB-Info-Issuer-Chain`` PEM (Intel SGX TCB
Signing, Intel SGX Root CA). Each document's ``signature`` is ECDSA P-256 (raw r||s) over the
exact bytes of its ``tcbInfo``/``enclaveIdentity`` member. Without the chain, collateral is
refused unless the verifier was built with ``insecure_skip_collateral_signature`` (a warning is
logged: anyone could have written those files).

Evaluation: the PCK certificate's FMSPC/PCE ID select the TCB info; the first TCB level whose SGX
components and PCE SVN are at most the PCK's and whose TDX components are at most the quote's
TEE_TCB_SVN gives the platform status; the TDX module identity and the QE identity are matched
too. ``Revoked`` (or no matching level) is refused; the other statuses become ``tcb_status``.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from coco.errors import AttestationError
from coco.tee._common import load_pem_certs
from coco.tee.tdx.pck import PckInfo, check_chain
from coco.tee.tdx.quote import Quote

log = logging.getLogger(__name__)

TCB_INFO_FILE = "tcbInfo.json"
QE_IDENTITY_FILE = "enclaveIdentity.json"
SIGNING_CHAIN_FILE = "tcb_signing_chain.pem"
_OUT_OF_DATE = {"UpToDate": "OutOfDate", "SWHardeningNeeded": "OutOfDate",
                "ConfigurationNeeded": "OutOfDateConfigurationNeeded",
                "ConfigurationAndSWHardeningNeeded": "OutOfDateConfigurationNeeded"}  # fmt: skip
ACCEPTED = {
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "TDRelaunchAdvised",
    "TDRelaunchAdvisedConfigurationNeeded",
}


def raw_member(text: str, key: str, where: str) -> bytes:
    """The exact bytes of the JSON object value of top-level ``key`` (what Intel signed)."""
    marker = f'"{key}"'
    start = text.find(marker)
    if start < 0:
        raise AttestationError(f"{where}: no {key!r} member")
    pos = text.find("{", start + len(marker))
    if pos < 0 or text[start + len(marker) : pos].strip() != ":":
        raise AttestationError(f"{where}: {key!r} is not a JSON object")
    depth, in_str, esc = 0, False, False
    for i in range(pos, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[pos : i + 1].encode()
    raise AttestationError(f"{where}: unterminated {key!r} object")


def _date(value: Any, where: str) -> datetime.datetime:
    try:
        return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise AttestationError(f"{where}: expected an ISO 8601 date, got {value!r}") from None


@dataclass(frozen=True)
class SignedDocument:
    body: dict[str, Any]
    issue_date: datetime.datetime
    next_update: datetime.datetime

    @classmethod
    def load(cls, path: Path, key: str, signer: ec.EllipticCurvePublicKey | None) -> SignedDocument:
        where = f"collateral {path}"
        try:
            text = path.read_text()
            doc = json.loads(text)
        except (OSError, ValueError) as e:
            raise AttestationError(f"{where}: expected Intel PCS JSON: {e}") from e
        if not isinstance(doc, dict) or set(doc) != {key, "signature"}:
            raise AttestationError(f"{where}: expected exactly the members {key!r} and 'signature'")
        body = doc[key]
        if signer is not None:
            try:
                sig = bytes.fromhex(doc["signature"])
            except (TypeError, ValueError):
                raise AttestationError(f"{where}: signature: expected hex") from None
            if len(sig) != 64:
                raise AttestationError(f"{where}: signature: expected 64 bytes, got {len(sig)}")
            der = encode_dss_signature(
                int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
            )
            try:
                signer.verify(der, raw_member(text, key, where), ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                raise AttestationError(
                    f"{where}: signature does not verify with the Intel SGX TCB Signing key"
                ) from None
        return cls(
            body=body,
            issue_date=_date(body.get("issueDate"), f"{where}: issueDate"),
            next_update=_date(body.get("nextUpdate"), f"{where}: nextUpdate"),
        )


def _svns(components: Any, where: str) -> list[int]:
    if not isinstance(components, list) or len(components) != 16:
        raise AttestationError(f"{where}: expected 16 TCB components")
    return [int(c["svn"]) for c in components]


def _masked_equal(value: bytes, expected_hex: str, mask_hex: str) -> bool:
    expected, mask = bytes.fromhex(expected_hex), bytes.fromhex(mask_hex)
    return len(value) == len(expected) == len(mask) and all(
        (v & m) == (e & m) for v, e, m in zip(value, expected, mask, strict=True)
    )


@dataclass(frozen=True)
class Collateral:
    tcb_info: SignedDocument
    qe_identity: SignedDocument

    @classmethod
    def load(cls, folder: Path, *, insecure_skip_signature: bool = False) -> Collateral:
        signer: ec.EllipticCurvePublicKey | None = None
        chain_path = folder / SIGNING_CHAIN_FILE
        if chain_path.is_file():
            chain = load_pem_certs(chain_path.read_bytes(), f"collateral {chain_path}")
            check_chain(chain, f"collateral {chain_path}")
            key = chain[0].public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise AttestationError(f"collateral {chain_path}: expected an EC signing key")
            signer = key
        elif insecure_skip_signature:
            log.warning(
                "INSECURE: TDX collateral in %s is used without checking Intel's signature", folder
            )
        else:
            raise AttestationError(
                f"collateral {folder}: no {SIGNING_CHAIN_FILE} (the TCB-Info-Issuer-Chain): "
                "cannot authenticate the TCB info"
            )
        return cls(
            tcb_info=SignedDocument.load(folder / TCB_INFO_FILE, "tcbInfo", signer),
            qe_identity=SignedDocument.load(folder / QE_IDENTITY_FILE, "enclaveIdentity", signer),
        )

    def evaluate(
        self, quote: Quote, pck: PckInfo, where: str, now: datetime.datetime | None = None
    ) -> dict[str, Any]:
        """The DCAP-style claims (``tcb_status``, ``advisory_ids``, ...); refuses Revoked."""
        now = now or datetime.datetime.now(datetime.UTC)
        info = self.tcb_info.body
        try:
            if info.get("id") != "TDX":
                raise AttestationError(
                    f"{where}: tcbInfo id: expected 'TDX', got {info.get('id')!r}"
                )
            if bytes.fromhex(info["fmspc"]) != pck.fmspc:
                raise AttestationError(
                    f"{where}: tcbInfo is for FMSPC {info['fmspc'].lower()}, the PCK certificate "
                    f"says {pck.fmspc.hex()}"
                )
            if bytes.fromhex(info["pceId"]) != pck.pce_id:
                raise AttestationError(f"{where}: tcbInfo pceId does not match the PCK certificate")
            tee_svn = quote.body["tcb_svn"]
            module_status = self._module_status(info, quote, where)
            level = self._platform_level(info, pck, tee_svn)
            if level is None:
                raise AttestationError(
                    f"{where}: no TCB level of the tcbInfo matches this platform (TCB unrecognized)"
                )
            qe_status = self._qe_status(quote, where)
        except (KeyError, TypeError, ValueError) as e:
            raise AttestationError(f"{where}: malformed collateral: {e!r}") from None
        status = str(level["tcbStatus"])
        for other in (module_status, qe_status):
            if other == "Revoked" or status == "Revoked":
                raise AttestationError(f"{where}: TCB status Revoked")
            if other == "OutOfDate":
                status = _OUT_OF_DATE.get(status, status)
        if status not in ACCEPTED:
            raise AttestationError(f"{where}: TCB status {status!r} is not acceptable")
        docs = (self.tcb_info, self.qe_identity)
        expired = any(now > d.next_update for d in docs)
        return {
            "tcb_status": status,
            "advisory_ids": list(level.get("advisoryIDs", [])),
            "tcb_date": level.get("tcbDate", ""),
            "collateral_expiration_status": "1" if expired else "0",
            "earliest_issue_date": min(d.issue_date for d in docs).isoformat(),
            "latest_issue_date": max(d.issue_date for d in docs).isoformat(),
            "earliest_expiration_date": min(d.next_update for d in docs).isoformat(),
            "tcb_eval_num": int(info.get("tcbEvaluationDataNumber", 0)),
            "sgx_type": pck.sgx_type,
            "is_dynamic_platform": pck.configuration.get("dynamic_platform", False),
            "is_cached_keys": pck.configuration.get("cached_keys", False),
            "is_smt_enabled": pck.configuration.get("smt_enabled", False),
        }

    @staticmethod
    def _platform_level(
        info: dict[str, Any], pck: PckInfo, tee_svn: bytes
    ) -> dict[str, Any] | None:
        start = 2 if tee_svn[1] > 0 else 0  # TDX 1.5+: the first two bytes are the module's
        for level in info["tcbLevels"]:
            tcb = level["tcb"]
            sgx = _svns(tcb["sgxtcbcomponents"], "tcbLevels.sgxtcbcomponents")
            tdx = _svns(tcb["tdxtcbcomponents"], "tcbLevels.tdxtcbcomponents")
            if (
                all(p >= s for p, s in zip(pck.tcb_components, sgx, strict=True))
                and pck.pce_svn >= int(tcb["pcesvn"])
                and all(tee_svn[i] >= tdx[i] for i in range(start, 16))
            ):
                return level
        return None

    @staticmethod
    def _module_status(info: dict[str, Any], quote: Quote, where: str) -> str:
        tee_svn = quote.body["tcb_svn"]
        mrsigner, attrs = quote.body["mrsigner_seam"], quote.body["seam_attributes"]
        if tee_svn[1] == 0:
            module = info["tdxModule"]
            levels = None
        else:
            wanted = f"TDX_{tee_svn[1]:02X}"
            module = next(
                (m for m in info.get("tdxModuleIdentities", []) if m["id"] == wanted), None
            )
            if module is None:
                raise AttestationError(f"{where}: tcbInfo has no TDX module identity {wanted}")
            levels = module["tcbLevels"]
        if bytes.fromhex(module["mrsigner"]) != mrsigner:
            raise AttestationError(
                f"{where}: TDX module mrsigner_seam mismatch: collateral {module['mrsigner'].lower()}, "
                f"quote {mrsigner.hex()}"
            )
        if not _masked_equal(attrs, module["attributes"], module["attributesMask"]):
            raise AttestationError(
                f"{where}: TDX module seam_attributes do not match the collateral"
            )
        if levels is None:
            return "UpToDate"
        for level in levels:
            if tee_svn[0] >= int(level["tcb"]["isvsvn"]):
                return str(level["tcbStatus"])
        return "Revoked"

    def _qe_status(self, quote: Quote, where: str) -> str:
        ident = self.qe_identity.body
        qe = quote.qe_report
        if ident.get("id") != "TD_QE":
            raise AttestationError(
                f"{where}: enclaveIdentity id: expected 'TD_QE', got {ident.get('id')!r}"
            )
        if bytes.fromhex(ident["mrsigner"]) != qe.mr_signer:
            raise AttestationError(
                f"{where}: QE mrsigner mismatch: collateral {ident['mrsigner'].lower()}, "
                f"quote {qe.mr_signer.hex()}"
            )
        if int(ident["isvprodid"]) != qe.isv_prod_id:
            raise AttestationError(
                f"{where}: QE isvprodid mismatch: collateral {ident['isvprodid']}, quote {qe.isv_prod_id}"
            )
        misc = qe.misc_select.to_bytes(4, "big")
        if not _masked_equal(misc, ident["miscselect"], ident["miscselectMask"]):
            raise AttestationError(f"{where}: QE miscselect does not match the collateral")
        if not _masked_equal(qe.attributes, ident["attributes"], ident["attributesMask"]):
            raise AttestationError(f"{where}: QE attributes do not match the collateral")
        for level in ident["tcbLevels"]:
            if qe.isv_svn >= int(level["tcb"]["isvsvn"]):
                return str(level["tcbStatus"])
        return "Revoked"
