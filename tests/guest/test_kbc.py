"""The guest's KBC (cc_kbc) against a real ``coco kbs serve``: token caching, re-attestation,
a KBS that is down, refusals; with the sample attester and with the TPM attester on swtpm."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from coco.crypto.jose import jwe_encrypt, public_jwk
from coco.guest.kbc import (
    AttesterTokenSource,
    CcKbc,
    KbsRefusedError,
    KbsUnavailableError,
    Token,
    kbc_from_params,
)
from coco.protocol.client import ResourceNotFoundError
from coco.protocol.resource_uri import ResourceUri, ResourceUriError
from coco.tee import get_attester
from coco.trustee.admin_client import AdminClient
from tests.trustee.conftest import ALLOW_ALL, KbsProcess, free_port, open_kbs, start_kbs

__all__ = ["open_kbs", "start_kbs"]  # fixtures shared with the KBS tests


def attest_count(kbs: KbsProcess) -> int:
    """``kbs_attestation_requests_total`` from the KBS's own /metrics."""
    text = httpx.get(kbs.url + "/metrics", timeout=10).text
    m = re.search(r"^kbs_attestation_requests_total (\d+)", text, re.M)
    return int(m.group(1)) if m else 0


@pytest.fixture
def allowing_kbs(open_kbs: KbsProcess) -> KbsProcess:
    """The shared KBS with an allow-all resource policy (the default one refuses sample)."""
    with AdminClient(open_kbs.url) as a:
        a.set_resource_policy(ALLOW_ALL)
        a.set_resource("guest/key/one", b"first secret")
        a.set_resource("guest/key/two", b"second secret")
    return open_kbs


def sample_kbc(url: str, **kw: object) -> CcKbc:
    return CcKbc.with_attester(url, get_attester("sample"), **kw)  # type: ignore[arg-type]


def test_token_is_cached_across_resources(allowing_kbs: KbsProcess) -> None:
    before = attest_count(allowing_kbs)
    with sample_kbc(allowing_kbs.url) as kbc:
        assert kbc.get_resource("kbs:///guest/key/one") == b"first secret"
        assert kbc.get_resource(ResourceUri.parse("kbs://10.0.0.1:8080/guest/key/two")) == (
            b"second secret"
        )
        assert kbc.get_resource("kbs:///guest/key/one") == b"first secret"
        assert isinstance(kbc.source, AttesterTokenSource)
        assert kbc.source.attestations == 1
    assert attest_count(allowing_kbs) - before == 1  # the KBS saw one attestation


def test_expired_token_means_a_new_attestation(allowing_kbs: KbsProcess) -> None:
    offset = [0.0]
    with sample_kbc(allowing_kbs.url, clock=lambda: time.time() + offset[0]) as kbc:
        assert kbc.get_resource("kbs:///guest/key/one") == b"first secret"
        token = kbc.token()
        assert token.expires is not None and token.expires > time.time()
        offset[0] = token.expires - time.time() + 1  # the clock passes the token's exp
        assert kbc.get_resource("kbs:///guest/key/one") == b"first secret"
        assert kbc.source.attestations == 2  # type: ignore[attr-defined]
        assert kbc.token().value != token.value


def test_token_refused_with_401_means_one_new_attestation(tmp_path: Path, start_kbs) -> None:
    """A KBS replaced by another one (new signing key): the cached token gets 401
    TokenVerifierError, the KBC attests again once and gets the resource."""
    port = free_port()
    first = start_kbs(port=port, storage=f"sqlite://{tmp_path}/one.db")
    for kbs in (first,):
        with AdminClient(kbs.url) as a:
            a.set_resource_policy(ALLOW_ALL)
            a.set_resource("r/key/k", b"v1")
    with sample_kbc(first.url) as kbc:
        assert kbc.get_resource("kbs:///r/key/k") == b"v1"
        first.stop()
        second = start_kbs(port=port, storage=f"sqlite://{tmp_path}/two.db")
        with AdminClient(second.url) as a:
            a.set_resource_policy(ALLOW_ALL)
            a.set_resource("r/key/k", b"v2")
        assert kbc.get_resource("kbs:///r/key/k") == b"v2"
        assert kbc.source.attestations == 2  # type: ignore[attr-defined]
        assert "TokenVerifierError" in second.logs()


def test_kbs_down_means_bounded_retries_then_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    waits: list[float] = []
    with (
        sample_kbc(url, attempts=4, backoff=0.01, sleep=waits.append) as kbc,
        pytest.raises(KbsUnavailableError) as e,
    ):
        kbc.get_resource("kbs:///a/b/c")
    assert waits == [0.01, 0.02, 0.04]  # exponential backoff, three waits for four attempts
    msg = str(e.value)
    assert url in msg and "4 connection attempt(s)" in msg and "\n" not in msg


def test_kbs_going_down_after_attesting(tmp_path: Path, start_kbs) -> None:
    kbs = start_kbs()
    with AdminClient(kbs.url) as a:
        a.set_resource_policy(ALLOW_ALL)
        a.set_resource("r/key/k", b"v")
    waits: list[float] = []
    with sample_kbc(kbs.url, attempts=3, backoff=0.01, sleep=waits.append) as kbc:
        assert kbc.get_resource("kbs:///r/key/k") == b"v"
        kbs.stop()
        with pytest.raises(KbsUnavailableError, match=re.escape(kbs.url)):
            kbc.get_resource("kbs:///r/key/k")
        assert waits == [0.01, 0.02]
        assert kbc.source.attestations == 1  # type: ignore[attr-defined]


