"""Images for genpolicy: the config and the dm-verity root of every layer, pulled through coco.oci.

With guest pull no root is needed (the guest pulls and checks the image itself): layers are only
read for ``/etc/passwd`` and ``/etc/group``, and encrypted ones are skipped (the guest decrypts
them with the key from the KBS; their users cannot be looked up here).

A layer is streamed once: the registry's chunks are hashed (the blob digest, checked by the
client), decompressed (gzip, zstd or none) and hashed again (the config's diff_id) on their way to
a temporary file; the tarfs index is appended to that file and its verity root computed, then the
file is removed. Downloading runs in its own thread so that network, inflate and hashing overlap,
and two layers are processed at a time (hashlib, isal and zstd release the GIL).

Results are kept in a layers-cache JSON file keyed by diff_id (the upstream shape:
``[{"diff_id": ..., "verity_hash": ..., "passwd": ..., "group": ...}]``; ``verity_hash`` absent
for a layer read with guest pull only), so a second run downloads nothing for layers it has seen.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zstandard

from coco import jsonio
from coco.errors import CocoError, GenpolicyError
from coco.integrity import tardev, tarindex
from coco.integrity import verity as verity_tree
from coco.oci import mediatypes as mt
from coco.oci.compression import decompressed
from coco.oci.models import Descriptor, ImageConfig
from coco.oci.reference import parse_reference
from coco.oci.stream import ChunkReader, prefetch
from coco.oci.transport import Access, ImageSource, open_source, platform_manifest


@dataclass(frozen=True)
class LayerInfo:
    """One layer as the policy needs it."""

    diff_id: str
    verity_hash: str  # hex; "" when not computed (guest pull)
    passwd: str = ""  # /etc/passwd of this layer, if it has one
    group: str = ""
    encrypted: bool = False  # not read (guest pull of an encrypted layer)


@dataclass
class ImageInfo:
    """An image's config (its ``config`` object) and its layers, bottom first."""

    name: str
    config: dict[str, Any]
    layers: list[LayerInfo] = field(default_factory=list)
    downloaded: int = 0  # layers fetched in this run (not served by the cache)


