"""The layer store: unpacked layers kept by diff_id, shared by every bundle that uses them.

Layout under the store root::

    layers/<hex>/fs/         the layer directory (overlay lower-layer form, see coco.image.unpack)
    layers/<hex>/meta.json   {"diff_id", "implicit_dirs", "fresh_dirs",
                             "whiteout_dirs", "entries", "bytes"}
    tmp/<random>/            unpacks in progress; renamed into layers/ only on success
    index.json               {"version": 1, "bundles": {"/abs/bundle": {"layers": [diff_id...]}}}
    gc.lock, index.lock      flock files

Concurrency: pulls and bundle creation hold ``gc.lock`` shared for their whole duration, ``prune``
holds it exclusive, so a layer is never pruned between its commit and its bundle registration, and
a temp dir seen by ``prune`` is always stale. Two pulls of the same layer unpack into separate temp
dirs; the first commit wins and the other is discarded. ``index.lock`` serialises index updates
(written to a temp file and renamed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from coco.errors import LayerStoreError
from coco.image.unpack import UnpackLimits, UnpackStats, unpack_layer

__all__ = ["LayerInfo", "LayerStore"]

_HEX_LEN = {"sha256": 64, "sha512": 128}


@dataclass(frozen=True)
class LayerInfo:
    """A committed layer: its diff_id, its directory and what the unpacker recorded."""

    diff_id: str
    path: Path  # the layer directory (overlay lowerdir)
    implicit_dirs: frozenset[str]
    entries: int
    size: int
    fresh_dirs: frozenset[str] = frozenset()
    whiteout_dirs: frozenset[str] = frozenset()


def _check_diff_id(diff_id: str) -> str:
    alg, _, hexpart = diff_id.partition(":")
    if alg not in _HEX_LEN or len(hexpart) != _HEX_LEN[alg] or hexpart.strip("0123456789abcdef"):
        raise LayerStoreError(
            f"layer store: expected a diff_id sha256:<64 hex> or sha512:<128 hex>, found {diff_id!r}"
        )
    return hexpart


def open_root(root: Path) -> None:
    """Make sure ``root`` may hold a store: an existing store (it has ``layers/``) is kept, a
    missing directory is created with its parents, an empty one is adopted; anything else (a file,
    ``/``, ``/etc``, any other non-empty directory) is refused, so that a mistyped ``--store``
    never fills a directory with ``layers/`` and ``tmp/``."""
    where = f"layer store {root}"
    if not os.path.lexists(root):
        try:
            os.makedirs(root, mode=0o700, exist_ok=True)
        except OSError as e:
            raise LayerStoreError(
                f"{where}: cannot create the directory: {e.strerror or e}"
            ) from None
    if not root.is_dir():
        raise LayerStoreError(f"{where}: expected a directory, found something else")
    if (root / "layers").is_dir():
        return
    try:
        with os.scandir(root) as entries:
            found = next(entries, None)
    except OSError as e:
        raise LayerStoreError(f"{where}: cannot list the directory: {e.strerror or e}") from None
    if found is not None:
        raise LayerStoreError(
            f"{where}: expected a layer store (with layers/) or an empty directory, found a "
            f"directory that holds other things (such as {found.name!r})"
        )


class LayerStore:
    """Layers by diff_id under ``root``; see the module docstring for layout and locking."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self._layers = self.root / "layers"
        self._tmp = self.root / "tmp"
        open_root(self.root)
        for d in (self._layers, self._tmp):
            d.mkdir(mode=0o700, exist_ok=True)

    # -- locks -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _flock(self, name: str, mode: int) -> Iterator[None]:
        fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    def session(self) -> contextlib.AbstractContextManager[None]:
        """Hold while pulling and assembling a bundle: ``prune`` waits for it."""
        return self._flock("gc.lock", fcntl.LOCK_SH)

    # -- layers ------------------------------------------------------------------------------
    def _dir(self, diff_id: str) -> Path:
        return self._layers / _check_diff_id(diff_id)

    def has(self, diff_id: str) -> bool:
        return (self._dir(diff_id) / "meta.json").is_file()

    def get(self, diff_id: str) -> LayerInfo:
        d = self._dir(diff_id)
        try:
            meta = json.loads((d / "meta.json").read_text())
        except FileNotFoundError:
            raise LayerStoreError(f"layer store {self.root}: no layer {diff_id}") from None
        except (OSError, ValueError) as e:
            raise LayerStoreError(f"layer store: {d}/meta.json is unreadable: {e}") from None
        if meta.get("diff_id") != diff_id:
            raise LayerStoreError(
                f"layer store: {d}/meta.json: expected diff_id {diff_id}, "
                f"found {meta.get('diff_id')!r}"
            )
        return LayerInfo(
            diff_id,
            d / "fs",
            frozenset(meta.get("implicit_dirs", [])),
            int(meta.get("entries", 0)),
            int(meta.get("bytes", 0)),
            frozenset(meta.get("fresh_dirs", [])),
            frozenset(meta.get("whiteout_dirs", [])),
        )

    def layers(self) -> list[str]:
        out = []
        for d in sorted(self._layers.iterdir()):
            try:
                out.append(json.loads((d / "meta.json").read_text())["diff_id"])
            except (OSError, ValueError, KeyError):
                continue
        return out

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh temp dir inside the store (``fs/`` inside is the unpack target); removed
        when the block fails, and by :meth:`commit` otherwise."""
        tmp = Path(tempfile.mkdtemp(prefix="layer-", dir=self._tmp))
        (tmp / "fs").mkdir(mode=0o755)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def commit(self, diff_id: str, tmp: Path, stats: UnpackStats) -> LayerInfo:
        """Move a finished unpack into place; if the layer appeared meanwhile, keep that one."""
        target = self._dir(diff_id)
        meta = {
            "diff_id": diff_id,
            "implicit_dirs": stats.implicit_dirs,
            "fresh_dirs": stats.fresh_dirs,
            "whiteout_dirs": stats.whiteout_dirs,
            "entries": stats.entries,
            "bytes": stats.bytes_read,
        }
        try:
            (tmp / "meta.json").write_text(json.dumps(meta))
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not self.has(diff_id):
                raise
        return self.get(diff_id)

    def add_layer(
        self,
        diff_id: str,
        stream: BinaryIO,
        *,
        limits: UnpackLimits | None = None,
        verify: bool = True,
    ) -> LayerInfo:
        """Unpack the decompressed tar ``stream`` as layer ``diff_id`` (checked when ``verify``);
        a layer already present is returned without reading the stream."""
        _check_diff_id(diff_id)
        with self.session():
            if self.has(diff_id):
                return self.get(diff_id)
            with self.staging() as tmp:
                stats = unpack_layer(
                    stream, tmp / "fs", limits=limits, diff_id=diff_id if verify else None
                )
                return self.commit(diff_id, tmp, stats)

    # -- bundles index -----------------------------------------------------------------------
    def _read_index(self) -> dict[str, Any]:
        try:
            data = json.loads((self.root / "index.json").read_text())
        except FileNotFoundError:
            return {"version": 1, "bundles": {}}
        except (OSError, ValueError) as e:
            raise LayerStoreError(
                f"layer store: {self.root}/index.json is unreadable: {e}"
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("bundles"), dict):
            raise LayerStoreError(
                f"layer store: {self.root}/index.json: expected {{'bundles': {{...}}}}"
            )
        return data

    def _write_index(self, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix="index-", dir=self.root)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.root / "index.json")

    def bundles(self) -> dict[str, list[str]]:
        """Bundle path -> the diff_ids it uses."""
        return {k: list(v["layers"]) for k, v in self._read_index()["bundles"].items()}

    def register_bundle(self, bundle: str | os.PathLike[str], diff_ids: Iterable[str]) -> None:
        ids = list(diff_ids)
        for d in ids:
            _check_diff_id(d)
        with self._flock("index.lock", fcntl.LOCK_EX):
            data = self._read_index()
            data["bundles"][str(Path(bundle).absolute())] = {"layers": ids}
            self._write_index(data)

    def unregister_bundle(self, bundle: str | os.PathLike[str]) -> None:
        with self._flock("index.lock", fcntl.LOCK_EX):
            data = self._read_index()
            if data["bundles"].pop(str(Path(bundle).absolute()), None) is not None:
                self._write_index(data)

    def prune(self) -> list[str]:
        """Remove layers no bundle uses (bundles whose directory vanished are forgotten) and
        stale temp dirs; returns the removed diff_ids."""
        removed: list[str] = []
        with self._flock("gc.lock", fcntl.LOCK_EX), self._flock("index.lock", fcntl.LOCK_EX):
            data = self._read_index()
            live = {k: v for k, v in data["bundles"].items() if os.path.isdir(k)}
            if live != data["bundles"]:
                data["bundles"] = live
                self._write_index(data)
            used = {_check_diff_id(d) for v in live.values() for d in v["layers"]}
            for d in sorted(self._layers.iterdir()):
                if d.name in used:
                    continue
                diff_id = ""
                with contextlib.suppress(OSError, ValueError, KeyError):
                    diff_id = json.loads((d / "meta.json").read_text())["diff_id"]
                # rename first so a half-removed layer never looks committed
                doomed = self._tmp / f"prune-{d.name}"
                os.rename(d, doomed)
                shutil.rmtree(doomed)
                removed.append(diff_id or d.name)
            for t in self._tmp.iterdir():
                shutil.rmtree(t, ignore_errors=True)
        return removed
