"""The pull service under abuse: what is at its socket path (only a stale socket is removed),
socket paths it cannot use, deeply nested JSON either way, and a ``store`` that is not a store."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from coco.errors import PullError
from coco.image.service import PullService, pull_via_service
from tests.image._util import make_request
from tests.imagekit import tar_layer, write_image

DEEP = b"[" * 100_000


@pytest.fixture
def service(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "svc.sock")
    svc = PullService(path)
    th = threading.Thread(target=svc.serve_forever, daemon=True)
    th.start()
    try:
        yield path
    finally:
        svc.shutdown()
        th.join(10)


def test_regular_file_at_the_socket_path_is_refused_and_kept(tmp_path: Path) -> None:
    f = tmp_path / "precious.txt"
    f.write_text("do not delete\n")
    with pytest.raises(PullError) as ei:
        PullService(str(f))
    assert str(ei.value) == (
        f"image service {f}: expected a free path or a stale socket, found a file that is not "
        "a socket"
    )
    assert f.read_text() == "do not delete\n"


def test_directory_at_the_socket_path_is_refused_and_kept(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    (d / "x").write_text("x")
    with pytest.raises(PullError, match="found a directory"):
        PullService(str(d))
    assert (d / "x").read_text() == "x"


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # bound, never unlinked: what a killed service leaves
    svc = PullService(path)
    th = threading.Thread(target=svc.serve_forever, daemon=True)
    th.start()
    try:
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)  # the new service answers there
            c.sendall(b"not json\n")
            assert json.loads(c.makefile().readline())["ok"] is False
    finally:
        svc.shutdown()
        th.join(10)


def test_live_socket_of_another_program_is_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "other.sock")
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(path)
        other.listen(1)
        with pytest.raises(PullError, match="expected a free path, found a running service"):
            PullService(path)
        assert os.path.exists(path)


def test_unusable_socket_paths_are_one_line(tmp_path: Path) -> None:
    long = str(tmp_path / ("x" * 120) / "s.sock")
    with pytest.raises(PullError) as ei:
        PullService(long)
    assert str(ei.value) == (
        f"image service {long}: expected a socket path of at most 107 bytes, "
        f"found {len(long)} bytes"
    )
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(PullError) as ei:
        PullService(str(f / "s.sock"))
    assert str(ei.value) == f"image service {f}/s.sock: expected a directory at {f}, found a file"
    with pytest.raises(PullError, match=r"^image service /sys/s\.sock: cannot listen: \w"):
        PullService("/sys/s.sock")  # sysfs takes no sockets, not even root's
    assert not os.path.exists("/sys/s.sock")


def test_cli_serve_on_a_regular_file_leaves_it(tmp_path: Path) -> None:
    f = tmp_path / "notes"
    f.write_text("mine\n")
    p = subprocess.run(
        [sys.executable, "-m", "coco.cli.main", "image", "serve", "--socket", str(f)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"coco: error: image service {f}: expected a free path")
    assert f.read_text() == "mine\n"


def test_deeply_nested_request_is_answered(service: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(service)
        s.sendall(DEEP + b"\n")
        line = s.makefile().readline()
    answer = json.loads(line)  # an answer, not a dropped connection
    assert answer["ok"] is False
    assert answer["error"].startswith("image service: request: expected JSON of reasonable depth")


def test_deeply_nested_answer_is_a_pull_error(tmp_path: Path) -> None:
    path = str(tmp_path / "liar.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def answer() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.makefile("rb").readline()
            conn.sendall(DEEP + b"\n")

    th = threading.Thread(target=answer, daemon=True)
    th.start()
    try:
        with pytest.raises(PullError, match=r"answer: expected JSON of reasonable depth"):
            pull_via_service(path, {"ref": "x"})
    finally:
        th.join(10)
        srv.close()


def test_store_that_is_not_a_store_is_refused(service: str, tmp_path: Path) -> None:
    img = write_image(tmp_path / "lay", [tar_layer({"etc/hello": b"hi\n"})], tag="t")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# mine\n")
    req = make_request(img.ref, tmp_path / "b", home, flatten=True)
    with pytest.raises(PullError) as ei:
        pull_via_service(service, req)
    assert str(ei.value).startswith(f"layer store {home}: expected a layer store")
    assert sorted(os.listdir(home)) == [".bashrc"] and not (tmp_path / "b").exists()


def test_deeply_nested_manifest_is_a_one_line_answer(service: str, tmp_path: Path) -> None:
    img = write_image(tmp_path / "lay", [tar_layer({"etc/hello": b"hi\n"})], tag="t")
    (img.path / "index.json").write_bytes(DEEP)
    req = make_request(img.ref, tmp_path / "b", tmp_path / "store", flatten=True)
    with pytest.raises(PullError) as ei:
        pull_via_service(service, req)
    assert str(ei.value) == (
        f"oci:{img.path}: index.json: expected JSON of reasonable depth, found arrays/objects "
        "nested too deeply"
    )
    assert not (tmp_path / "b").exists()