class LayersCache:
    """The layers-cache JSON file, locked while read and written (several runs may share it)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, LayerInfo] = {}
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            self._entries = self._read()

    def _read(self) -> dict[str, LayerInfo]:
        assert self.path is not None
        try:
            with self.path.open("rb") as f:
                fcntl.flock(f, fcntl.LOCK_SH)
                raw = f.read()
        except OSError as e:
            raise GenpolicyError(
                f"layers cache {self.path}: cannot read it: {e.strerror}"
            ) from None
        if not raw.strip():
            return {}
        items = jsonio.loads(raw, what=f"layers cache {self.path}", error=GenpolicyError)
        if not isinstance(items, list):
            raise GenpolicyError(f"layers cache {self.path}: expected a JSON array")
        out: dict[str, LayerInfo] = {}
        for i, it in enumerate(items):
            if (
                not isinstance(it, dict)
                or not isinstance(it.get("diff_id"), str)
                or not isinstance(it.get("verity_hash", ""), str)
                or len(it.get("verity_hash", "")) not in (0, 64)
            ):
                raise GenpolicyError(
                    f"layers cache {self.path}: entry {i}: expected "
                    '{"diff_id": "sha256:...", "verity_hash": "<64 hex>"} (verity_hash may be '
                    "left out)"
                )
            out[it["diff_id"]] = LayerInfo(
                it["diff_id"],
                it.get("verity_hash", ""),
                str(it.get("passwd", "")),
                str(it.get("group", "")),
            )
        return out

    def get(self, diff_id: str, verity: bool = True) -> LayerInfo | None:
        """The entry of ``diff_id``; with ``verity``, only one that has the root hash."""
        with self._lock:
            e = self._entries.get(diff_id)
        return e if e is not None and (e.verity_hash or not verity) else None

    def put(self, info: LayerInfo) -> None:
        if info.encrypted:  # nothing was learnt about it
            return
        with self._lock:
            old = self._entries.get(info.diff_id)
            if old is None or info.verity_hash or not old.verity_hash:
                self._entries[info.diff_id] = info

    def save(self) -> None:
        """Merge our entries into the file (other runs may have added theirs) atomically."""
        if self.path is None:
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+b") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            merged = self._read() if self.path.exists() else {}
            for k, e in self._entries.items():  # never drop a root another run computed
                old = merged.get(k)
                merged[k] = e if e.verity_hash or old is None or not old.verity_hash else old
            items = [
                {"diff_id": e.diff_id}
                | ({"verity_hash": e.verity_hash} if e.verity_hash else {})
                | {"passwd": e.passwd, "group": e.group}
                for e in sorted(merged.values(), key=lambda e: e.diff_id)
            ]
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent or ".")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(items, f, indent=2)
                    f.write("\n")
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


def _read_member(f: Any, entry: tarindex.TarEntry) -> str:
    here = f.tell()
    f.seek(entry.data_offset)
    data = f.read(min(entry.size, 1 << 20))
    f.seek(here)
    return data.decode("utf-8", "replace")


def layer_info(
    source: ImageSource,
    desc: Descriptor,
    diff_id: str,
    where: str,
    tmpdir: str | None = None,
    verity: bool = True,
) -> LayerInfo:
    """Download layer ``desc`` and compute its tardev verity root (with ``verity``) and read its
    passwd/group. Without ``verity`` an encrypted layer is not read at all."""
    if not verity and desc.media_type.endswith(mt.ENCRYPTED_SUFFIX):
        return LayerInfo(diff_id, "", encrypted=True)
    if mt.is_encrypted(desc.media_type):
        raise GenpolicyError(
            f"{where}: encrypted layer ({desc.media_type}): its verity root cannot be computed "
            "without the key"
        )
    if not mt.is_layer(desc.media_type):
        raise GenpolicyError(f"{where}: unsupported layer media type {desc.media_type!r}")
    h = hashlib.sha256()
    with tempfile.NamedTemporaryFile(prefix="coco-genpolicy-", suffix=".tar", dir=tmpdir) as f:
        # downloading overlaps with inflating and hashing
        chunks = prefetch(source.open_blob(desc, where), depth=8, name="genpolicy-download")
        try:
            stream = decompressed(ChunkReader(chunks), mt.compression(desc.media_type))
            while block := stream.read(1 << 20):
                h.update(block)
                f.write(block)
        except CocoError:
            raise
        except (EOFError, OSError, ValueError, zlib.error, zstandard.ZstdError) as e:
            raise GenpolicyError(f"{where}: cannot decompress it (truncated layer?): {e}") from None
        finally:
            chunks.close()  # type: ignore[attr-defined]
        got = "sha256:" + h.hexdigest()
        if got != diff_id:
            raise GenpolicyError(f"{where}: diff_id mismatch: expected {diff_id}, got {got}")
        tar_size = f.tell()
        f.flush()
        f.seek(0)
        index = tarindex.index_tar(f, tar_size, name=where)[0] if verity else b""
        passwd = group = ""
        f.seek(0)
        for e in tarindex.read_tar(f, tar_size, where):
            p = e.path.lstrip(b"./").rstrip(b"/")
            if e.type in (b"0", b"\0") and p == b"etc/passwd":
                passwd = _read_member(f, e)
            elif e.type in (b"0", b"\0") and p == b"etc/group":
                group = _read_member(f, e)
        if not verity:
            return LayerInfo(diff_id, "", passwd, group)
        f.seek(tar_size)
        f.write(index)
        f.flush()
        data_size = tar_size + len(index)
        params = replace(tardev.LAYER_VERITY, hash_offset=data_size, data_blocks=data_size // 4096)
        tree = verity_tree.build_tree(f.name, params)
    return LayerInfo(diff_id, tree.root_hash.hex(), passwd, group)


def image_info(
    image: str,
    access: Access,
    cache: LayersCache,
    *,
    tmpdir: str | None = None,
    workers: int = 2,
    verity: bool = True,
) -> ImageInfo:
    """Config and layer verity roots (with ``verity``) of ``image`` (``host/repo:tag``,
    ``docker://...`` or ``oci:``)."""
    ref_text = image if "://" in image or image.startswith("oci:") else f"docker://{image}"
    try:
        ref = parse_reference(ref_text)
    except CocoError as e:
        raise GenpolicyError(f"image {image}: {e}") from None
    source = open_source(ref, access)
    try:
        # upstream genpolicy resolves an index to linux/amd64: the guests' platform
        man = platform_manifest(source, f"image {image}", os="linux", arch="amd64")
        cfg_raw = b"".join(source.open_blob(man.config, f"image {image}: config"))
        cfg = ImageConfig.parse(cfg_raw, where=f"image {image}: config")
        if len(cfg.diff_ids) != len(man.layers):
            raise GenpolicyError(
                f"image {image}: config lists {len(cfg.diff_ids)} diff_ids but the manifest "
                f"has {len(man.layers)} layers"
            )
        info = ImageInfo(image, dict(cfg.config))
        todo = {}
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="genpolicy-layer") as pool:
            for i, (desc, diff_id) in enumerate(zip(man.layers, cfg.diff_ids, strict=True)):
                if cache.get(diff_id, verity) is None and diff_id not in todo:
                    where = f"image {image}: layer {i} ({desc.digest})"
                    todo[diff_id] = pool.submit(
                        layer_info, source, desc, diff_id, where, tmpdir, verity
                    )
            done = {d: fut.result() for d, fut in todo.items()}
        for got in done.values():
            cache.put(got)
        info.downloaded = sum(not got.encrypted for got in done.values())
        for diff_id in cfg.diff_ids:
            layer = cache.get(diff_id, verity) or done.get(diff_id)
            assert layer is not None
            info.layers.append(layer)
        return info
    finally:
        source.close()
