"""``coco api-server serve`` in front of real parts: ``coco kbs serve`` (admin API behind an Ed25519
admin key), ``coco aa serve --tee sample`` and ``coco cdh serve`` (cc_kbc, tokens from the AA),
called with real ``curl``; the routes, statuses, content types and texts are upstream's; a caller
that is not on loopback gets 403; the CDH restarting does not break the server's cached client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

import coco
from coco.guest.api_server import (
    ApiServerError,
    decode_runtime_data,
    is_loopback,
    make_router,
    parse_bind,
    split_nth_slash,
)
from coco.protocol.admin import AdminClient, admin_token, load_admin_key
from tests.trustee.conftest import ALLOW_ALL, KbsProcess, free_port

DENY_ALL = "package policy\n\ndefault allow := false\n"
AA_TOML = """
[token_configs.kbs]
url = "{url}"

[eventlog_config]
enable_eventlog = false
"""


class Proc:
    """A ``coco`` process, stopped by its pid (SIGTERM, then SIGKILL) however the test ends."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.name = name
        self.args = args
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: Path | tuple[str, int]) -> Proc:
        with self.log.open("ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "coco.cli.main", *self.args],
                stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})},
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self._ready(ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start: {self.log.read_text()}")
            time.sleep(0.05)
        return self

    @staticmethod
    def _ready(ready: Path | tuple[str, int]) -> bool:
        if isinstance(ready, Path):
            return ready.exists()
        with socket.socket() as s:
            return s.connect_ex(ready) == 0

    def stop(self) -> int | None:
        p, self.proc = self.proc, None
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode


@dataclass
class Stack:
    dir: Path
    kbs: KbsProcess
    admin_key: Path
    aa: str
    cdh: str
    cdh_config: Path
    api_port: int
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def admin(self) -> AdminClient:
        key = load_admin_key(self.admin_key.read_bytes(), str(self.admin_key))
        return AdminClient(self.kbs.url, admin_token(key))

    def start_cdh(self) -> None:
        sock = Path(self.cdh[len("unix://") :])
        self.procs["cdh"] = Proc(
            "coco cdh serve", ["cdh", "serve", "--config", str(self.cdh_config)],
            self.dir / "cdh.log",
        ).start(sock)  # fmt: skip


@contextlib.contextmanager
def guest_stack(d: Path, *, registry_host: str | None = None) -> Iterator[Stack]:
    """KBS + AA (sample) + CDH (cc_kbc through the AA) + api-server (all features)."""
    key = ed25519.Ed25519PrivateKey.generate()
    (d / "admin.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (d / "admin.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    port = free_port()
    kbs = KbsProcess(
        ["kbs", "serve", "--listen", f"127.0.0.1:{port}", "--insecure-http",
         "--storage", f"sqlite://{d}/kbs.db", "--admin-public-key", str(d / "admin.pub")],
        f"http://127.0.0.1:{port}", d / "kbs.log",
    )  # fmt: skip
    aa_sock, cdh_sock = d / "aa" / "aa.sock", d / "cdh" / "cdh.sock"
    (d / "aa.toml").write_text(AA_TOML.format(url=kbs.url))
    image = f'[image]\nwork_dir = "{d / "work"}"\n'
    if registry_host:
        image += (
            f'[[image.registry_config.registry]]\nlocation = "{registry_host}"\ninsecure = true\n'
        )
    (d / "cdh.toml").write_text(
        f'socket = "unix://{cdh_sock}"\n[aa]\naa_socket = "unix://{aa_sock}"\n'
        f'[kbc]\nname = "cc_kbc"\nurl = "{kbs.url}"\n{image}'
    )
    stack = Stack(d, kbs, d / "admin.pem", f"unix://{aa_sock}", f"unix://{cdh_sock}",
                  d / "cdh.toml", free_port())  # fmt: skip
    try:
        kbs.start()
        stack.procs["aa"] = Proc(
            "coco aa serve",
            ["aa", "serve", "--socket", stack.aa, "--config", str(d / "aa.toml"), "--tee",
             "sample", "--eventlog", str(d / "eventlog")],
            d / "aa.log",
        ).start(aa_sock)  # fmt: skip
        stack.start_cdh()
        stack.procs["api"] = Proc(
            "coco api-server serve",
            ["api-server", "serve", "--bind", f"127.0.0.1:{stack.api_port}", "--features", "all",
             "--cdh_addr", stack.cdh, "--aa_addr", stack.aa],
            d / "api.log",
        ).start(("127.0.0.1", stack.api_port))  # fmt: skip
        with stack.admin() as admin:
            admin.set_resource_policy(ALLOW_ALL)  # the default refuses the sample TEE
        yield stack
    finally:
        for p in reversed(stack.procs.values()):
            p.stop()
        kbs.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with guest_stack(tmp_path_factory.mktemp("guest")) as s:
        yield s


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def curl(url: str, *args: str) -> Answer:
    """``curl -si`` and the parsed answer (status line, headers, body)."""
    out = subprocess.run(
        ["curl", "-si", "--max-time", "60", *args, url], capture_output=True, timeout=90
    )
    assert out.returncode == 0, out.stderr.decode()
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.lower(), v.strip()) for k, _, v in (h.partition(":") for h in lines[1:]))
    return Answer(int(lines[0].split()[1]), headers, body)


