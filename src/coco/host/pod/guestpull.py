"""Guest pull on containerd 1.6: the image's config on the host, its layers only in the guest.

A confidential pod's image is pulled (and, if encrypted, decrypted) inside the guest; the host
must neither need nor get its layers. containerd's CRI, though, creates a container only from an
image it holds unpacked, and 1.6 unpacks every image its PullImage fetches, which fails for an
encrypted one (upstream solves this with a remote snapshotter, nydus in proxy mode, and
containerd 1.7's per-runtime snapshotters). So for a runtime that pulls in the guest, ``coco pod
run`` does what such a snapshotter amounts to: it reads the image's manifest and config from the
registry (never a layer) and imports into containerd, under the image's own name, a placeholder:
the same config (entrypoint, command, env, user, working dir: what the OCI spec the agent checks
is built from) over one empty layer, labelled ``io.coco.pod.guest-pull`` with the real manifest
digest. CRI then creates the container as usual, with ``io.kubernetes.cri.image-name`` naming the
real image, which the guest pulls; the host rootfs is an empty directory nobody uses.

A later pod on a host runtime (runc) that finds a placeholder under the name pulls the real
image instead (:func:`is_placeholder`).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from coco.host.pod import PodError

LABEL = "io.coco.pod.guest-pull"
EMPTY_LAYER = b"\0" * 1024  # a tar with no entries
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
NAMESPACE = "k8s.io"  # containerd's CRI namespace


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _desc(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": _sha(data), "size": len(data)}


def image_name(image: str) -> str:
    """The full name containerd's CRI gives ``image`` (``busybox`` -> docker.io/library/busybox:latest)."""
    from coco.errors import CocoError
    from coco.oci.reference import parse_docker

    try:
        ref = parse_docker(image)
    except CocoError as e:
        raise PodError(f"image {image!r}: {e}") from None
    if ref.digest:
        return f"{ref.registry}/{ref.repository}@{ref.digest}"
    return f"{ref.registry}/{ref.repository}:{ref.tag or 'latest'}"


def placeholder(name: str, config_raw: bytes, manifest_digest: str) -> bytes:
    """An OCI archive (tar) of the placeholder image named ``name``."""
    try:
        cfg = json.loads(config_raw)
    except ValueError:
        raise PodError(f"image {name}: its config is not JSON") from None
    if not isinstance(cfg, dict):
        raise PodError(f"image {name}: expected a JSON object as its config")
    inner = cfg.get("config") if isinstance(cfg.get("config"), dict) else {}
    inner = dict(inner)
    inner["Labels"] = {**(inner.get("Labels") or {}), LABEL: manifest_digest}
    cfg["config"] = inner
    cfg["rootfs"] = {"type": "layers", "diff_ids": [_sha(EMPTY_LAYER)]}
    cfg["history"] = [{"created_by": f"coco pod run: guest-pull placeholder of {manifest_digest}"}]
    config = json.dumps(cfg, separators=(",", ":")).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _desc(OCI_CONFIG, config),
            "layers": [_desc(OCI_LAYER, EMPTY_LAYER)],
        },
        separators=(",", ":"),
    ).encode()
    entry = _desc(OCI_MANIFEST, manifest)
    entry["annotations"] = {
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": name.rpartition(":")[2] if "@" not in name else "",
    }
    index = json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:

        def add(path: str, data: bytes) -> None:
            ti = tarfile.TarInfo(path)
            ti.size = len(data)
            ti.mode = 0o644
            tf.addfile(ti, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for blob in (config, EMPTY_LAYER, manifest):
            add("blobs/sha256/" + _sha(blob).split(":")[1], blob)
    return buf.getvalue()


def fetch_config(image: str, access: Any) -> tuple[bytes, str]:
    """The image's config bytes and manifest digest, read from its registry (no layer)."""
    from coco.errors import CocoError
    from coco.oci.inspect import inspect_image
    from coco.oci.models import host_arch

    try:
        found = inspect_image(f"docker://{image}", access, os="linux", arch=host_arch())
    except CocoError as e:
        raise PodError(f"image {image}: reading its config for a guest pull: {e}") from None
    digest = found.instance.digest if found.instance is not None else found.digest
    return found.config.raw, str(digest)


def import_placeholder(address: str, name: str, archive: bytes, snapshotter: str) -> None:
    """``ctr images import`` the placeholder into containerd's CRI namespace, unpacked into the
    CRI's snapshotter."""
    ctr = shutil.which("ctr")
    if ctr is None:
        raise PodError(
            "guest pull on containerd needs its `ctr` command (Debian package containerd)"
        )
    with tempfile.NamedTemporaryFile(suffix=".tar") as f:
        f.write(archive)
        f.flush()
        argv = [ctr, "--address", address, "-n", NAMESPACE, "images", "import"]
        if snapshotter:
            argv += ["--snapshotter", snapshotter]
        r = subprocess.run(
            [*argv, f.name], capture_output=True, text=True, timeout=120, check=False
        )
    if r.returncode != 0:
        detail = " ".join((r.stderr or r.stdout).split())
        raise PodError(f"image {name}: importing the guest-pull placeholder: ctr: {detail}")


def is_placeholder(client: Any, image: str) -> bool:
    """Whether the image containerd holds under ``image`` is a placeholder of ours."""
    from coco.rpc.protos import cri_pb2 as pb

    resp = client.call(
        "ImageStatus", pb.ImageStatusRequest(image=pb.ImageSpec(image=image), verbose=True)
    )
    if not resp.HasField("image"):
        return False
    return LABEL.encode() in resp.info.get("info", "").encode()


def snapshotter(client: Any) -> str:
    """The snapshotter containerd's CRI creates containers with (its config, via CRI Status)."""
    from coco.rpc.protos import cri_pb2 as pb

    info = client.call("Status", pb.StatusRequest(verbose=True)).info
    try:
        return str(json.loads(info.get("config", "{}"))["containerd"]["snapshotter"])
    except (ValueError, KeyError, TypeError):
        return ""


def ensure(client: Any, address: str, image: str, access: Any) -> str:
    """Make ``image`` creatable in containerd without its layers; the CRI image id."""
    name = image_name(image)
    config, digest = fetch_config(image, access)
    import_placeholder(address, name, placeholder(name, config, digest), snapshotter(client))
    deadline = time.monotonic() + 10
    while True:  # the CRI's image store learns of the import from containerd's events
        found = client.image_status(name)
        if found is not None:
            return str(found.id)
        if time.monotonic() > deadline:
            raise PodError(f"image {name}: imported, but containerd's CRI does not list it")
        time.sleep(0.1)


def socket_path(endpoint: str) -> str:
    return str(Path(endpoint.removeprefix("unix://")))
