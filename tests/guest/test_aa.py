"""The Attestation Agent: aa.toml, the AAEL event log, runtime measurements on a real TPM (swtpm),
and ``coco aa serve`` over ttRPC against a real KBS, used by the KBC as the CDH uses it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coco.guest.aa.config import AaConfig, AaConfigError, AaError
from coco.guest.aa.eventlog import (
    EventLogError,
    RuntimeEventLog,
    entry,
    event_text,
    parse,
    replay,
    tagged_event,
)
from coco.guest.aa.service import NOT_ENABLED, NOT_SUPPORTED, OK, AttestationAgent
from coco.guest.kbc import AaTokenSource, CcKbc, KbcError
from coco.rpc import Code, RpcError, Stub, SyncClient
from coco.rpc.protos import attestation_agent_pb2 as pb
from coco.rpc.services import ATTESTATION_AGENT
from coco.tee import get_attester
from coco.trustee.admin_client import AdminClient
from tests.trustee.conftest import ALLOW_ALL, KbsProcess, open_kbs

__all__ = ["open_kbs"]

HAVE_TPM = shutil.which("swtpm") is not None and shutil.which("tpm2_pcrread") is not None
AA_TOML = """
[token_configs.coco_as]
url = "http://127.0.0.1:8000"

[token_configs.kbs]
url = "{url}"
tee_key_algorithm = "ECDH-ES+A256KW-P256"

[eventlog_config]
eventlog_algorithm = "sha384"
init_pcr = 17
enable_eventlog = {enable}