# -------------------------------------------------------------------------------- end to end


def test_resource_set_by_the_admin_read_back_with_curl(stack: Stack) -> None:
    secret = os.urandom(64)
    with stack.admin() as admin:
        admin.set_resource("default/app/secret", secret)
    a = curl(f"{stack.api}/cdh/resource/default/app/secret")
    assert (a.status, a.body) == (200, secret)
    assert a.headers["content-type"] == "application/octet-stream"
    missing = curl(f"{stack.api}/cdh/resource/default/app/absent")
    assert missing.status == 500 and "content-type" not in missing.headers
    assert missing.body.startswith(b"ttrpc request error: INTERNAL: [CDH] [ERROR]: ")
    assert b"default/app/absent" in missing.body
    # not a resource URI the hub takes: its error, and the server keeps serving
    assert curl(f"{stack.api}/cdh/resource/a/b").status == 500
    assert curl(f"{stack.api}/cdh/resource/default/app/secret").body == secret


def test_resource_refused_by_the_policy_reaches_the_caller(stack: Stack) -> None:
    with stack.admin() as admin:
        admin.set_resource("default/app/guarded", b"x")
        admin.set_resource_policy(DENY_ALL)
        try:
            a = curl(f"{stack.api}/cdh/resource/default/app/guarded")
        finally:
            admin.set_resource_policy(ALLOW_ALL)
    assert a.status == 500 and b"PolicyDeny" in a.body
    assert curl(f"{stack.api}/cdh/resource/default/app/guarded").body == b"x"


def test_info(stack: Stack) -> None:
    a = curl(f"{stack.api}/info")
    assert (a.status, a.headers["content-type"]) == (200, "application/json")
    # field order and omissions as upstream's serde: no additional_tees when there are none
    assert (
        a.body
        == json.dumps(
            {"version": coco.__version__, "tee": "sample", "feature": "all"}, separators=(",", ":")
        ).encode()
    )
    assert curl(f"{stack.api}/info", "-X", "POST").body == b"Method Not Allowed"


