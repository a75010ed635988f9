"""``containerd.services.snapshots.v1.Snapshots`` over gRPC on a Unix socket: containerd's proxy
snapshotter plugin ``coco``.

containerd keeps its own metadata (namespaces, leases, garbage collection) and calls this backend
with keys of the form ``<namespace>/<sequence>/<key>``. Prepare with the label
``containerd.io/snapshot.ref`` is the unpack of one layer; when the guest pulls the image
(:mod:`.guestpull`) the committed snapshot named by that label is made here and the answer is
ALREADY_EXISTS, which containerd 1.6's metadata store and unpacker take as "this layer is already
there" (they find it by walking for the label and the parent): nothing is fetched or applied.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

from coco.host.snapshotter import AlreadyExists, SnapshotterError
from coco.host.snapshotter.filters import matcher
from coco.host.snapshotter.guestpull import GUEST_PULL, SNAPSHOT_REF, GuestPullPolicy
from coco.host.snapshotter.store import ACTIVE, COMMITTED, VIEW, Snapshot, Store

log = logging.getLogger(__name__)

SERVICE = "containerd.services.snapshots.v1.Snapshots"
_KIND_FILTER = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}
_BATCH = 100


def namespace_of(key: str) -> str:
    """The containerd namespace of a backend key ``<ns>/<seq>/<key>`` ('' when not of that form)."""
    parts = key.split("/", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0]
    return ""


class Snapshotter:
    """The service's methods over a :class:`Store` and a :class:`GuestPullPolicy`."""

    def __init__(self, store: Store, policy: GuestPullPolicy, say: Callable[[str], None]) -> None:
        self.store = store
        self.policy = policy
        self.say = say

    @staticmethod
    def _info(snap: Snapshot) -> Any:
        from coco.rpc.protos import snapshots_pb2

        info = snapshots_pb2.Info(
            name=snap.key, parent=snap.parent, kind=snap.kind, labels=snap.labels
        )
        info.created_at.FromNanoseconds(int(snap.created * 1e9))
        info.updated_at.FromNanoseconds(int(snap.updated * 1e9))
        return info

    def _mounts(self, mounts: list) -> list:
        from coco.rpc.protos import containerd_mount_pb2

        return [
            containerd_mount_pb2.Mount(type=m.type, source=m.source, options=m.options)
            for m in mounts
        ]

    def Prepare(self, req: Any, ctx: Any) -> Any:
        from coco.rpc.protos import snapshots_pb2

        labels = dict(req.labels)
        target = labels.get(SNAPSHOT_REF, "")
        if target and self.policy.wants(namespace_of(req.key), labels):
            if self.store.skip(target, req.parent, {**labels, GUEST_PULL: "true"}):
                self.say(
                    f"layer {target} of {labels.get('containerd.io/snapshot/cri.image-ref', '?')}"
                    ": pulled in the guest, unpack on the host skipped"
                )
                raise AlreadyExists(f"target snapshot {target!r}: already exists (guest pull)")
            self.say(f"{target}: taken by a snapshot unpacked on the host: unpacking here too")
        mounts = self.store.create(ACTIVE, req.key, req.parent, labels)
        return snapshots_pb2.PrepareSnapshotResponse(mounts=self._mounts(mounts))

    def View(self, req: Any, ctx: Any) -> Any:
        from coco.rpc.protos import snapshots_pb2

        mounts = self.store.create(VIEW, req.key, req.parent, dict(req.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=self._mounts(mounts))

    def Mounts(self, req: Any, ctx: Any) -> Any:
        from coco.rpc.protos import snapshots_pb2

        return snapshots_pb2.MountsResponse(mounts=self._mounts(self.store.mounts(req.key)))

    def Commit(self, req: Any, ctx: Any) -> Any:
        from google.protobuf import empty_pb2

        self.store.commit(req.name, req.key, dict(req.labels))
        return empty_pb2.Empty()

    def Remove(self, req: Any, ctx: Any) -> Any:
        from google.protobuf import empty_pb2

        self.store.remove(req.key)
        return empty_pb2.Empty()

    def Stat(self, req: Any, ctx: Any) -> Any:
        from coco.rpc.protos import snapshots_pb2

        return snapshots_pb2.StatSnapshotResponse(info=self._info(self.store.get(req.key)))

    def Update(self, req: Any, ctx: Any) -> Any:
        from coco.rpc.protos import snapshots_pb2

        snap = self.store.update(req.info.name, dict(req.info.labels), list(req.update_mask.paths))
        return snapshots_pb2.UpdateSnapshotResponse(info=self._info(snap))

    def List(self, req: Any, ctx: Any) -> Iterator[Any]:
        from coco.rpc.protos import snapshots_pb2

        match = matcher(list(req.filters))
        batch = []
        for snap in self.store.all():
            if not match(_fields(snap)):
                continue
            batch.append(self._info(snap))
            if len(batch) == _BATCH:
                yield snapshots_pb2.ListSnapshotsResponse(info=batch)
                batch = []
        if batch:
            yield snapshots_pb2.ListSnapshotsResponse(info=batch)

    def Usage(self, req: Any, ctx: Any) -> Any:
        from coco.rpc.protos import snapshots_pb2

        size, inodes = self.store.usage(req.key)
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, req: Any, ctx: Any) -> Any:
        from google.protobuf import empty_pb2

        self.store.cleanup()
        return empty_pb2.Empty()