[log]
level = "info"
"""


# ---------------------------------------------------------------------------------- aa.toml


def test_aa_toml_of_upstream_shape(tmp_path: Path) -> None:
    path = tmp_path / "aa.toml"
    path.write_text(AA_TOML.format(url="http://127.0.0.1:8080", enable="true"))
    cfg = AaConfig.load(path)
    assert cfg.kbs is not None and cfg.kbs.url == "http://127.0.0.1:8080"
    assert cfg.kbs.key_algorithm == "ec-p256" and cfg.coco_as_url == "http://127.0.0.1:8000"
    assert (cfg.eventlog.init_pcr, cfg.eventlog.enable_eventlog) == (17, True)
    assert AaConfig.parse({}).kbs is None and AaConfig.parse({}).eventlog.init_pcr == 17
    as_json = tmp_path / "aa.json"
    as_json.write_text(json.dumps({"token_configs": {"kbs": {"url": "https://kbs:8080"}}}))
    assert AaConfig.load(as_json).kbs.url == "https://kbs:8080"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"token_config": {}}, "unknown key.*token_config"),
        ({"token_configs": {"kbs": {}}}, r"\[token_configs.kbs\]: missing 'url'"),
        ({"token_configs": {"kbs": {"url": "ftp://x"}}}, "http:// or https://"),
        ({"token_configs": {"kbs": {"url": "http://x", "tee_key_algorithm": "RSA1_5"}}}, "RSA1_5"),
        ({"eventlog_config": {"init_pcr": 24}}, "init_pcr: expected a PCR number 0-23"),
        ({"eventlog_config": {"enable_eventlog": "yes"}}, "expected true or false"),
        ({"eventlog_config": {"eventlog_algorithm": "md5"}}, "eventlog_algorithm"),
    ],
)
def test_aa_toml_refusals(doc: dict, message: str) -> None:
    with pytest.raises(AaConfigError, match=message):
        AaConfig.parse(doc, "aa.toml")


def test_aa_config_from_kernel_cmdline(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("agent.aa_kbc_params=cc_kbc::http://10.0.0.9:8080\n")
    assert AaConfig.from_kernel_cmdline({}, cmdline).kbs.url == "http://10.0.0.9:8080"  # type: ignore[union-attr]
    assert (
        AaConfig.from_kernel_cmdline({"AA_KBC_PARAMS": "offline_fs_kbc::null"}, cmdline).kbs is None
    )
    assert AaConfig.from_kernel_cmdline({}, tmp_path / "none").kbs is None


# ---------------------------------------------------------------------------------- event log


def test_aael_entries_match_the_spec_vectors() -> None:
    text = event_text("domain", "operation", "content")
    assert hashlib.sha256(tagged_event(text)).hexdigest() == (
        "46df8dacf00a07d34a83cdf56d7978697790787cf2ba1432ef7c38f22cd96351"
    )
    data, digest = entry(text, 4, "sha384")
    assert digest.hex() == (
        "dad5f0e226318ffa9839b75a472c6aa7fdb5834949d0a0a22990cf04d5692440"
        "fb00f3aa0609db7e49cd8d793f670d02"
    )
    (rec,) = parse(data)
    assert (rec.register, rec.algorithm, rec.text) == (4, "sha384", text)
    assert replay([rec])[4] == hashlib.sha384(bytes(48) + digest).digest()
    for bad in (("a b", "op", "c"), ("d", "", "c"), ("d", "op", "two\nlines")):
        with pytest.raises(EventLogError):
            event_text(*bad)


def test_event_log_is_persisted_and_survives_a_crash(tmp_path: Path) -> None:
    log = RuntimeEventLog(tmp_path / "eventlog")
    extended: list[bytes] = []
    log.append(event_text("d", "op", "one"), 17, "sha256", extended.append)
    log.append(event_text("d", "op", "two words"), 17, "sha256", extended.append)
    assert [r.text for r in RuntimeEventLog(tmp_path / "eventlog").records()] == [
        "d op one", "d op two words",
    ]  # fmt: skip
    assert [r.digest for r in log.records()] == extended

    def broken(digest: bytes) -> None:
        raise OSError("register write failed")

    with pytest.raises(OSError):
        log.append(event_text("d", "op", "three"), 17, "sha256", broken)
    assert len(log.records()) == 2 and not log.wal.exists()  # not measured: not logged
    # a crash between the append and the extension leaves the write-ahead file behind
    size = log.path.stat().st_size
    data, _ = entry("d op four", 17, "sha256")
    log.wal.write_bytes(size.to_bytes(8, "big") + data)
    with open(log.path, "ab") as f:
        f.write(data[:20])  # torn
    again = RuntimeEventLog(tmp_path / "eventlog")
    assert len(again.records()) == 2 and not again.wal.exists()
    log.path.write_bytes(log.path.read_bytes() + b"\x01")
    with pytest.raises(EventLogError, match=r"truncated|not a whole"):
        log.records()


def test_runtime_measurement_results(tmp_path: Path) -> None:
    cfg = AaConfig.parse({"eventlog_config": {"enable_eventlog": True}})
    sample = get_attester("sample")
    aa = AttestationAgent(cfg, sample, eventlog_path=tmp_path / "log")
    assert aa.extend_runtime_measurement("d", "op", "c") == NOT_SUPPORTED
    off = AttestationAgent(AaConfig(), sample, eventlog_path=tmp_path / "log2")
    assert off.extend_runtime_measurement("d", "op", "c") == NOT_ENABLED
    assert not (tmp_path / "log2").exists()


@pytest.mark.skipif(not HAVE_TPM, reason="swtpm and tpm2-tools are required")
def test_runtime_measurements_extend_a_real_tpm_pcr(tmp_path: Path) -> None:
    from coco.tee.tpm.attester import TpmAttester
    from tests.swtpm import start_swtpm

    with start_swtpm(tmp_path / "tpm") as tcti:
        cfg = AaConfig.parse({"eventlog_config": {"enable_eventlog": True, "init_pcr": 16}})
        aa = AttestationAgent(cfg, TpmAttester(tcti), eventlog_path=tmp_path / "eventlog")
        content = json.dumps({"image": "docker.io/library/busybox", "digest": "sha256:00"})
        assert (
            aa.extend_runtime_measurement(
                "github.com/confidential-containers", "PullImage", content
            )
            == OK
        )
        assert aa.extend_runtime_measurement("d", "op", "second", register_index=23) == OK
        # upstream's default PCR 17 cannot be extended from locality 0: a clear error, no entry
        with pytest.raises(AaError, match=r"PCR 17: not recorded: .*locality 4 only"):
            aa.extend_runtime_measurement("d", "op", "third", register_index=17)
        records = RuntimeEventLog(tmp_path / "eventlog").records()
        assert [r.register for r in records] == [16, 23]
        expected = replay(records)
        out = subprocess.run(
            ["tpm2_pcrread", "sha256:16,23", "-o", str(tmp_path / "pcrs")],
            env={**os.environ, "TPM2TOOLS_TCTI": tcti}, capture_output=True, check=True,
        )  # fmt: skip
        del out
        pcrs = (tmp_path / "pcrs").read_bytes()
        assert pcrs[:32] == expected[16] and pcrs[32:] == expected[23]


# ---------------------------------------------------------------------------------- ttRPC


def _start_aa(tmp_path: Path, *args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    sock = tmp_path / "aa" / "aa.sock"
    log = open(tmp_path / "aa.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "coco.cli.main", "aa", "serve", "--socket", f"unix://{sock}",
         "--eventlog", str(tmp_path / "eventlog"), *args],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((tmp_path / "aa.log").read_text())
        time.sleep(0.05)
    return proc, f"unix://{sock}", log


@pytest.fixture
def aa_service(tmp_path: Path, open_kbs: KbsProcess) -> Iterator[tuple[str, KbsProcess]]:
    """``coco aa serve --tee sample`` with the shared KBS (allow-all resource policy)."""
    with AdminClient(open_kbs.url) as a:
        a.set_resource_policy(ALLOW_ALL)
        a.set_resource("aa/key/one", b"through the agent")
    cfg = tmp_path / "aa.toml"
    cfg.write_text(AA_TOML.format(url=open_kbs.url, enable="false"))
    proc, address, log = _start_aa(tmp_path, "--config", str(cfg), "--tee", "sample")
    try:
        yield address, open_kbs
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_aa_over_ttrpc(aa_service: tuple[str, KbsProcess]) -> None:
    address, _ = aa_service
    with SyncClient(address) as client:
        aa = Stub(client, ATTESTATION_AGENT, timeout=50)
        assert aa.GetTeeType().tee == "sample"
        assert list(aa.GetAdditionalTees().additional_tees) == []
        ev = json.loads(aa.GetEvidence(pb.GetEvidenceRequest(RuntimeData=b"abc")).Evidence)
        assert ev == {"svn": "1", "report_data": base64.b64encode(b"abc").decode()}
        assert (
            aa.GetAdditionalEvidence(pb.GetAdditionalEvidenceRequest(RuntimeData=b"x")).Evidence
            == b""
        )
        reply = json.loads(aa.GetToken(pb.GetTokenRequest(TokenType="kbs")).Token)
        assert set(reply) == {"token", "tee_keypair"} and reply["token"].count(".") == 2
        with pytest.raises(RpcError) as e:
            aa.GetToken(pb.GetTokenRequest(TokenType="bogus"))
        assert e.value.code == Code.INTERNAL
        assert e.value.message.startswith("[ERROR:attestation-agent] AA-KBC get token failed: ")
        req = pb.ExtendRuntimeMeasurementRequest(Domain="d", Operation="op", Content="c")
        assert aa.ExtendRuntimeMeasurement(req).Result == pb.NOT_ENABLED
        aa.BindInitData(pb.BindInitDataRequest(Digest=bytes(32)))  # sample: nothing to bind, OK
        # the agent keeps serving after errors
        assert aa.GetTeeType().tee == "sample"


def test_kbc_with_tokens_from_the_aa(aa_service: tuple[str, KbsProcess]) -> None:
    """The CDH's way: cc_kbc gets its token and TEE key from the AA over ttRPC."""
    address, kbs = aa_service
    source = AaTokenSource(address)
    with CcKbc(kbs.url, source) as kbc:
        assert kbc.get_resource("kbs:///aa/key/one") == b"through the agent"
        assert kbc.get_resource("kbs:///aa/key/one") == b"through the agent"
    with pytest.raises(KbcError, match=r"AA unix:///nonexistent/aa\.sock: GetToken"):
        AaTokenSource("unix:///nonexistent/aa.sock").fetch_token()