def test_aa_routes(stack: Stack) -> None:
    tok = curl(f"{stack.api}/aa/token?token_type=kbs")
    assert (tok.status, tok.headers["content-type"]) == (200, "application/octet-stream")
    doc = json.loads(tok.body)
    assert doc["token"].count(".") == 2 and "PRIVATE KEY" in doc["tee_keypair"]
    bad = curl(f"{stack.api}/aa/token")
    assert (bad.status, bad.body) == (400, b"BAD REQUEST")
    unknown = curl(f"{stack.api}/aa/token?token_type=bogus")
    assert unknown.status == 500 and b"AA-KBC get token failed" in unknown.body
    ev = curl(f"{stack.api}/aa/evidence?runtime_data=abc")
    assert json.loads(ev.body)["report_data"] == "YWJj"  # the UTF-8 of "abc"
    ev64 = curl(f"{stack.api}/aa/evidence?runtime_data=AAEC_w&encoding=base64")
    assert json.loads(ev64.body)["report_data"] == "AAEC/w=="  # URL-safe, unpadded
    for q in ("runtime_data=AAEC/w&encoding=base64", "runtime_data=abc&encoding=hex", ""):
        assert curl(f"{stack.api}/aa/evidence?{q}").body == b"BAD REQUEST"
    more = curl(f"{stack.api}/aa/additional-evidence?runtime_data=x")
    assert (more.status, more.body) == (200, b"")
    # a wrong method under /aa is 404, as upstream's
    assert curl(f"{stack.api}/aa/token?token_type=kbs", "-X", "POST").body == b"URL NOT FOUND"
    assert curl(f"{stack.api}/aa/nothing").status == 404


def test_aael(stack: Stack) -> None:
    body = json.dumps({"domain": "d", "operation": "o", "content": "c"})
    a = curl(f"{stack.api}/aa/aael", "-X", "POST", "--data-binary", body)
    assert (a.status, a.headers["content-type"]) == (200, "application/json")
    # the AA runs with enable_eventlog = false: upstream's answer, byte for byte
    assert a.body == (
        b'{"success":"false","message": "Attestation Agent does not enable eventlog recording"}'
    )
    for bad in ("{", '{"domain":"d"}', "[1]", '{"domain":1,"operation":"o","content":"c"}'):
        r = curl(f"{stack.api}/aa/aael", "-X", "POST", "--data-binary", bad)
        assert r.status == 500 and r.body.startswith(b"Illegal AAEL eventry format"), r.body
    assert curl(f"{stack.api}/aa/aael").body == b"URL NOT FOUND"  # GET


def test_unknown_paths_and_bad_requests(stack: Stack) -> None:
    for path in ("/", "/x", "/cdh", "/cdh/resource", "/cdh/other/a/b/c", "/aa"):
        a = curl(stack.api + path)
        assert (a.status, a.body) == (404, b"URL NOT FOUND"), path
    big = stack.dir / "big"
    big.write_bytes(b"{" * (1024 * 1024 + 1))
    a = curl(f"{stack.api}/aa/aael", "-X", "POST", "--data-binary", f"@{big}")
    assert a.status == 413
    with socket.create_connection(("127.0.0.1", stack.api_port), timeout=30) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert curl(f"{stack.api}/info").status == 200  # still serving


def test_the_cached_client_dials_a_restarted_cdh(stack: Stack) -> None:
    with stack.admin() as admin:
        admin.set_resource("default/app/again", b"again")
    url = f"{stack.api}/cdh/resource/default/app/again"
    assert curl(url).body == b"again"
    # restarted between two calls: the cached connection is dead, the next call dials again
    assert stack.procs["cdh"].stop() == 0
    stack.start_cdh()
    assert curl(url).body == b"again"
    assert stack.procs["cdh"].stop() == 0
    down = curl(url)
    assert down.status == 500 and down.body.startswith(b"ttrpc connect to CDH addr: ")
    stack.start_cdh()
    assert curl(url).body == b"again"  # no restart of the api-server needed


# -------------------------------------------------------------------------------- loopback only


def _non_loopback_ipv4() -> str | None:
    out = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    for link in json.loads(out.stdout):
        for a in link.get("addr_info", []):
            if not a["local"].startswith("127."):
                return a["local"]
    return None


@contextlib.contextmanager
def _local_address() -> Iterator[str]:
    """A non-loopback IPv4 address of this machine; a dummy link made (and removed) if none."""
    address = _non_loopback_ipv4()
    if address is not None:
        yield address
        return
    link = f"cocot{os.getpid() % 100000}"
    made = subprocess.run(["ip", "link", "add", link, "type", "dummy"], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"no non-loopback address and cannot make one: {made.stderr.decode()}")
    try:
        subprocess.run(["ip", "addr", "add", "198.18.251.1/32", "dev", link], check=True)
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        yield "198.18.251.1"
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True)


