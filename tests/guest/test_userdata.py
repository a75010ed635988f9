"""coco process-user-data: userdata from a genisoimage config drive or a URL, written only when its
initdata matches PCR 8 of a real (swtpm) TPM; refusals write nothing."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from coco.cli.main import main
from coco.guest.userdata import UserdataError, provision, read_config_drive, read_pcr8
from coco.host.peerpods.cloudconfig import apf_config, cloud_config
from coco.host.peerpods.providers.libvirt import make_config_drive
from coco.integrity.initdata import encode as encode_initdata
from coco.integrity.initdata import fit
from tests.swtpm import start_swtpm

INITDATA = b"""version = "0.1.0"
algorithm = "sha384"
[data]
"aa.toml" = '''
[token_configs.kbs]
url = "http://10.0.2.2:8080"
'''
"policy.rego" = "package agent_policy\\ndefault CreateContainerRequest := true\\n"
"""
OTHER = INITDATA.replace(b"8080", b"9999")


def _userdata(initdata: bytes | None = INITDATA) -> str:
    files = {"/run/peerpod/apf.json": apf_config("web", "default", server_key=None,
                                                 server_cert=None, client_ca=None),
             "/run/peerpod/auth.json": '{"auths": {}}'}  # fmt: skip
    if initdata is not None:
        files["/run/peerpod/initdata"] = encode_initdata(initdata)
    return cloud_config(files)


@pytest.fixture
def tpm(tmp_path: Path):
    with start_swtpm(tmp_path / "tpm") as tcti:
        yield tcti


def _extend(tcti: str, initdata: bytes) -> None:
    digest = fit(hashlib.sha384(initdata).digest(), 32)
    subprocess.run(
        ["tpm2_pcrextend", f"8:sha256={digest.hex()}"],
        env={**os.environ, "TPM2TOOLS_TCTI": tcti}, check=True, capture_output=True,
    )  # fmt: skip


def _coco(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _iso(tmp_path: Path, text: str) -> Path:
    iso = tmp_path / "cidata.iso"
    make_config_drive(text, "podvm-web-1", iso)
    return iso


def test_config_drive_with_measured_initdata_is_written(tmp_path: Path, tpm: str, capsys) -> None:
    _extend(tpm, INITDATA)
    iso = _iso(tmp_path, _userdata())
    root = tmp_path / "root"
    code = _coco(["process-user-data", "--config-drive", str(iso), "--root", str(root),
                 "--tpm-tcti", tpm])  # fmt: skip
    assert code == 0
    peer = root / "run/peerpod"
    assert sorted(p.name for p in peer.iterdir()) == [
        "aa.toml", "apf.json", "auth.json", "initdata", "initdata.digest", "policy.rego"
    ]  # fmt: skip
    assert (peer / "initdata.digest").read_text() == hashlib.sha384(INITDATA).hexdigest()
    assert "http://10.0.2.2:8080" in (peer / "aa.toml").read_text()
    assert json.loads((peer / "apf.json").read_text())["pod-name"] == "web"
    assert (peer / "auth.json").stat().st_mode & 0o777 == 0o600


def test_initdata_that_the_tee_did_not_measure_is_refused(tmp_path: Path, tpm: str, capsys) -> None:
    _extend(tpm, INITDATA)
    iso = _iso(tmp_path, _userdata(OTHER))
    root = tmp_path / "root"
    code = _coco(["process-user-data", "--config-drive", str(iso), "--root", str(root),
                 "--tpm-tcti", tpm])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "does not match the TEE's measurement: PCR 8 is" in err
    assert "refusing to run the pod" in err
    assert not root.exists()  # nothing written: no forwarder or agent config


def test_userdata_without_initdata_needs_an_unmeasured_vm(tmp_path: Path, tpm: str) -> None:
    root = tmp_path / "root"
    data = _userdata(None).encode()
    assert provision(data, "t", root, lambda: read_pcr8(tpm)) == [
        "/run/peerpod/apf.json", "/run/peerpod/auth.json"
    ]  # fmt: skip
    _extend(tpm, INITDATA)  # the VM was launched with initdata the host now withholds
    with pytest.raises(UserdataError, match="no initdata does not match the TEE's measurement"):
        provision(data, "t", tmp_path / "root2", lambda: read_pcr8(tpm))
    assert not (tmp_path / "root2").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("write_files: []\n", "expected a #cloud-config document"),
        ("#cloud-config\nruncmd: [reboot]\n", "expected only write_files, found ['runcmd']"),
        ("#cloud-config\nwrite_files:\n- path: /etc/shadow\n  content: x\n",
         "'/etc/shadow' is not one of /run/peerpod/aa.toml"),
        ("#cloud-config\nwrite_files:\n- path: /run/peerpod/initdata\n  content: bm90Z3ppcA==\n",
         "expected gzip data"),
        ("#cloud-config\nwrite_files: &a [*a]\n", "t:"),
        ("#cloud-config\nwrite_files:\n- path: /run/peerpod/apf.json\n  content: [1]\n",
         "expected text content"),
    ],
)  # fmt: skip
def test_bad_userdata_is_one_line_and_writes_nothing(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(UserdataError) as err:
        provision(text.encode(), "t", tmp_path / "root", None)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "root").exists()


def test_userdata_from_an_imds_like_url(tmp_path: Path, tpm: str) -> None:
    body = _userdata().encode()
    _extend(tpm, INITDATA)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/latest/user-data" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/latest/user-data"
        code = _coco(["process-user-data", "--url", url, "--root", str(tmp_path / "r"),
                     "--tpm-tcti", tpm])  # fmt: skip
        assert code == 0
        assert (tmp_path / "r/run/peerpod/initdata.digest").exists()
    finally:
        server.shutdown()
        server.server_close()


def test_config_drive_reader(tmp_path: Path) -> None:
    iso = _iso(tmp_path, "#cloud-config\nwrite_files: []\n")
    assert read_config_drive(iso) == b"#cloud-config\nwrite_files: []\n"
    assert read_config_drive(iso, "meta-data").startswith(b"instance-id: podvm-web-1")
    assert read_config_drive(iso, "absent") is None
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(64 * 1024))
    assert read_config_drive(plain) is None  # not ISO 9660: not a config drive
    other = tmp_path / "other.iso"
    subprocess.run(["genisoimage", "-quiet", "-o", str(other), "-V", "OTHER", "-r",
                    str(tmp_path / "plain.img")], check=True)  # fmt: skip
    assert read_config_drive(other) is None  # a volume not labelled cidata
