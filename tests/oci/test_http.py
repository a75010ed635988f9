"""The registry client's HTTP transport (coco.oci.http): redirects, connection reuse, truncated
answers, and proxies through a real ``tinyproxy``."""

from __future__ import annotations

import select
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from coco.errors import RegistryError
from coco.image import LayerStore
from coco.image.pull import PullOptions, pull_image
from coco.oci.copy import CopyOptions, copy_image
from coco.oci.http import Pool, TransportError
from coco.oci.registry import RegistryClient
from coco.oci.transport import Access
from tests.conftest import Registry, free_port
from tests.imagekit import tar_layer, write_image

from .fakeregistry import reply, serve


def test_redirect_drops_authorization_across_origins() -> None:
    seen: list[tuple[str, str | None]] = []

    def target(h: BaseHTTPRequestHandler) -> None:
        seen.append((h.path, h.headers.get("Authorization")))
        reply(h, 200, b"blob bytes")

    with serve(target) as other:

        def origin(h: BaseHTTPRequestHandler) -> None:
            seen.append((h.path, h.headers.get("Authorization")))
            if h.path == "/away":
                reply(h, 307, headers={"Location": f"http://{other}/stored"})
            elif h.path == "/here":
                reply(h, 302, headers={"Location": "/away"})
            else:
                reply(h, 404)

        with serve(origin) as host:
            pool = Pool()
            r = pool.request(
                "GET", f"http://{host}/here", headers={"Authorization": "Bearer t"}, follow=True
            )
            assert r.status_code == 200 and r.read() == b"blob bytes"
            assert r.url == f"http://{other}/stored"
            # same origin keeps the credentials, the other origin never sees them
            assert seen == [("/here", "Bearer t"), ("/away", "Bearer t"), ("/stored", None)]
            # without follow the redirect itself is the answer
            r = pool.request("GET", f"http://{host}/away")
            assert r.status_code == 307
            r.close()
            pool.close()


def test_redirect_loop_is_refused() -> None:
    def loop(h: BaseHTTPRequestHandler) -> None:
        reply(h, 302, headers={"Location": h.path + "x"})

    with serve(loop) as host, pytest.raises(TransportError, match="more than 10 redirects"):
        Pool().request("GET", f"http://{host}/a", follow=True)


def test_keepalive_reuses_and_survives_a_server_that_closed() -> None:
    ports: list[int] = []

    def handler(h: BaseHTTPRequestHandler) -> None:
        ports.append(h.client_address[1])
        reply(h, 200, b"ok")
        if h.path == "/then-close":  # close without saying so (as an idle timeout would)
            h.close_connection = True

    with serve(handler) as host:
        pool = Pool()
        for path in ("/a", "/b", "/then-close"):
            assert pool.request("GET", f"http://{host}{path}").read() == b"ok"
        assert len(set(ports)) == 1  # one connection for all three
        (idle,) = [c for conns in pool._idle.values() for c in conns]
        ready: list[object] = []
        for _ in range(100):  # wait until the server's close has reached us (load can delay it)
            ready = select.select([idle.sock], [], [], 0.1)[0]
            if ready:
                break
        assert ready
        r = pool.request("PUT", f"http://{host}/after", content=iter([b"not ", b"replayable"]))
        assert r.read() == b"ok"
        assert len(set(ports)) == 2  # the dead connection was noticed before use
        pool.close()


def test_truncated_body_is_an_error_not_a_short_read() -> None:
    def short(h: BaseHTTPRequestHandler) -> None:
        reply(h, 200, b"0123456789", content_length=100)

    with serve(short) as host:
        r = Pool().request("GET", f"http://{host}/blob")
        with pytest.raises(TransportError, match="closed after 10 bytes, 90 more expected"):
            b"".join(r.iter_raw(4))


def test_connection_refused_names_the_registry(tmp_path: Path) -> None:
    port = free_port()
    client = RegistryClient(f"127.0.0.1:{port}", tls_verify=False)
    with pytest.raises(RegistryError, match=rf"cannot connect to 127.0.0.1:{port}"):
        client.ping()


# -- proxies -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tinyproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    exe = shutil.which("tinyproxy")
    if exe is None:
        pytest.fail("tinyproxy is not installed (scripts/install-system-deps installs it)")
    d = tmp_path_factory.mktemp("tinyproxy")
    port = free_port()
    log = d / "proxy.log"
    (d / "tinyproxy.conf").write_text(
        f'Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile "{log}"\nLogLevel Info\n'
        f'MaxClients 20\nAllow 127.0.0.1\nPidFile "{d / "pid"}"\n'
    )
    proc = subprocess.Popen([exe, "-d", "-c", str(d / "tinyproxy.conf")])
    try:
        for _ in range(100):
            if (log.exists() and "Accepting" in log.read_text()) or _listening(port):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_pull_through_http_proxy(
    tinyproxy: tuple[str, Path],
    open_registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, log = tinyproxy
    img = write_image(tmp_path / "src", [tar_layer({"via-proxy": b"yes"})], tag="t")
    repo = f"proxied/{tmp_path.name.lower().replace('_', '-')}"
    copy_image(img.ref, open_registry.url(repo, "v1"), options=CopyOptions(dest_tls_verify=False))
    for var in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", url)
    monkeypatch.setenv("https_proxy", url)  # the HTTPS attempt tunnels through it (and fails)
    # a cache of its own, where the copy above left no memory of plain HTTP for the registry
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    res = pull_image(
        open_registry.url(repo, "v1"),
        tmp_path / "bundle",
        LayerStore(tmp_path / "store"),
        PullOptions(access=Access(tls_verify=False), flatten=True),
    )
    assert (res.bundle.rootfs / "via-proxy").read_bytes() == b"yes"
    text = log.read_text()
    assert f"CONNECT {open_registry.host}" in text  # HTTPS first, through a tunnel
    assert f"GET http://{open_registry.host}/v2/{repo}/manifests/v1" in text
    assert f"GET http://{open_registry.host}/v2/{repo}/blobs/{img.layer_digests[0]}" in text


def test_no_proxy_and_dead_proxy(
    open_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for var in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    monkeypatch.setenv("ALL_PROXY", dead)
    client = RegistryClient(open_registry.host, tls_verify=False)
    with pytest.raises(RegistryError, match=r"cannot connect to .*127\.0\.0\.1"):
        client.ping()
    monkeypatch.setenv("NO_PROXY", "example.com, 127.0.0.1")
    client = RegistryClient(open_registry.host, tls_verify=False)
    client.ping()  # straight to the registry
    assert client._base == f"http://{open_registry.host}"
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("ALL_PROXY", "https://127.0.0.1:3128")
    with pytest.raises(RegistryError, match="expected an http://host:port URL"):
        RegistryClient(open_registry.host, tls_verify=True).ping()


def test_parallel_requests_share_the_pool(open_registry: Registry, tmp_path: Path) -> None:
    img = write_image(
        tmp_path / "src", [tar_layer({f"f{i}": bytes([i]) * 5000}) for i in range(6)], tag="t"
    )
    dst = open_registry.url("parallel/app", "v1")
    copy_image(img.ref, dst, options=CopyOptions(dest_tls_verify=False))
    client = RegistryClient(open_registry.host, tls_verify=False)
    errors: list[BaseException] = []

    def fetch(digest: str) -> None:
        try:
            for _ in range(5):
                assert b"".join(client.open_blob("parallel/app", digest, None, "t"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=fetch, args=(d,)) for d in img.layer_digests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    client.close()
