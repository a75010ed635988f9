"""The pull service (``coco image serve``): the same bundles as an in-process pull, errors passed
back as one line, a client that hangs up leaves nothing behind, strict requests."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from coco.crypto.digest import sha256_digest
from coco.errors import PullError
from coco.image import LayerStore
from coco.image.service import PullService, pull_via_service
from tests.conftest import Registry
from tests.image._util import make_request
from tests.imagekit import write_image
from tests.oci.fakeregistry import reply, serve

from ._util import F, tar
from .test_pull import leftovers, push


@pytest.fixture
def service(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "run" / "image.sock")
    svc = PullService(path)
    th = threading.Thread(target=svc.serve_forever, daemon=True)
    th.start()
    try:
        yield path
    finally:
        svc.shutdown()
        th.join(10)
    assert not os.path.exists(path)  # the socket goes with the service


def test_pull_and_warm_pull_through_the_service(
    service: str, tmp_path: Path, open_registry: Registry
) -> None:
    ref, img = push(tmp_path, open_registry, [tar([F("hello", b"hi\n")]), tar([F("b", b"2")])])
    assert stat.S_IMODE(os.stat(service).st_mode) == 0o600
    store = tmp_path / "store"
    first = pull_via_service(
        service, make_request(ref, tmp_path / "b1", store, tls_verify=False, flatten=True)
    )
    assert first["manifest_digest"] == img.manifest_digest
    assert (first["pulled"], first["reused"], first["mode"]) == (2, 0, "flatten")
    assert (tmp_path / "b1/rootfs/hello").read_bytes() == b"hi\n"
    assert json.loads((tmp_path / "b1/config.json").read_text())["root"]["path"] == "rootfs"
    second = pull_via_service(
        service, make_request(ref, tmp_path / "b2", store, tls_verify=False, flatten=True)
    )
    assert (second["pulled"], second["reused"]) == (0, 2)
    assert (tmp_path / "b2/rootfs/b").read_bytes() == b"2"
    assert len(LayerStore(store).layers()) == 2


def test_relative_paths_are_made_absolute_by_the_client(
    service: str, tmp_path: Path, open_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, _ = push(tmp_path, open_registry, [tar([F("rel", b"r")])])
    monkeypatch.chdir(tmp_path)
    req = make_request(ref, "bundle", "store", tls_verify=False, flatten=True,
                       decryption_keys=["keys/k.pem:pw", "provider:attestation-agent"])  # fmt: skip
    assert req["bundle"] == str(tmp_path / "bundle") and req["store"] == str(tmp_path / "store")
    assert req["decryption_keys"] == [f"{tmp_path}/keys/k.pem:pw", "provider:attestation-agent"]
    req["decryption_keys"] = []
    pull_via_service(service, req)
    assert (tmp_path / "bundle/rootfs/rel").read_bytes() == b"r"


def test_errors_come_back_as_one_line_and_leave_nothing(
    service: str, tmp_path: Path, open_registry: Registry
) -> None:
    ref, _ = push(tmp_path, open_registry, [tar([F(f"f{i}", b"x") for i in range(5)])])
    store = tmp_path / "store"
    with pytest.raises(PullError, match="nope") as ei:
        pull_via_service(
            service,
            make_request(ref.replace(":v1", ":nope"), tmp_path / "b", store, tls_verify=False),
        )
    assert "\n" not in str(ei.value)
    with pytest.raises(PullError, match="--max-files"):
        pull_via_service(
            service, make_request(ref, tmp_path / "b", store, tls_verify=False, max_files=2)
        )
    assert not (tmp_path / "b").exists()
    assert leftovers(LayerStore(store)) == ([], [])


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: r.update(extra=1), "unknown request field 'extra'"),
        (lambda r: r.pop("jobs"), "'jobs' is missing"),
        (lambda r: r.update(jobs="3"), "'jobs' has the wrong type"),
        (lambda r: r.update(flatten=1), "'flatten' has the wrong type"),
        (lambda r: r.update(bundle="relative/b"), "bundle must be an absolute path"),
        (lambda r: r.update(decryption_keys=[1]), "decryption_keys must be strings"),
    ],
)
def test_bad_requests_are_refused(service: str, tmp_path: Path, mutate, needle: str) -> None:
    req = make_request("docker://127.0.0.1:1/x:y", tmp_path / "b", tmp_path / "s")
    mutate(req)
    with pytest.raises(PullError, match=needle):
        pull_via_service(service, req)
    assert not (tmp_path / "b").exists()


def test_not_json_and_not_running(service: str, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(service)
        s.sendall(b"this is not json\n")
        answer = json.loads(s.makefile().readline())
    assert answer["ok"] is False and "expected JSON" in answer["error"]
    with pytest.raises(PullError, match="expected a running `coco image serve`"):
        pull_via_service(str(tmp_path / "nobody.sock"), {})


def test_second_service_on_the_same_socket_is_refused(service: str) -> None:
    with pytest.raises(PullError, match="found a running service"):
        PullService(service)


@contextlib.contextmanager
def stalled_registry(tmp_path: Path) -> Iterator[tuple[str, threading.Event]]:
    """A registry whose layer download starts only 1.5 s after it is asked for."""
    layer = tar([F("slow", b"s" * 1000)])
    img = write_image(tmp_path / "img", [layer], tag="t", compression="none")
    blobs = {img.config_digest: img.config, img.layer_digests[0]: img.layers[0]}
    assert sha256_digest(img.layers[0]) == img.layer_digests[0]
    started = threading.Event()

    def routes(h: BaseHTTPRequestHandler) -> None:
        if h.path == "/v2/":
            reply(h, 200, b"{}")
        elif h.path.startswith("/v2/app/manifests/"):
            reply(h, 200, img.manifest, {"Content-Type": img.manifest_media_type})
        elif h.path.startswith("/v2/app/blobs/"):
            digest = h.path.rsplit("/", 1)[1]
            if digest == img.layer_digests[0]:
                started.set()
                time.sleep(1.5)
            reply(h, 200, blobs[digest])
        else:
            reply(h, 404)

    with serve(routes) as host:
        yield f"docker://{host}/app:t", started


def _nothing_left(tmp_path: Path) -> bool:
    return leftovers(LayerStore(tmp_path / "store")) == ([], []) and not (tmp_path / "b").exists()


def test_client_hanging_up_cancels_and_leaves_nothing(service: str, tmp_path: Path) -> None:
    """The layer download stalls; the client disconnects meanwhile: no bundle, no layer."""
    with stalled_registry(tmp_path) as (ref, started):
        req = make_request(ref, tmp_path / "b", tmp_path / "store", tls_verify=False, flatten=True)
        s = socket.socket(socket.AF_UNIX)
        s.connect(service)
        s.sendall(json.dumps(req).encode() + b"\n")
        assert started.wait(10)
        s.close()  # Ctrl-C of the client
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the service finishes the download, then gives up
            time.sleep(0.2)
            if _nothing_left(tmp_path):
                time.sleep(2)  # and it stays that way
                break
        assert _nothing_left(tmp_path)


def test_stopping_cancels_pulls_under_way(tmp_path: Path) -> None:
    path = str(tmp_path / "svc.sock")
    svc = PullService(path)
    th = threading.Thread(target=svc.serve_forever)
    th.start()
    with stalled_registry(tmp_path) as (ref, started):
        req = make_request(ref, tmp_path / "b", tmp_path / "store", tls_verify=False)
        errors: list[str] = []

        def client() -> None:
            try:
                pull_via_service(path, req)
            except PullError as e:
                errors.append(str(e))

        c = threading.Thread(target=client)
        c.start()
        assert started.wait(10)
        svc.shutdown()  # as on SIGTERM
        th.join(15)
        c.join(15)
        assert not th.is_alive() and not c.is_alive()
    assert len(errors) == 1 and ("cancelled" in errors[0] or "stopping" in errors[0]), errors
    assert _nothing_left(tmp_path)
    assert not os.path.exists(path)


# -- the CLI: coco image serve / coco image pull --service ---------------------------------------
_LEAN = """
import sys
from coco.cli.main import main
try:
    main(sys.argv[1:])
