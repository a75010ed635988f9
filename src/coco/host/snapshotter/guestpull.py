"""Which images the guest pulls itself: the snapshotter skips their unpack on the host.

containerd's CRI plugin (with ``disable_snapshot_annotations = false``) labels each layer's
unpack with the image reference and the manifest digest. An image is pulled in the guest when

* its reference matches one of the configured patterns (shell globs, ``--guest-pull-image``), or
* its manifest, read from containerd's content store (``containerd.services.content.v1.Content/
  Read`` on containerd's socket, in the pull's namespace), has a layer whose media type ends in
  ``+encrypted``: only the attested guest gets its key, the host could not unpack it anyway.

Without those labels (``ctr pull``, or annotations disabled) nothing is skipped.
"""

from __future__ import annotations

import fnmatch
import threading
from typing import Any

from coco import jsonio
from coco.host.snapshotter import SnapshotterError, Unavailable

SNAPSHOT_REF = "containerd.io/snapshot.ref"
IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
GUEST_PULL = "containerd.io/snapshot/coco.guest-pull"  # on the snapshots this package skips
MAX_MANIFEST = 4 << 20
_READ = "/containerd.services.content.v1.Content/Read"


class ContentReader:
    """Blobs from containerd's content store over its gRPC socket."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel: Any = None
        self._lock = threading.Lock()

    def _stub(self) -> Any:
        import grpc

        from coco.rpc.protos import content_pb2

        with self._lock:
            if self._channel is None:
                target = self.address if "://" in self.address else f"unix://{self.address}"
                self._channel = grpc.insecure_channel(target)
            return self._channel.unary_stream(
                _READ,
                request_serializer=content_pb2.ReadContentRequest.SerializeToString,
                response_deserializer=content_pb2.ReadContentResponse.FromString,
            )

    def read(self, namespace: str, digest: str, limit: int = MAX_MANIFEST) -> bytes:
        import grpc

        from coco.rpc.protos import content_pb2

        where = f"blob {digest} in namespace {namespace!r} of containerd at {self.address}"
        data = bytearray()
        try:
            stream = self._stub()(
                content_pb2.ReadContentRequest(digest=digest),
                timeout=self.timeout,
                metadata=(("containerd-namespace", namespace),),
            )
            for chunk in stream:
                data += chunk.data
                if len(data) > limit:
                    stream.cancel()
                    raise SnapshotterError(f"{where}: expected at most {limit} bytes, found more")
        except grpc.RpcError as e:
            raise Unavailable(f"{where}: cannot read it: {e.code().name}: {e.details()}") from None
        return bytes(data)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None


class GuestPullPolicy:
    """Decides, per image, whether the guest pulls it; answers are remembered per manifest."""

    def __init__(self, content: ContentReader | None, patterns: list[str] | None = None) -> None:
        self.content = content
        self.patterns = list(patterns or [])
        self._known: dict[tuple[str, str], bool] = {}
        self._lock = threading.Lock()

    def wants(self, namespace: str, labels: dict[str, str]) -> bool:
        ref = labels.get(IMAGE_REF, "")
        if ref and any(fnmatch.fnmatchcase(ref, p) for p in self.patterns):
            return True
        digest = labels.get(MANIFEST_DIGEST, "")
        if not digest or not namespace or self.content is None:
            return False
        with self._lock:
            known = self._known.get((namespace, digest))
        if known is not None:
            return known
        raw = self.content.read(namespace, digest)
        answer = encrypted_layers(raw, f"manifest {digest} of {ref or 'an image'}") > 0
        with self._lock:
            self._known[(namespace, digest)] = answer
        return answer


def encrypted_layers(raw: bytes, what: str) -> int:
    """How many layers of an image manifest are encrypted (media type ``...+encrypted``)."""
    doc = jsonio.loads(raw, what=what, error=SnapshotterError)
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        raise SnapshotterError(f"{what}: expected an image manifest with a layers list")
    return sum(
        1
        for layer in layers
        if isinstance(layer, dict) and str(layer.get("mediaType", "")).endswith("+encrypted")
    )