# ---------------------------------------------------------------------------------- CLI


def _coco(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coco.cli.main", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_cli_evidence_and_token(tmp_path: Path, open_kbs: KbsProcess) -> None:
    out = _coco("aa", "evidence", "--tee", "sample", "--runtime-data-base64", "AAEC")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["report_data"] == "AAEC"
    bad = _coco("aa", "evidence", "--tee", "sample", "--runtime-data-base64", "!!")
    assert bad.returncode == 2 and "expected standard base64" in bad.stderr
    cfg = tmp_path / "aa.toml"
    cfg.write_text(AA_TOML.format(url=open_kbs.url, enable="false"))
    out = _coco("aa", "token", "--config", str(cfg), "--tee", "sample")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tee_keypair"].startswith("-----BEGIN PRIVATE KEY-----")
    none = _coco("aa", "token", "--tee", "sample", env={"AA_KBC_PARAMS": "offline_fs_kbc::null"})
    assert none.returncode == 1 and "no KBS configured" in none.stderr
    assert none.stderr.count("\n") <= 2  # one line (plus the sample warning), no traceback


@pytest.mark.skipif(not HAVE_TPM, reason="swtpm and tpm2-tools are required")
def test_cli_ak_public_matches_the_quotes(tmp_path: Path) -> None:
    from coco.tee.tpm.attester import TpmAttester
    from coco.tee.tpm.verifier import TpmVerifier
    from tests.swtpm import start_swtpm

    with start_swtpm(tmp_path / "tpm") as tcti:
        out = _coco("aa", "ak-public", "--tcti", tcti)
        assert out.returncode == 0, out.stderr
        trusted = tmp_path / "trusted"
        trusted.mkdir()
        (trusted / "ak.pub").write_text(out.stdout)
        rd = hashlib.sha384(b"x").digest()
        ev = _coco("aa", "evidence", "--tee", "tpm", "--runtime-data-base64",
                   base64.b64encode(rd).decode(), env={"TPM2TOOLS_TCTI": tcti})  # fmt: skip
        assert ev.returncode == 0, ev.stderr
        TpmVerifier(trusted).verify(json.loads(ev.stdout), rd)
        assert out.stdout.encode() == TpmAttester(tcti).ak_public_pem()