def test_policy_deny_reaches_the_caller_without_attesting_again(start_kbs) -> None:
    kbs = start_kbs()  # the default resource policy refuses sample evidence
    with AdminClient(kbs.url) as a:
        a.set_resource("r/key/k", b"v")
    before = attest_count(kbs)
    with sample_kbc(kbs.url) as kbc:
        with pytest.raises(KbsRefusedError) as e:
            kbc.get_resource("kbs:///r/key/k")
        assert e.value.info is not None and e.value.info.variant == "PolicyDeny"
        assert "kbs:///r/key/k" in str(e.value) and "PolicyDeny" in str(e.value)
        assert kbc.source.attestations == 1  # type: ignore[attr-defined]
    assert attest_count(kbs) - before == 1


def test_missing_resource_is_not_found_without_attesting_again(allowing_kbs: KbsProcess) -> None:
    with sample_kbc(allowing_kbs.url) as kbc:
        with pytest.raises(ResourceNotFoundError, match="guest/key/absent"):
            kbc.get_resource("kbs:///guest/key/absent")
        assert kbc.source.attestations == 1  # type: ignore[attr-defined]


def test_bad_uris_are_refused_before_any_request(allowing_kbs: KbsProcess) -> None:
    with sample_kbc(allowing_kbs.url) as kbc:
        for bad in ("kbs:///a/b", "http://x/a/b/c", "kbs:///a/../b", "kbs+p:///a/b/c"):
            with pytest.raises(ResourceUriError):
                kbc.get_resource(bad)
        assert kbc.source.attestations == 0  # type: ignore[attr-defined]


def test_get_token_hands_out_the_token_and_its_key(allowing_kbs: KbsProcess) -> None:
    with sample_kbc(allowing_kbs.url) as kbc:
        token, pem = kbc.get_token()
        assert kbc.get_token()[0] == token  # cached
        key = serialization.load_pem_private_key(pem.encode(), None)
        assert pem.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8 for EC, as upstream
        # the key is the one the KBS encrypts to: it opens a JWE made for the token's tee-pubkey
        jwe = jwe_encrypt({**public_jwk(key), "alg": "ECDH-ES+A256KW"}, b"x")
        assert kbc.token().private_key.private_numbers() == key.private_numbers()  # type: ignore[union-attr]
        from coco.crypto.jose import jwe_decrypt

        assert jwe_decrypt(jwe, key) == b"x"  # type: ignore[arg-type]


class _GivenTokens:
    """A token source handing out given tokens (as the AA over ttRPC does for the CDH)."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.calls = 0

    def fetch_token(self) -> Token:
        self.calls += 1
        return self.tokens.pop(0)

    def close(self) -> None:
        pass


def test_pluggable_token_source_gets_bearer_access(allowing_kbs: KbsProcess) -> None:
    """Tokens made elsewhere (here by another KBC, as the AA would) work for resources; a
    token the KBS does not accept gets one fresh token from the source."""
    with sample_kbc(allowing_kbs.url) as maker:
        good = maker.token(refresh=True)
        bad = Token("e30.e30.", good.private_key, None)  # not a token the KBS trusts
    source = _GivenTokens([bad, good])
    with CcKbc(allowing_kbs.url, source) as kbc:
        assert kbc.get_resource("kbs:///guest/key/two") == b"second secret"
        assert source.calls == 2


def test_kbc_from_params(allowing_kbs: KbsProcess, tmp_path: Path) -> None:
    kbc = kbc_from_params(f"cc_kbc::{allowing_kbs.url}", attester=get_attester("sample"))
    with kbc:  # type: ignore[attr-defined]
        assert kbc.get_resource("kbs:///guest/key/one") == b"first secret"


@pytest.mark.skipif(
    shutil.which("swtpm") is None or shutil.which("tpm2_quote") is None,
    reason="swtpm and tpm2-tools are required",
)
def test_tpm_attester_under_the_default_policy(tmp_path: Path, start_kbs) -> None:
    from coco.tee.tpm.attester import TpmAttester
    from tests.swtpm import start_swtpm

    with start_swtpm(tmp_path / "tpm") as tcti:
        attester = TpmAttester(tcti)
        trusted = tmp_path / "trusted"
        trusted.mkdir()
        (trusted / "ak.pub").write_bytes(attester.ak_public_pem())
        kbs = start_kbs(env={"COCO_TPM_TRUSTED_AK_KEYS_DIR": str(trusted)})
        with AdminClient(kbs.url) as a:  # the default policy stays: a TPM is not sample
            a.set_resource("tpm/key/one", b"for the tpm")
        with CcKbc.with_attester(kbs.url, attester) as kbc:
            assert kbc.get_resource("kbs:///tpm/key/one") == b"for the tpm"
            assert kbc.get_resource("kbs:///tpm/key/one") == b"for the tpm"
            assert kbc.source.attestations == 1  # type: ignore[attr-defined]
        with sample_kbc(kbs.url) as kbc, pytest.raises(KbsRefusedError, match="PolicyDeny"):
            kbc.get_resource("kbs:///tpm/key/one")
