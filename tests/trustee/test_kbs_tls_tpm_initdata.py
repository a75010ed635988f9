"""HTTPS with a given key and certificate (openssl-made), init-data in the EAR and the resource
policy, and a real TPM (swtpm) attesting through `coco kbs-client get-resource --tee tpm`."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from coco.protocol.client import KbsClient, KbsRequestError
from coco.tee import get_attester
from coco.trustee.admin_client import AdminClient
from tests.trustee.conftest import ALLOW_ALL, VECTORS, KbsProcess, free_port


def test_https_with_given_key_and_certificate(tmp_path: Path) -> None:
    key, cert = tmp_path / "https.key", tmp_path / "https.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    kbs = KbsProcess(
        ["kbs", "serve", "--listen", f"127.0.0.1:{port}", "--private-key", str(key),
         "--certificate", str(cert), "--storage", f"sqlite://{tmp_path}/kbs.db"],
        f"https://127.0.0.1:{port}", tmp_path / "log",
    )  # fmt: skip
    kbs.start(verify=ssl.create_default_context(cafile=str(cert)))
    try:
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError)):  # no plain HTTP
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        with pytest.raises(httpx.ConnectError):  # and an unknown CA is refused by the client
            httpx.get(kbs.url + "/healthz", timeout=5)
        with AdminClient(kbs.url, verify=str(cert)) as a:
            a.set_resource("tls/key/one", b"over-tls")
            a.set_resource_policy(ALLOW_ALL)
        out = subprocess.run(
            [sys.executable, "-m", "coco.cli.main", "kbs-client", "--url", kbs.url, "--cert-file",
             str(cert), "get-resource", "--path", "tls/key/one"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert base64.b64decode(out.stdout) == b"over-tls"
    finally:
        kbs.stop()


def test_init_data_reaches_the_token_and_the_policy(open_kbs: KbsProcess) -> None:
    toml = (VECTORS / "misc" / "simple_init_data.toml").read_text()
    digest = hashlib.sha256(toml.encode()).digest()
    template = (
        VECTORS / "policies" / "integration-tests" / "kbs_init_data_hash.rego.template"
    ).read_text()
    policy = template.replace("{init_data_hash}", base64.b64encode(digest).decode())
    with AdminClient(open_kbs.url) as a:
        a.set_resource_policy(policy)
        a.set_resource("init/data/secret", b"bound")
    with KbsClient(open_kbs.url, get_attester("sample"), init_data_toml=toml) as c:
        assert c.get_resource("init/data/secret") == b"bound"
        claims = json.loads(base64.urlsafe_b64decode(c.token.split(".")[1] + "=="))  # type: ignore[union-attr]
    ae = claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]
    assert ae["init_data"] == "3wlz8dSrJAhU3wLkZ9HzClrvUrnBJr66MzBV40YGXIw="
    assert ae["init_data_claims"]["aa.toml"]["token_configs"]["kbs"]["url"] == "http://1.2.3.4:8080"
    with (
        KbsClient(open_kbs.url, get_attester("sample"), init_data_toml=toml + "\n# changed\n") as c,
        pytest.raises(KbsRequestError, match="PolicyDeny"),
    ):
        c.get_resource("init/data/secret")
    broken = KbsClient(open_kbs.url, get_attester("sample"), init_data_toml="not = [valid")
    with broken, pytest.raises(KbsRequestError, match="init-data: expected TOML"):
        broken.attest()


@pytest.mark.skipif(shutil.which("swtpm") is None or shutil.which("tpm2_quote") is None,
                    reason="swtpm and tpm2-tools are required")  # fmt: skip
def test_tpm_guest_gets_resource_under_the_default_policy(tmp_path: Path, start_kbs) -> None:
    from coco.tee.tpm.attester import TpmAttester
    from tests.swtpm import start_swtpm

    with start_swtpm(tmp_path / "tpm") as tcti:
        trusted = tmp_path / "trusted"
        trusted.mkdir()
        (trusted / "ak.pub").write_bytes(TpmAttester(tcti).ak_public_pem())
        kbs = start_kbs(env={"COCO_TPM_TRUSTED_AK_KEYS_DIR": str(trusted)})
        with AdminClient(kbs.url) as a:  # the default resource policy stays: TPM is hardware
            a.set_resource("tpm/key/one", b"for-the-tpm")
        base = [sys.executable, "-m", "coco.cli.main", "kbs-client", "--url", kbs.url, "get-resource",
                "--path", "tpm/key/one"]  # fmt: skip
        env = {"TPM2TOOLS_TCTI": tcti, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
        out = subprocess.run(
            [*base, "--tee", "tpm"], capture_output=True, text=True, env=env, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert base64.b64decode(out.stdout) == b"for-the-tpm"
        sample = subprocess.run(
            [*base, "--tee", "sample"], capture_output=True, text=True, timeout=120
        )
        assert sample.returncode == 1 and "PolicyDeny" in sample.stderr
        (trusted / "ak.pub").unlink()  # the AK is no longer trusted: attestation fails
        out = subprocess.run(
            [*base, "--tee", "tpm"], capture_output=True, text=True, env=env, timeout=120
        )
        assert out.returncode == 1 and "AttestationError" in out.stderr