finally:
    heavy = [m for m in ("coco.image.pull", "coco.oci.registry", "coco.oci.models", "http.client")
             if m in sys.modules]
    print("loaded:", ",".join(heavy), file=sys.stderr)
"""


def test_cli_serve_and_pull_through_it(tmp_path: Path, open_registry: Registry) -> None:
    import signal
    import subprocess
    import sys

    ref, img = push(tmp_path, open_registry, [tar([F("cli", b"served\n")])])
    sock = str(tmp_path / "svc.sock")
    srv = subprocess.Popen(
        [sys.executable, "-m", "coco.cli.main", "image", "serve", "--socket", sock],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        args = [
            "image",
            "pull",
            "--flatten",
            "--tls-verify=false",
            "--store",
            str(tmp_path / "store"),
        ]
        p = subprocess.run(
            [sys.executable, "-c", _LEAN, *args, "--service", sock, ref, str(tmp_path / "b1")],
            capture_output=True,
            text=True,
        )
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == img.manifest_digest
        assert "1 pulled, 0 reused" in p.stderr and f"by {sock}" in p.stderr
        assert "loaded: \n" in p.stderr  # the client imported none of the pull machinery
        assert (tmp_path / "b1/rootfs/cli").read_bytes() == b"served\n"
        # the environment variable works as the flag; errors are one line, exit 1
        env = {**os.environ, "COCO_IMAGE_SERVICE": sock}
        cmd = [sys.executable, "-m", "coco.cli.main", *args]
        p = subprocess.run(
            [*cmd, ref, str(tmp_path / "b2")], capture_output=True, text=True, env=env
        )
        assert p.returncode == 0 and "0 pulled, 1 reused" in p.stderr, p.stderr
        bad = ref.replace(":v1", ":gone")
        p = subprocess.run(
            [*cmd, bad, str(tmp_path / "b3")], capture_output=True, text=True, env=env
        )
        assert p.returncode == 1 and p.stderr.count("\n") == 1 and "gone" in p.stderr, p.stderr
        assert not (tmp_path / "b3").exists()
        p = subprocess.run([*cmd, "--creds", "", ref, str(tmp_path / "b4")], capture_output=True,
                           text=True, env=env)  # fmt: skip
        assert p.returncode == 2, p.stderr
    finally:
        srv.send_signal(signal.SIGTERM)
        assert srv.wait(10) == 0
    assert "serving image pulls on" in (srv.stderr.read() if srv.stderr else "")
    assert not os.path.exists(sock)
