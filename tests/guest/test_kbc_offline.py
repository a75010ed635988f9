"""offline_fs_kbc (upstream's JSON files), the aa_kbc_params factory and ResourceUri."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

import coco.guest.kbc as kbc_mod
from coco.errors import KbsError
from coco.guest.kbc import (
    KbcError,
    OfflineFsKbc,
    ResourceMissingError,
    aa_kbc_params,
    kbc_from_params,
    parse_kbc_params,
)
from coco.protocol.resource_uri import ResourceUri, ResourceUriError

# upstream's example key file entry
KEY_B64 = "REXwTCcCFObQdE9ZfL0a/iZtucCwBIo36/L0aL5l7UA="


def _write(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_offline_fs_reads_upstream_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = _write(tmp_path / "keys.json", {"default/key/key_id1": KEY_B64})
    res = _write(
        tmp_path / "res.json",
        {"default/security-policy/test": base64.b64encode(b'{"default":[]}').decode()},
    )
    extra = _write(
        tmp_path / "extra.json", {"default/key/key_id1": base64.b64encode(b"k2").decode()}
    )
    env = {"OFFLINE_FS_KBC_EXTRA_FILE_PATH": f"{extra},{tmp_path / 'missing.json'}"}
    with caplog.at_level(logging.WARNING):
        kbc = OfflineFsKbc([keys, res], environ=env)
        assert kbc.get_resource("kbs:///default/key/key_id1") == base64.b64decode(KEY_B64)
        assert kbc.get_resource("kbs:///default/security-policy/test") == b'{"default":[]}'
        with pytest.raises(
            ResourceMissingError, match=r"kbs:///default/key/nope: not in .*keys\.json"
        ):
            kbc.get_resource("kbs:///default/key/nope")
        with pytest.raises(KbcError, match="no attestation token"):
            kbc.get_token()
        # the default files plus the extra ones: a later file wins, a missing one warns
        monkeypatch.setattr(kbc_mod, "OFFLINE_FS_FILES", (keys, res))
        merged = OfflineFsKbc(environ=env)
    assert merged.get_resource("kbs:///default/key/key_id1") == b"k2"
    assert "missing.json does not exist" in caplog.text
    assert "overrides an earlier file" in caplog.text


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1, 2], "expected a JSON object"),
        ({"a/b": "eA=="}, "expected 3 path segments"),
        ({"a/b/c": 7}, "a/b/c: expected a base64 string, found int"),
        ({"a/b/c": "!!!"}, "a/b/c: not base64"),
    ],
)
def test_offline_fs_refuses_malformed_files(tmp_path: Path, doc: object, message: str) -> None:
    path = _write(tmp_path / "bad.json", doc)
    with pytest.raises(KbsError, match=message) as e:
        OfflineFsKbc([path])
    assert str(path) in str(e.value)


def test_offline_fs_refuses_deep_json(tmp_path: Path) -> None:
    (tmp_path / "deep.json").write_text("[" * 100000)
    with pytest.raises(KbcError, match=r"deep\.json: expected JSON of reasonable depth"):
        OfflineFsKbc([tmp_path / "deep.json"])


def test_kbc_params_from_env_then_kernel_cmdline(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("quiet agent.aa_kbc_params=cc_kbc::http://10.0.0.2:8080 console=ttyS0\n")
    env = {"AA_KBC_PARAMS": "offline_fs_kbc::null"}
    assert aa_kbc_params(env, cmdline) == "offline_fs_kbc::null"
    assert aa_kbc_params({}, cmdline) == "cc_kbc::http://10.0.0.2:8080"
    assert aa_kbc_params({}, tmp_path / "absent") is None
    assert parse_kbc_params("cc_kbc::http://10.0.0.2:8080") == ("cc_kbc", "http://10.0.0.2:8080")
    for bad, message in [
        ("cc_kbc", "expected <kbc>::<url>"),
        ("a::b::c", "expected <kbc>::<url>"),
        ("eaa_kbc::http://x", "unknown KBC 'eaa_kbc'"),
        ("cc_kbc::null", "expected an http:// or https:// KBS URL"),
    ]:
        with pytest.raises(KbcError, match=message):
            parse_kbc_params(bad)
    with pytest.raises(KbcError, match="aa_kbc_params: not set"):
        kbc_from_params(environ={}, cmdline=tmp_path / "absent")


def test_offline_kbc_from_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "OFFLINE_FS_KBC_EXTRA_FILE_PATH", str(_write(tmp_path / "r.json", {"a/b/c": "eA=="}))
    )
    assert kbc_from_params("offline_fs_kbc::null").get_resource("kbs:///a/b/c") == b"x"


@pytest.mark.parametrize(
    ("text", "address", "path"),
    [
        ("kbs:///default/key/1", "", "default/key/1"),
        ("kbs://1.2.3.4:8080/default/key/1", "1.2.3.4:8080", "default/key/1"),
        ("kbs://kbs.example.com/a_b/c-d/e.f", "kbs.example.com", "a_b/c-d/e.f"),
        ("kbs://[::1]:80/r/t/g", "[::1]:80", "r/t/g"),
    ],
)
def test_resource_uri_accepts(text: str, address: str, path: str) -> None:
    uri = ResourceUri.parse(text)
    assert (uri.address, uri.resource_path, str(uri)) == (address, path, text)
    assert uri.kbs_path == "/kbs/v0/resource/" + path
    assert ResourceUri.of(uri) is uri and ResourceUri.of(text) == uri


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kbs:///a/b", "expected 3 path segments <repository>/<type>/<tag>, found 2"),
        ("kbs:///a/b/c/d", "found 4"),
        ("kbs:///a/b/c/", "found 4"),
        ("kbs:///.a/b/c", "repository '.a'"),
        ("kbs:///a//c", "type ''"),
        ("kbs:///a/b/c\n", "tag 'c\\\\n'"),
        ("kbs:///a/b/c?x=1", "query or fragment"),
        ("http://h/a/b/c", "found 'http://'"),
        ("kbs+pkcs11:///a/b/c", "found 'kbs\\+pkcs11://'"),
        ("/a/b/c", "found 'no scheme'"),
        ("kbs://h:0/a/b/c", "port from 1 to 65535, found '0'"),
        ("kbs://h:70000/a/b/c", "found '70000'"),
        ("kbs://a b/x/y/z", "expected a host name"),
        ("kbs://h", "found no path"),
    ],
)
def test_resource_uri_refuses(text: str, message: str) -> None:
    with pytest.raises(ResourceUriError, match=message) as e:
        ResourceUri.parse(text, "key id")
    assert str(e.value).startswith("key id ")