def _fields(snap: Snapshot) -> Callable[[list[str]], str | None]:
    def lookup(path: list[str]) -> str | None:
        head = path[0] if path else ""
        if head == "name" and len(path) == 1:
            return snap.key
        if head == "parent" and len(path) == 1:
            return snap.parent
        if head == "kind" and len(path) == 1:
            return _KIND_FILTER[snap.kind]
        if head == "labels" and len(path) >= 2:
            return snap.labels.get(".".join(path[1:]))
        return None

    return lookup


def _wrap(name: str, fn: Callable[[Any, Any], Any], stream: bool) -> Callable[[Any, Any], Any]:
    import grpc

    def fail(ctx: Any, e: Exception) -> None:
        if isinstance(e, SnapshotterError):
            ctx.abort(getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNKNOWN), str(e))
        log.exception("%s failed", name)
        ctx.abort(grpc.StatusCode.INTERNAL, f"{name}: {type(e).__name__}: {e}")

    if stream:

        def call_stream(req: Any, ctx: Any) -> Iterator[Any]:
            try:
                yield from fn(req, ctx)
            except Exception as e:
                fail(ctx, e)

        return call_stream

    def call(req: Any, ctx: Any) -> Any:
        try:
            return fn(req, ctx)
        except Exception as e:
            fail(ctx, e)

    return call


def handler(service: Snapshotter) -> Any:
    """The grpcio generic handler of the Snapshots service."""
    import grpc
    from google.protobuf import empty_pb2

    from coco.rpc.protos import snapshots_pb2 as pb

    methods = {
        "Prepare": (pb.PrepareSnapshotRequest, pb.PrepareSnapshotResponse, False),
        "View": (pb.ViewSnapshotRequest, pb.ViewSnapshotResponse, False),
        "Mounts": (pb.MountsRequest, pb.MountsResponse, False),
        "Commit": (pb.CommitSnapshotRequest, empty_pb2.Empty, False),
        "Remove": (pb.RemoveSnapshotRequest, empty_pb2.Empty, False),
        "Stat": (pb.StatSnapshotRequest, pb.StatSnapshotResponse, False),
        "Update": (pb.UpdateSnapshotRequest, pb.UpdateSnapshotResponse, False),
        "List": (pb.ListSnapshotsRequest, pb.ListSnapshotsResponse, True),
        "Usage": (pb.UsageRequest, pb.UsageResponse, False),
        "Cleanup": (pb.CleanupRequest, empty_pb2.Empty, False),
    }
    handlers = {}
    for name, (req, resp, stream) in methods.items():
        fn = _wrap(name, getattr(service, name), stream)
        make = (
            grpc.unary_stream_rpc_method_handler if stream else grpc.unary_unary_rpc_method_handler
        )
        handlers[name] = make(
            fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _claim_socket(path: Path) -> None:
    """Remove a stale socket at ``path``; refuse one that a live server answers on."""
    if not (path.exists() or path.is_symlink()):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        return
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise SnapshotterError(f"--socket {path}: expected a free path, found a server listening there")


def serve(
    socket_path: Path,
    root: Path,
    containerd_address: str,
    patterns: list[str],
    *,
    ready: Callable[[str], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; the socket is removed at the end."""
    import grpc

    from coco.host.snapshotter.guestpull import ContentReader

    speak = say or (lambda text: print(f"coco snapshotter: {text}", file=sys.stderr, flush=True))
    if len(str(socket_path)) > 107:
        raise SnapshotterError(
            f"--socket {socket_path}: expected a path of at most 107 bytes (a Unix socket), "
            f"found {len(str(socket_path))}"
        )
    _claim_socket(socket_path)
    store = Store(root)
    content = ContentReader(containerd_address)
    service = Snapshotter(store, GuestPullPolicy(content, patterns), speak)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler(service),))
    server.add_insecure_port(f"unix:{socket_path}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        os.chmod(socket_path, 0o600)
        if ready is not None:
            ready(str(socket_path))
        stop.wait()
    finally:
        server.stop(grace=5).wait()
        content.close()
        store.close()
        if socket_path.is_socket():
            socket_path.unlink()
