"""Initdata digests and annotations against coreutils (sha*sum, base64, gzip) as peers."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import pytest

from coco.errors import InitdataError
from coco.integrity import initdata
from tests.cli.run import invoke

from .conftest import run_main

DOC = """version = "0.1.0"
algorithm = "{alg}"

[data]
"aa.toml" = '''
[token_configs.kbs]
url = "http://10.0.0.1:8080"
'''
"policy.rego" = '''
package agent_policy
default CreateContainerRequest := true
'''
"""


def _doc(tmp_path: Path, alg: str, extra: str = "") -> Path:
    p = tmp_path / f"initdata-{alg}.toml"
    p.write_bytes((DOC.format(alg=alg) + extra).encode())
    return p


def _sum(alg: str, path: Path) -> str:
    out = subprocess.run([f"{alg}sum", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


@pytest.mark.parametrize("alg", ["sha256", "sha384", "sha512"])
def test_digest_and_fitted_forms(tmp_path, alg):
    p = _doc(tmp_path, alg, "# a comment changes the bytes, so the digest\n")
    res = invoke(["initdata", "digest", str(p)])
    assert res.exit_code == 0, res.output
    out = dict(line.split(" ", 1) for line in res.output.splitlines())
    full = _sum(alg, p)
    assert out["algorithm"] == alg and out["digest"] == full
    assert out["host_data"] == full[:64]
    assert out["mrconfigid"] == (full + "0" * 96)[:96]
    if alg == "sha256":
        assert out["mrconfigid"] == full + "00" * 16  # zero padded on the right
    res = invoke(["initdata", "digest", str(p), "--format=json"])
    assert json.loads(res.output)["mrconfigid"] == out["mrconfigid"]


def test_encode_is_gzip_base64_and_decodes_with_coreutils(tmp_path):
    p = _doc(tmp_path, "sha384")
    res = invoke(["initdata", "encode", str(p)])
    assert res.exit_code == 0, res.output
    value = res.output.strip()
    peer = subprocess.run(
        f"echo '{value}' | base64 -d | gzip -d", shell=True, capture_output=True, check=True
    )
    assert peer.stdout == p.read_bytes()
    res = invoke(["initdata", "encode", "--annotation", str(p)])
    assert res.output.strip() == f"{initdata.ANNOTATION}={value}"


def test_decode_what_coreutils_encoded(tmp_path):
    p = _doc(tmp_path, "sha512")
    enc = tmp_path / "value"
    subprocess.run(f"gzip -9 -c '{p}' | base64 -w 76 > '{enc}'", shell=True, check=True)
    out = tmp_path / "back.toml"
    res = invoke(["initdata", "decode", str(enc), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == p.read_bytes()
    res = invoke(["initdata", "digest", "--encoded", str(enc)])
    assert f"digest {_sum('sha512', p)}" in res.output.splitlines()
    # the annotation form (old key too) is accepted as input
    ann = tmp_path / "ann"
    ann.write_text(f"{initdata.ANNOTATION_LEGACY}={enc.read_text()}")
    res = invoke(["initdata", "decode", str(ann)])
    assert res.exit_code == 0 and res.stdout_bytes == p.read_bytes()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (DOC.format(alg="md5"), "algorithm: expected one of sha256, sha384, sha512, found 'md5'"),
        (DOC.format(alg="sha256").replace("0.1.0", "0.2.0"), "version: expected '0.1.0'"),
        ("extra = 1\n" + DOC.format(alg="sha256"), "unknown key(s) 'extra'"),
        ('version = "0.1.0"\nalgorithm = "sha256"\n', "missing 'data'"),
        ('version = "0.1.0"\nalgorithm = "sha256"\n[data]\nx = 3\n', "data.'x': expected a string"),
        ('version = "0.1.0"\nalgorithm = sha256\n', "expected TOML"),
        ('version = "0.1.0"\n# \xff\n', "expected UTF-8 TOML"),
    ],
)
def test_bad_documents(tmp_path, text, message):
    p = tmp_path / "bad.toml"
    p.write_bytes(text.encode("latin-1"))
    with pytest.raises(InitdataError, match=r"bad\.toml"):
        initdata.Initdata.parse(p.read_bytes(), str(p))
    for verb in ("digest", "encode"):
        code, err = run_main(["initdata", verb, str(p)])
        assert code == 1 and err.count("\n") == 1 and message in err, err


def test_bad_annotations(tmp_path):
    good = gzip.compress(DOC.format(alg="sha256").encode())
    import base64

    cases = {
        "not base64!": "expected standard base64",
        base64.b64encode(b"plain text").decode(): "expected gzip data",
        base64.b64encode(good[:-8]).decode(): "gzip data is truncated",
        base64.b64encode(gzip.compress(b"version = 1\n")).decode(): "missing 'algorithm'",
    }
    for value, message in cases.items():
        p = tmp_path / "v"
        p.write_text(value)
        out = tmp_path / "out.toml"
        code, err = run_main(["initdata", "decode", str(p), "-o", str(out)])
        assert code == 1 and message in err, (value, err)
        assert not out.exists()
        assert list(tmp_path.iterdir()) == [p]


def test_decoded_size_is_bounded(monkeypatch):
    monkeypatch.setattr(initdata, "MAX_DECODED", 1000)
    import base64

    value = base64.b64encode(gzip.compress(b"#" * 5000)).decode()
    with pytest.raises(InitdataError, match="exceeds 1000 bytes"):
        initdata.decode(value)


def test_fit():
    assert initdata.fit(b"\x01" * 64, 32) == b"\x01" * 32
    assert initdata.fit(b"\x01" * 32, 48) == b"\x01" * 32 + b"\x00" * 16


def test_device_image(tmp_path):
    p = _doc(tmp_path, "sha256")
    img = tmp_path / "initdata.img"
    res = invoke(["initdata", "encode", str(p), "--image", str(img)])
    assert res.exit_code == 0, res.output
    blob = img.read_bytes()
    assert blob[:8] == b"initdata" and len(blob) % 512 == 0
    n = int.from_bytes(blob[8:16], "little")
    peer = subprocess.run(["gzip", "-dc"], input=blob[16 : 16 + n], capture_output=True, check=True)
    assert peer.stdout == p.read_bytes()
    assert blob[16 + n :].count(0) == len(blob) - 16 - n
    res = invoke(["initdata", "decode", str(img)])
    assert res.exit_code == 0 and res.stdout_bytes == p.read_bytes()
    bad = bytearray(blob)
    bad[8:16] = (len(blob)).to_bytes(8, "little")
    with pytest.raises(InitdataError, match="header says"):
        initdata.decode_image(bytes(bad), "img")
