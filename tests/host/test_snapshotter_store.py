"""coco's snapshotter without containerd: the overlay semantics of the store, containerd's filter
syntax, the protos' field numbers against containerd's, and the gRPC service of a real
``coco snapshotter serve`` (guest-pull skip, Cleanup, errors as gRPC statuses)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from coco.host.snapshotter import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from coco.host.snapshotter.filters import matcher
from coco.host.snapshotter.store import ACTIVE, COMMITTED, VIEW, Store
from coco.rpc.protos import snapshots_pb2 as pb

GOCODE = Path("/usr/share/gocode/src/github.com/containerd/containerd/api/services")


def test_overlay_semantics(tmp_path: Path) -> None:
    s = Store(tmp_path / "root")
    (m,) = s.create(ACTIVE, "ns/1/a", "", {})
    assert (m.type, m.options) == ("bind", ["rw", "rbind"])
    Path(m.source, "one").write_text("1")
    s.commit("ns/2/A", "ns/1/a", {"k": "v"})
    (m,) = s.create(ACTIVE, "ns/3/b", "ns/2/A", {})
    assert m.type == "overlay"
    lower = [o for o in m.options if o.startswith("lowerdir=")]
    assert lower == [f"lowerdir={s.fs(s.get('ns/2/A'))}"]
    assert any(o.startswith("upperdir=") for o in m.options)
    assert any(o.startswith("workdir=") for o in m.options)
    s.commit("ns/4/B", "ns/3/b", {})
    (v,) = s.create(VIEW, "ns/5/v1", "ns/2/A", {})
    assert (v.type, v.source, v.options) == ("bind", str(s.fs(s.get("ns/2/A"))), ["ro", "rbind"])
    (v,) = s.create(VIEW, "ns/6/v2", "ns/4/B", {})
    assert v.type == "overlay" and not any(o.startswith("upperdir=") for o in v.options)
    assert [o for o in v.options if o.startswith("lowerdir=")] == [
        f"lowerdir={s.fs(s.get('ns/4/B'))}:{s.fs(s.get('ns/2/A'))}"
    ]
    assert s.usage("ns/2/A")[1] >= 2  # fs and the file
    assert s.get("ns/2/A").labels == {"k": "v"}


def test_refusals_say_what_and_where(tmp_path: Path) -> None:
    s = Store(tmp_path / "root")
    s.create(ACTIVE, "a", "", {})
    with pytest.raises(AlreadyExists, match="snapshot 'a': already exists"):
        s.create(ACTIVE, "a", "", {})
    with pytest.raises(NotFound, match="parent 'nope' not found"):
        s.create(ACTIVE, "b", "nope", {})
    with pytest.raises(InvalidArgument, match="expected a committed snapshot, found an active"):
        s.create(ACTIVE, "b", "a", {})
    s.commit("A", "a", {})
    s.create(VIEW, "v", "A", {})
    with pytest.raises(FailedPrecondition, match="expected an active snapshot, found a view"):
        s.commit("V", "v", {})
    with pytest.raises(FailedPrecondition, match="without children, found child 'v'"):
        s.remove("A")
    with pytest.raises(InvalidArgument, match="field 'parent'"):
        s.update("A", {}, ["parent"])
    assert [x.key for x in s.all()] == ["A", "v"]  # nothing changed by the refusals


def test_labels_update_and_persistence(tmp_path: Path) -> None:
    s = Store(tmp_path / "root")
    s.create(ACTIVE, "a", "", {"x": "1", "y": "2"})
    s.update("a", {"x": "9", "z": "3"}, ["labels.x", "labels.y"])
    assert s.get("a").labels == {"x": "9"}
    s.update("a", {"only": "this"}, [])
    assert s.get("a").labels == {"only": "this"}
    s.commit("A", "a", {"c": "1"})
    s.create(ACTIVE, "b", "A", {})
    before = [(x.key, x.parent, x.kind, x.labels) for x in s.all()]
    s.close()
    again = Store(tmp_path / "root")
    assert [(x.key, x.parent, x.kind, x.labels) for x in again.all()] == before
    again.remove("b")
    again.remove("A")
    assert again.all() == []
    assert list((tmp_path / "root" / "snapshots").iterdir()) == []


def test_filters_as_containerd_sends_them() -> None:
    def fields(values: dict[str, str | None]):
        return lambda path: values.get(".".join(path))

    snap = fields({"name": "ns/3/x", "parent": "", "kind": "committed",
                   "labels.containerd.io/snapshot.ref": "sha256:ab"})  # fmt: skip
    walk = 'labels."containerd.io/snapshot.ref"==sha256:ab,parent==""'
    assert matcher([walk])(snap)
    assert not matcher(['labels."containerd.io/snapshot.ref"==sha256:cd'])(snap)
    assert matcher(["kind==view", "name~=^ns/"])(snap)  # ORed
    assert not matcher(["kind==committed,name!=ns/3/x"])(snap)  # ANDed
    assert matcher(['labels."containerd.io/snapshot.ref"'])(snap)
    with pytest.raises(InvalidArgument, match="expected a closing"):
        matcher(['name=="open'])


def _numbers(text: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for m in re.finditer(r"^message (\w+)\s*\{(.*?)^\}", text, re.S | re.M):
        fields = re.findall(r"^\s*(?:repeated\s+)?[\w.<>, ]+?\s(\w+)\s*=\s*(\d+)", m.group(2), re.M)
        out[m.group(1)] = {name: int(n) for name, n in fields}
    return out


@pytest.mark.parametrize("name", ["snapshots", "content"])
def test_field_numbers_match_containerd(name: str) -> None:
    upstream = GOCODE / name / "v1" / f"{name}.proto"
    if not upstream.exists():
        pytest.skip("golang-github-containerd-containerd-dev is not installed")
    ours = _numbers((Path(pb.__file__).parent / f"{name}.proto").read_text())
    theirs = _numbers(upstream.read_text())
    assert ours
    for message, fields in ours.items():
        assert fields == {k: v for k, v in theirs[message].items() if k in fields}, message
        assert set(fields) == set(theirs[message]) or name == "content", message


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    sock, root = tmp_path / "s.sock", tmp_path / "root"
    log = (tmp_path / "log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "coco.cli.main", "snapshotter", "serve", "--socket", str(sock),
         "--root", str(root), "--containerd-address", str(tmp_path / "no-containerd.sock"),
         "--guest-pull-image", "registry.example/secret/*"],
        stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "log"
            ).read_text()
            time.sleep(0.05)
        yield sock, root, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(15)
        log.close()


def _call(sock: Path, method: str, req, resp):
    with grpc.insecure_channel(f"unix://{sock}") as ch:
        fn = ch.unary_unary(
            f"/containerd.services.snapshots.v1.Snapshots/{method}",
            request_serializer=type(req).SerializeToString,
            response_deserializer=resp.FromString,
        )
        return fn(req, timeout=10)


def test_service_skips_guest_pulled_layers_and_cleans_up(served, tmp_path: Path) -> None:
    from google.protobuf import empty_pb2

    sock, root, _ = served
    labels = {"containerd.io/snapshot.ref": "sha256:chain1",
              "containerd.io/snapshot/cri.image-ref": "registry.example/secret/app:1",
              "containerd.io/snapshot/cri.manifest-digest": "sha256:m"}  # fmt: skip
    req = pb.PrepareSnapshotRequest(key="k8s.io/7/extract-1 sha256:chain1", labels=labels)
    with pytest.raises(grpc.RpcError) as e:
        _call(sock, "Prepare", req, pb.PrepareSnapshotResponse)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info = _call(sock, "Stat", pb.StatSnapshotRequest(key="sha256:chain1"), pb.StatSnapshotResponse)
    assert info.info.kind == COMMITTED
    assert info.info.labels["containerd.io/snapshot/coco.guest-pull"] == "true"
    # the container's rootfs on the skipped chain: an empty directory
    r = _call(sock, "Prepare", pb.PrepareSnapshotRequest(key="k8s.io/8/ctr", parent="sha256:chain1"),
              pb.PrepareSnapshotResponse)  # fmt: skip
    (m,) = r.mounts
    assert (m.type, list(m.options), os.listdir(m.source)) == ("bind", ["rw", "rbind"], [])
    # an image that is not the guest's, and no containerd to read its manifest from: one line
    other = {**labels, "containerd.io/snapshot/cri.image-ref": "docker.io/library/busybox:1"}
    req = pb.PrepareSnapshotRequest(key="k8s.io/9/extract-2 sha256:x", labels=other)
    with pytest.raises(grpc.RpcError) as e:
        _call(sock, "Prepare", req, pb.PrepareSnapshotResponse)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "blob sha256:m in namespace 'k8s.io' of containerd at" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _call(sock, "Stat", pb.StatSnapshotRequest(key="missing"), pb.StatSnapshotResponse)
    assert (e.value.code(), e.value.details()) == (
        grpc.StatusCode.NOT_FOUND, "snapshot 'missing': not found"
    )  # fmt: skip
    # Cleanup removes a directory no snapshot names, and nothing else
    stray = root / "snapshots" / "999"
    (stray / "fs").mkdir(parents=True)
    kept = sorted(p.name for p in (root / "snapshots").iterdir() if p != stray)
    _call(sock, "Cleanup", pb.CleanupRequest(), empty_pb2.Empty)
    assert sorted(p.name for p in (root / "snapshots").iterdir()) == kept
    for key in ("k8s.io/8/ctr", "sha256:chain1"):
        _call(sock, "Remove", pb.RemoveSnapshotRequest(key=key), empty_pb2.Empty)
    assert list((root / "snapshots").iterdir()) == []


def test_a_second_server_on_a_live_socket_is_refused(served, tmp_path: Path) -> None:
    sock, _, proc = served
    r = subprocess.run(
        [sys.executable, "-m", "coco.cli.main", "snapshotter", "serve", "--socket", str(sock),
         "--root", str(tmp_path / "other")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode != 0
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .endswith("expected a free path, found a server listening there")
    )
    assert proc.poll() is None and sock.exists()
    assert not (tmp_path / "other").exists()
