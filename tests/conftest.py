"""Shared pytest fixtures: a real ``docker-registry`` (distribution 2.8) on a free loopback port.

``registry`` (session scope) has htpasswd basic auth and an authfile; ``open_registry`` has no
auth. Both have ``storage.delete`` enabled and expose ``host`` (``127.0.0.1:PORT``), ``storage``
(the filesystem root, to corrupt blobs in tests), ``user``, ``password`` and ``authfile``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

_CACHE_HOME: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    """The suite's own $XDG_CACHE_HOME (inherited by every coco process it starts): what coco
    remembers across processes (registries that speak plain HTTP, checked keys, the native hash
    loop) is made fresh by the tests and stays out of the user's ~/.cache."""
    global _CACHE_HOME
    _CACHE_HOME = tempfile.mkdtemp(prefix="coco-test-cache-")
    os.environ["XDG_CACHE_HOME"] = _CACHE_HOME


def pytest_unconfigure(config: pytest.Config) -> None:
    if _CACHE_HOME is not None:
        shutil.rmtree(_CACHE_HOME, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Registry:
    host: str
    storage: Path
    user: str | None
    password: str | None
    authfile: Path | None
    log: Path

    @property
    def creds(self) -> str:
        return f"{self.user}:{self.password}"

    def url(self, repo: str, tag: str = "latest") -> str:
        return f"docker://{self.host}/{repo}:{tag}"

    def blob_file(self, digest: str) -> Path:
        alg, hexpart = digest.split(":")
        return self.storage / "docker/registry/v2/blobs" / alg / hexpart[:2] / hexpart / "data"


@contextlib.contextmanager
def start_registry(
    base: Path,
    *,
    basic_auth: bool = False,
    http: Sequence[str] = (),
    auth: Sequence[str] = (),
) -> Iterator[Registry]:
    """Run ``docker-registry`` on a free loopback port with its files under ``base``.

    ``basic_auth`` adds htpasswd auth (user ``alice``) and an authfile; ``http`` are extra lines
    of the ``http:`` section (e.g. ``tls:``), ``auth`` the lines of an ``auth:`` section of one's
    own (e.g. ``token:``). Used by the fixtures below, by tests that need a special registry and by
    the benchmarks.
    """
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    base.mkdir(parents=True, exist_ok=True)
    storage = base / "storage"
    port = free_port()
    cfg = [
        "version: 0.1",
        "log:",
        "  level: warn",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        *(f"  {line}" for line in http),
    ]
    user = password = None
    authfile = None
    if basic_auth:
        user, password = "alice", "s3cret-pw"
        hp = subprocess.run(
            ["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True
        ).stdout
        (base / "htpasswd").write_text(hp)
        cfg += ["auth:", "  htpasswd:", "    realm: test", f"    path: {base / 'htpasswd'}"]
        authfile = base / "auth.json"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        authfile.write_text(json.dumps({"auths": {f"127.0.0.1:{port}": {"auth": token}}}))
    elif auth:
        cfg += ["auth:", *(f"  {line}" for line in auth)]
    (base / "config.yml").write_text("\n".join(cfg) + "\n")
    log = base / "registry.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(base / "config.yml")], stdout=logf, stderr=logf
        )
    try:
        deadline = time.monotonic() + 15
        while True:  # listening means ready (plain HTTP or TLS alike)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"docker-registry did not start: {log.read_text()}"
                    ) from None
                time.sleep(0.05)
        yield Registry(f"127.0.0.1:{port}", storage, user, password, authfile, log)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry with htpasswd basic auth (user ``alice``)."""
    with start_registry(tmp_path_factory.mktemp("registry-auth"), basic_auth=True) as reg:
        yield reg


@pytest.fixture(scope="session")
def open_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry without auth."""
    with start_registry(tmp_path_factory.mktemp("registry-open")) as reg:
        yield reg
