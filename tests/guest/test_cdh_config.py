"""cdh.toml: upstream's sample shape, strict keys, defaults, the kernel command line fallback,
the registry configuration, and credentials written at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coco.guest.cdh.config import (
    DEFAULT_AA_SOCKET,
    DEFAULT_SOCKET,
    DEFAULT_WORK_DIR,
    load_config,
    ocicrypt_config_json,
)
from coco.guest.cdh.errors import CdhConfigError, CdhError
from coco.guest.cdh.hub import Hub
from coco.guest.cdh.registries import RegistryConfig

from .cdh_util import DictGetter

# upstream's documented sample (spec §3.4), extra_root_certificates left out (not supported yet)
SAMPLE = '''
socket = "unix:///run/confidential-containers/cdh.sock"
skip_sealed_secret_verification = false

[aa]
aa_socket = "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock"

[kbc]
name = "cc_kbc"
url = "http://example.io:8080"
kbs_cert = """
-----BEGIN CERTIFICATE-----
MIIB
-----END CERTIFICATE-----
"""

[[credentials]]
path = "/run/confidential-containers/cdh/kbs/kms-credential/aliyun/ecsRamRole.json"
resource_uri = "kbs:///default/aliyun/ecs_ram_role"

[image]
work_dir = "/run/image-rs"
max_concurrent_layer_downloads_per_image = 3
sigstore_config_uri = "kbs:///default/sigstore-config/test"
image_security_policy_uri = "kbs:///default/security-policy/test"
authenticated_registry_credentials_uri = "kbs:///default/credential/test"
registry_configuration_uri = "kbs:///default/registry-configuration/test"

[image.registry_config]
unqualified-search-registries = ["docker.io", "example1.com"]

[[image.registry_config.registry]]
prefix = "example.com/foo"
insecure = false
blocked = false
location = "internal/bar"

[[image.registry_config.registry.mirror]]
location = "example-mirror-0.local/mirror-for-foo"
insecure = false

[image.image_pull_proxy]
https_proxy = "http://127.0.0.1:5432"
no_proxy = "192.168.0.1,localhost"

[log]
level = "info"
'''


def _load(tmp_path: Path, text: str, name: str = "cdh.toml", **kw):
    p = tmp_path / name
    p.write_text(text)
    return load_config(
        p, environ=kw.pop("environ", {}), cmdline_path=kw.pop("cmdline", tmp_path / "none")
    )


def test_upstream_sample(tmp_path: Path) -> None:
    c = _load(tmp_path, SAMPLE)
    assert c.kbc.name == "cc_kbc" and c.kbc.url == "http://example.io:8080"
    assert c.kbc.kbs_cert is not None and "BEGIN CERTIFICATE" in c.kbc.kbs_cert
    assert c.aa_socket == DEFAULT_AA_SOCKET and c.socket == DEFAULT_SOCKET
    assert c.credentials[0].resource_uri == "kbs:///default/aliyun/ecs_ram_role"
    assert c.image.work_dir == "/run/image-rs"
    assert c.image.image_security_policy_uri == "kbs:///default/security-policy/test"
    assert (
        c.image.image_pull_proxy is not None
        and c.image.image_pull_proxy.https_proxy == "http://127.0.0.1:5432"
    )
    assert c.image.registry_config is not None
    assert c.log_level == "info"
    # the same document as JSON
    import tomllib

    j = _load(tmp_path, json.dumps(tomllib.loads(SAMPLE)), "cdh.json")
    assert j.kbc == c.kbc and j.image == c.image and j.credentials == c.credentials


def test_defaults(tmp_path: Path) -> None:
    c = _load(tmp_path, '[kbc]\nname = "offline_fs_kbc"\n')
    assert (c.socket, c.aa_socket, c.kbc.url, c.skip_sealed_secret_verification) == (
        DEFAULT_SOCKET, DEFAULT_AA_SOCKET, "", False,
    )  # fmt: skip
    assert c.image.work_dir == DEFAULT_WORK_DIR
    assert c.image.image_security_policy_uri is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('sockett = "x"\n[kbc]\nname = "cc_kbc"\n', "unknown key 'sockett'"),
        ('[kbc]\nname = "cc_kbc"\nurll = "x"\n', "unknown key 'kbc.urll'"),
        ('[kbc]\nname = "cc_kbc"\n[image]\nimage_security_polcy_uri = "x"\n', "unknown key 'image.image_security_polcy_uri'"),
        ('[kbc]\nname = "cc_kbc"\n[image.image_pull_proxy]\nftp_proxy = "x"\n', "unknown key 'image.image_pull_proxy.ftp_proxy'"),
        ('[kbc]\nname = "cc_kbc"\n[image.registry_config]\nshort-name-mode = "x"\n', "unknown key 'short-name-mode'"),
        ('[kbc]\nname = "cc_kbc"\n[[image.registry_config.registry]]\nprefix = "a"\nmirrors = []\n', "unknown key 'mirrors'"),
        ("socket = 1\n[kbc]\nname = \"cc_kbc\"\n", "socket: expected a string, found int"),
        ('skip_sealed_secret_verification = "yes"\n[kbc]\nname = "cc_kbc"\n', "expected true or false"),
        ('socket = "x"\n', r"expected a \[kbc\] section"),
        ('[kbc]\nname = "eaa_kbc"\n', "expected one of cc_kbc, offline_fs_kbc, found 'eaa_kbc'"),
        ('[kbc]\nname = "cc_kbc"\n[[credentials]]\npath = "/etc/shadow"\nresource_uri = "kbs:///a/b/c"\n', "path must be a file under /run/confidential-containers/cdh/kbs"),
        ('[kbc]\nname = "cc_kbc"\n[[credentials]]\npath = "/run/confidential-containers/cdh/kbs/../../x"\nresource_uri = "kbs:///a/b/c"\n', "path must be a file under"),
        ('[kbc]\nname = "cc_kbc"\n[image]\nmax_concurrent_layer_downloads_per_image = 0\n', "expected a positive integer"),
        ('[kbc]\nname = "cc_kbc"\n[image]\nextra_root_certificates = ["x"]\n', "not supported yet"),
        ("[kbc\n", "expected TOML"),
    ],
)  # fmt: skip
def test_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(CdhConfigError, match=message) as e:
        _load(tmp_path, text)
    assert str(tmp_path / "cdh.toml") in str(e.value)  # names the file


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CdhConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", environ={})


def test_kernel_cmdline_fallback(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(
        "console=ttyS0 agent.aa_kbc_params=cc_kbc::http://10.0.0.1:8080 "
        "cdh.kbs_resources=kbs:///default/a/b::/run/confidential-containers/cdh/kbs/a.json "
        "agent.https_proxy=http://proxy:3128 agent.image_registry_auth=kbs:///default/credential/test "
        "agent.enable_signature_verification=true agent.image_policy_file=kbs:///default/security-policy/test\n"
    )
    c = load_config(None, environ={}, cmdline_path=cmdline)
    assert (c.kbc.name, c.kbc.url) == ("cc_kbc", "http://10.0.0.1:8080")
    assert [(x.resource_uri, x.path) for x in c.credentials] == [
        ("kbs:///default/a/b", "/run/confidential-containers/cdh/kbs/a.json")
    ]
    assert (
        c.image.image_pull_proxy is not None
        and c.image.image_pull_proxy.https_proxy == "http://proxy:3128"
    )
    assert c.image.authenticated_registry_credentials_uri == "kbs:///default/credential/test"
    assert c.image.image_security_policy_uri == "kbs:///default/security-policy/test"
    # the environment wins over the command line; the credentials override env wins over both
    env = {"AA_KBC_PARAMS": "offline_fs_kbc::null",
           "CDH_DEFAULT_IMAGE_AUTHENTICATED_REGISTRY_CREDENTIALS": "kbs:///x/y/z"}  # fmt: skip
    c = load_config(None, environ=env, cmdline_path=cmdline)
    assert (c.kbc.name, c.kbc.url) == ("offline_fs_kbc", "null")
    assert c.image.authenticated_registry_credentials_uri == "kbs:///x/y/z"
    # with an [image] section the kernel's image parameters are not used
    f = _load(tmp_path, '[kbc]\nname = "cc_kbc"\n[image]\nwork_dir = "/w"\n', cmdline=cmdline)
    assert f.image.image_pull_proxy is None and f.image.image_security_policy_uri is None
    assert len(f.credentials) == 1  # cdh.kbs_resources is added either way
    # nothing at all: offline_fs_kbc
    c = load_config(None, environ={}, cmdline_path=tmp_path / "missing")
    assert (c.kbc.name, c.kbc.url) == ("offline_fs_kbc", "")
    cmdline.write_text("agent.aa_kbc_params=cc_kbc:http://x\n")
    with pytest.raises(
        CdhConfigError, match=r"agent.aa_kbc_params: expected <kbc_name>::<kbs_uri>"
    ):
        load_config(None, environ={}, cmdline_path=cmdline)


def test_ocicrypt_config_json() -> None:
    assert ocicrypt_config_json(DEFAULT_SOCKET) == (
        b'{"key-providers":{"attestation-agent":{"ttrpc":"unix:///run/confidential-containers/cdh.sock"}}}'
    )


def test_registry_candidates() -> None:
    import tomllib

    reg = RegistryConfig.parse(tomllib.loads(SAMPLE)["image"]["registry_config"], "sample")
    places = [(str(p.reference), p.insecure) for p in reg.candidates("example.com/foo/app:1")]
    assert places == [
        ("docker://example-mirror-0.local/mirror-for-foo/app:1", False),
        ("docker://docker.io/internal/bar/app:1", False),  # no dot: a Docker Hub namespace
    ]
    short = [str(p.reference) for p in reg.candidates("busybox")]
    assert short == [
        "docker://docker.io/library/busybox:latest",
        "docker://example1.com/library/busybox:latest",
    ]
    blocked = RegistryConfig.parse({"registry": [{"prefix": "quay.io", "blocked": True}]}, "b")
    with pytest.raises(CdhError, match=r"quay\.io/a/b is blocked"):
        blocked.candidates("quay.io/a/b")
    assert [str(p.reference) for p in blocked.candidates("quay.io.example/a")] == [
        "docker://quay.io.example/a:latest"
    ]


def test_provision_credentials(tmp_path: Path, monkeypatch) -> None:
    import coco.guest.cdh.config as cfgmod

    base = tmp_path / "run/cdh/kbs"
    monkeypatch.setattr(cfgmod, "CREDENTIALS_DIR", str(base))
    text = f'[kbc]\nname = "cc_kbc"\n[[credentials]]\npath = "{base}/aliyun/role.json"\nresource_uri = "kbs:///default/aliyun/role"\n'
    c = _load(tmp_path, text)
    hub = Hub(c, DictGetter({"kbs:///default/aliyun/role": b'{"role":"r"}'}))
    [written] = hub.provision_credentials()
    assert written.read_bytes() == b'{"role":"r"}' and written.stat().st_mode & 0o077 == 0
    hub = Hub(c, DictGetter({}))
    written.unlink()
    with pytest.raises(CdhError, match="refused by the test KBS"):
        hub.provision_credentials()
    assert not written.exists()
