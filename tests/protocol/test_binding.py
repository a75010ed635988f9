"""The attestation binding owned by protocol/: key checks, one report_data(), one Initdata model,
typed sessions, and verifier settings passed as arguments."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coco.errors import AttestationError
from coco.integrity.initdata import Initdata
from coco.protocol.client import TeeKey
from coco.protocol.kbs import Challenge, InitData, ProtocolError, TeePubKey, report_data
from coco.tee import get_attester, get_verifier

EC = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": "AAAA", "y": "BBBB"}


@pytest.mark.parametrize(
    "changes",
    [
        {"alg": "RSA-OAEP-256"},  # an EC key with an RSA algorithm
        {"alg": "ECDH-ES"},
        {"crv": "P-384"},
        {"kty": "RSA", "alg": "RS256", "n": "AQAB", "e": "AQAB"},
    ],
)
def test_tee_pubkey_refuses_unsupported_kty_alg_crv(changes: dict[str, str]) -> None:
    with pytest.raises(ProtocolError, match="tee-pubkey: unsupported kty="):
        TeePubKey.from_json({**EC, **changes})


def test_tee_pubkey_loads_only_real_keys() -> None:
    key = TeePubKey.from_json(EC)  # the upstream vector's shape parses ...
    with pytest.raises(ProtocolError, match="tee-pubkey"):
        key.public_key()  # ... but is not a point on P-256
    real = TeeKey.generate("ec-p521").pubkey
    assert isinstance(TeePubKey.from_json(real.to_json()).public_key(), ec.EllipticCurvePublicKey)


def _service():  # type: ignore[no-untyped-def]
    from coco.trustee.attestation.ear import TokenSigner
    from coco.trustee.attestation.service import AttestationService
    from coco.trustee.rvps import Rvps
    from coco.trustee.storage import open_store

    store = open_store("memory://")
    signer = TokenSigner(ec.generate_private_key(ec.SECP256R1()))
    return AttestationService(store, Rvps(store), signer)


def test_service_expects_the_report_data_the_client_computes() -> None:
    from coco.trustee.attestation.service import VerificationRequest

    key = TeeKey.generate().pubkey
    for alg in ("sha256", "sha384", "sha512"):
        req = VerificationRequest("sample", None, "bm9uY2U=", key, "", alg)
        assert req.report_data == report_data("bm9uY2U=", key, "", alg)
    device = VerificationRequest("sample", None, "n", key, None)
    assert device.report_data == report_data("n", key, None)
    assert "additional-evidence" not in device.runtime_data
    evidence = get_attester("sample").get_evidence(report_data("n", key, ""))
    tee_class, annotated = _service()._annotate(VerificationRequest("sample", evidence, "n", key))
    assert tee_class == "cpu" and annotated["runtime_data_claims"]["nonce"] == "n"
    with pytest.raises(AttestationError, match="report data mismatch"):
        _service()._annotate(VerificationRequest("sample", evidence, "other", key))


def test_init_data_is_integrity_s_model() -> None:
    from coco.trustee.attestation.service import init_data_claims, parse_init_data

    body = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"aa.toml\" = '''a = 1'''\n"
    parsed = parse_init_data(InitData("toml", body))
    assert parsed == Initdata.parse(body.encode())
    assert init_data_claims(parsed) == {"aa.toml": {"a": 1}}
    for bad, why in ((InitData("json", "{}"), "format: expected 'toml'"),
                     (InitData("toml", "algorithm = 'md5'\n"), "init-data: unknown key|missing"),
                     (InitData("toml", 'version = "0.1.0"\nalgorithm = ["sha256"]\ndata = {}\n'),
                      "algorithm: expected one of")):  # fmt: skip
        with pytest.raises(AttestationError, match=why):
            parse_init_data(bad)


def test_fit_is_defined_once() -> None:
    from coco.crypto.digest import fit
    from coco.integrity import initdata
    from coco.tee import _common

    assert initdata.fit is fit and _common.fit is fit
    assert fit(b"\x01" * 3, 5) == b"\x01\x01\x01\x00\x00" and fit(b"\x01" * 9, 2) == b"\x01\x01"


def test_session_state_is_typed_and_keeps_upstream_wire_form() -> None:
    from coco.trustee.kbs import session

    authed = session.Authed("a" * 32, "sample", Challenge("bm9uY2U=", ""), "2026-01-01T00:00:00Z")
    doc = json.loads(authed.dump())
    assert set(doc) == {"Authed"} and doc["Authed"]["challenge"]["nonce"] == "bm9uY2U="
    assert session.load(authed.dump()) == authed
    attested = session.Attested("a" * 32, "t.o.k", "2026-01-01T00:00:00Z")
    assert session.load(attested.dump()) == attested
    for junk in (None, b"", b"[]", b'{"Authed": {"id": 1}}', b'{"Other": {}}', b"\xff"):
        assert session.load(junk) is None


def test_verifier_settings_are_arguments_not_environment(tmp_path: Path) -> None:
    tpm = get_verifier("tpm", {"trusted_ak_keys_dir": str(tmp_path)})
    assert Path(tpm.trusted_ak_keys_dir) == tmp_path  # type: ignore[attr-defined]
    with pytest.raises(AttestationError, match="verifier settings for sample"):
        get_verifier("sample", {"trusted_ak_keys_dir": str(tmp_path)})

    from coco.trustee.config import KbsConfig
    from coco.trustee.kbs.app import KbsApp

    cfg = KbsConfig.from_dict({
        "http_server": {"insecure_http": True},
        "admin": {"authorization_mode": "InsecureAllowAll"},
        "attestation_service": {"verifier_config": {"tpm_verifier": {"trusted_ak_keys_dir": "ak"}}},
    })  # fmt: skip
    assert cfg.verifier_settings == {"tpm": {"trusted_ak_keys_dir": os.path.abspath("ak")}}
    before = os.environ.get("COCO_TPM_TRUSTED_AK_KEYS_DIR")
    app = KbsApp(cfg)
    assert os.environ.get("COCO_TPM_TRUSTED_AK_KEYS_DIR") == before
    assert app.attestation.verifier_settings == cfg.verifier_settings


def test_storage_base_imports_no_backend() -> None:
    import coco.trustee.storage.base as base

    tree = ast.parse(Path(base.__file__).read_text())
    names = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not {m for m in names if m.startswith("coco.trustee.storage")}, names
