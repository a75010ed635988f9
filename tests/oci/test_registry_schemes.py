"""The registry client remembers, across clients and processes, that a registry reached with
``tls_verify=False`` speaks plain HTTP, and skips the HTTPS attempt next time; verification on
never reads that memory. A relay in front of a real docker-registry sees how each connection
began (a TLS ClientHello or a plain HTTP request)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coco.errors import RegistryError
from coco.oci.copy import CopyOptions, copy_image
from coco.oci.registry import RegistryClient
from tests.conftest import Registry
from tests.imagekit import tar_layer, write_image

from .fakeregistry import relay


def test_plain_http_is_remembered_across_clients_and_processes(
    open_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    img = write_image(tmp_path / "src", [tar_layer({"scheme": b"memory"})], tag="t")
    repo = "schemes/app"
    copy_image(img.ref, open_registry.url(repo, "v1"), options=CopyOptions(dest_tls_verify=False))
    with relay(open_registry.host) as r:
        mark = cache / "coco" / "http-registries" / r.host
        first = RegistryClient(r.host, tls_verify=False)
        first.ping()
        first.close()
        assert first._base == f"http://{r.host}"
        assert (r.tls_attempts(), r.plain_requests()) == (1, 1)  # HTTPS tried, then HTTP
        assert mark.is_file()

        r.starts.clear()
        second = RegistryClient(r.host, tls_verify=False)
        raw, _ = second.get_manifest(repo, "v1", "t")
        second.close()
        assert raw == img.manifest
        assert (r.tls_attempts(), r.plain_requests()) == (0, 1)

        r.starts.clear()
        out = subprocess.run(
            [sys.executable, "-m", "coco.cli.main", "image", "inspect", "--tls-verify=false",
             f"docker://{r.host}/{repo}:v1"],
            capture_output=True, env={**os.environ, "XDG_CACHE_HOME": str(cache)}, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["Digest"] == img.manifest_digest
        assert r.tls_attempts() == 0 and r.plain_requests() >= 1

        r.starts.clear()  # verification on: HTTPS only, whatever the memory says
        with pytest.raises(RegistryError, match=r"plain-HTTP registry\? then set --tls-verify"):
            RegistryClient(r.host, tls_verify=True).ping()
        assert (r.tls_attempts(), r.plain_requests()) == (1, 0)
        assert mark.is_file()


def test_remembered_registry_that_is_down_keeps_the_error_and_the_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    host = f"127.0.0.1:{free_port()}"
    mark = tmp_path / "coco" / "http-registries" / host
    mark.parent.mkdir(parents=True)
    mark.write_bytes(b"")
    with pytest.raises(RegistryError, match=rf"cannot connect to {host}: .*refused"):
        RegistryClient(host, tls_verify=False).ping()
    assert mark.is_file()  # nothing answered: nothing learnt


def test_unwritable_cache_is_no_memory(
    open_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_bytes(b"")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # a file: no directory below
    with relay(open_registry.host) as r:
        for _ in range(2):
            client = RegistryClient(r.host, tls_verify=False)
            client.ping()
            assert client._base == f"http://{r.host}"
            client.close()
        assert (r.tls_attempts(), r.plain_requests()) == (2, 2)  # each one tried HTTPS first