def test_a_peer_not_on_loopback_is_forbidden(stack: Stack) -> None:
    with _local_address() as address:
        port = free_port()
        api = Proc(
            "coco api-server serve",
            ["api-server", "serve", "-b", f"{address}:{port}", "-f", "all",
             "-c", stack.cdh, "-a", stack.aa],
            stack.dir / "api-public.log",
        )  # fmt: skip
        with stack.admin() as admin:
            admin.set_resource("default/app/private", b"private")
        try:
            api.start((address, port))
            for path in ("/info", "/cdh/resource/default/app/private", "/aa/token?token_type=kbs",
                         "/nothing"):  # fmt: skip
                a = curl(f"http://{address}:{port}{path}", "--interface", address)
                assert (a.status, a.body) == (403, b"Forbidden"), path
        finally:
            code = api.stop()
        assert code == 0, api.log.read_text()


# -------------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    ("value", "encoding", "expected"),
    [
        ("hello", None, b"hello"),
        ("cmVwb3J0", "base64", b"report"),  # upstream's own cases
        ("data", "hex", None),
        ("!!!", "base64", None),
        ("cmVwb3J0==", "base64", None),  # padded: not the unpadded alphabet
        ("YQ", "base64", b"a"),
        ("YR", "base64", None),  # stray bits in the last character
        ("a", "base64", None),
        ("", "base64", b""),
    ],
)
def test_decode_runtime_data(value: str, encoding: str | None, expected: bytes | None) -> None:
    assert decode_runtime_data(value, encoding) == expected


def test_split_nth_slash_as_upstream() -> None:
    p = "/cdh/resource/default/"
    assert split_nth_slash(p, 0) is None
    assert split_nth_slash(p, 1) == ("", "/cdh/resource/default/")
    assert split_nth_slash(p, 2) == ("/cdh", "/resource/default/")
    assert split_nth_slash(p, 3) == ("/cdh/resource", "/default/")
    assert split_nth_slash(p, 4) == ("/cdh/resource/default", "/")
    assert split_nth_slash(p, 5) is None


def test_loopback_and_bind_parsing() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.8.9.10") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.1") and not is_loopback("::ffff:10.0.0.1")
    assert not is_loopback("fe80::1%eth0") and not is_loopback("")
    assert parse_bind("[::1]:8006") == ("::1", 8006)
    for bad in ("localhost:8006", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(ApiServerError, match="expected <IP address>:<port>"):
            parse_bind(bad)


def test_features_gate_the_routes() -> None:
    async def ask(features: str, path: str) -> tuple[int, bytes]:
        router = make_router(
            features, aa_addr="unix:///nonexistent/aa", cdh_addr="unix:///nonexistent/cdh"
        )
        reply = await router.route("127.0.0.1", "GET", path, b"")
        return reply.status, reply.body

    assert asyncio.run(ask("resource", "/aa/token?token_type=kbs")) == (
        404, b"Attestation Feature Not Enabled",
    )  # fmt: skip
    assert asyncio.run(ask("attestation", "/cdh/resource/a/b/c")) == (
        404, b"Resource Feature Not Enabled",
    )  # fmt: skip
    # without the attestation feature /info asks nobody and names no TEE
    status, body = asyncio.run(ask("resource", "/info"))
    assert (status, json.loads(body)) == (200, {"version": coco.__version__, "feature": "resource"})
    # the peers are dialled on first use: an absent CDH is a 500 naming it
    status, body = asyncio.run(ask("resource", "/cdh/resource/a/b/c"))
    assert status == 500 and body.startswith(b"ttrpc connect to CDH addr: unix:///nonexistent/cdh")
    with pytest.raises(ApiServerError, match="expected one of resource, attestation, all"):
        make_router("everything")


def test_cli_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "coco.cli.main", "api-server", "serve", "-b", "nowhere"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1 and "expected <IP address>:<port>" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "coco.cli.main", "api-server", "serve", "-f", "some"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "--features" in out.stderr
