"""The layer store: unpacked layers kept by diff_id, shared by every bundle that uses them.

Layout under the store root::

    layers/<hex>/fs/         the layer directory (overlay lower-layer form, see coco.image.unpack)
    layers/<hex>/meta.json   {"diff_id", "implicit_dirs", "fresh_dirs", "whiteout_dirs",
                             "entries", "bytes", "file_bytes", "encrypted", "keys", "claims"}
    tmp/<random>/            unpacks in progress; renamed into layers/ only on success
    configs/<hex>            image configs by digest (a cache: checked against it when read)
    index.json               {"version": 1, "bundles": {"/abs/bundle": {"layers": [diff_id...]}}}
    secret                   32 random bytes (mode 0600) keying the key proofs
    gc.lock, index.lock      flock files

Concurrency: pulls and bundle creation hold ``gc.lock`` shared for their whole duration, ``prune``
holds it exclusive, so a layer is never pruned between its commit and its bundle registration, and
a temp dir seen by ``prune`` is always stale. Two pulls of the same layer unpack into separate temp
dirs; the first commit wins and the other is discarded. ``index.lock`` serialises index updates
and meta.json updates (written to a temp file and renamed).

Reuse (:meth:`LayerStore.reusable`): a pull takes a layer from the store instead of fetching it
only when the record says it stays within the pull's ``UnpackLimits`` (``entries``, ``bytes`` of
tar stream, ``file_bytes`` of declared file sizes) and, when the pull's descriptor is encrypted or
the layer was first stored from an encrypted one (``encrypted``), when the pull holds a key that
opened it: ``keys`` lists HMAC-SHA256(secret, diff_id NUL private options) for every set of
private options (symmetric key, nonce, blob digest) that decrypted to this layer, and the pull
presents the options it unwrapped from its own manifest. Anything else (no key, another image's
key, a record from before these fields) is not reusable: the pull fetches the layer as if the
store lacked it, which fails where a fresh store fails, or completes the record at
:meth:`LayerStore.commit`.

Unwrapping a key costs a private-key operation and, in a new process, loading ``cryptography``
(together about half of a warm pull). So a proof is also remembered by what produced it:
``claims`` lists HMAC-SHA256(secret, diff_id NUL "claim" NUL c), where c is a digest of the
layer's wrapped-key and public-options annotations together with the exact bytes (and
passwords) of the key files the pull was given (:func:`coco.ocicrypt.keyspec.key_files_digest`).
Unwrapping is deterministic, so the same key bytes and the same annotations unwrap to the same
options again; a claim is recorded only after they did and the options matched a proof, and
:meth:`LayerStore.proven` accepts it without the key operation. Other keys, other annotations or
another store (another secret) do not match, and the pull unwraps as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from coco.crypto.digest import sha256_digest
from coco.errors import LayerStoreError
from coco.files import create_temp, mark_hierarchy_top
from coco.record import record

TYPE_CHECKING = False  # typing stays unloaded in short processes
if TYPE_CHECKING:
    from typing import Any, BinaryIO

if TYPE_CHECKING:  # the untar loads only when a layer is unpacked
    from coco.image.limits import UnpackLimits
    from coco.image.unpack import UnpackStats

__all__ = ["LayerInfo", "LayerStore"]

_HEX_LEN = {"sha256": 64, "sha512": 128}
_SECRET_SIZE = 32
_MAX_CONFIG = 4 << 20  # configs kept by the store; larger ones are fetched each time
_LAYOUT_FIELDS = ("implicit_dirs", "fresh_dirs", "whiteout_dirs")  # what a bundle reads of a record


@record
class LayerInfo:
    """A committed layer: its diff_id, its directory and what the unpacker recorded."""

    diff_id: str
    path: Path  # the layer directory (overlay lowerdir)
    implicit_dirs: frozenset[str]
    entries: int
    size: int
    fresh_dirs: frozenset[str] = frozenset()
    whiteout_dirs: frozenset[str] = frozenset()
    file_bytes: int | None = None  # None: stored before it was recorded
    encrypted: bool | None = None  # first stored from an encrypted layer; None: not recorded
    keys: frozenset[str] = frozenset()  # key proofs (see the module docstring)
    claims: frozenset[str] = frozenset()  # proofs remembered by key files (module docstring)

    def within(self, limits: UnpackLimits) -> bool:
        """Whether a fresh unpack under ``limits`` accepts this layer (unknown: no)."""
        if self.file_bytes is None:
            return False
        return (
            self.entries <= limits.max_files
            and max(self.size, self.file_bytes) <= limits.max_layer_size
        )


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
        mark_hierarchy_top(self._tmp)  # each layer unpacked into a block group of its own
        self._secret_key: bytes | None = None

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
        file_bytes, encrypted = meta.get("file_bytes"), meta.get("encrypted")
        return LayerInfo(
            diff_id,
            d / "fs",
            frozenset(meta.get("implicit_dirs", [])),
            int(meta.get("entries", 0)),
            int(meta.get("bytes", 0)),
            frozenset(meta.get("fresh_dirs", [])),
            frozenset(meta.get("whiteout_dirs", [])),
            # a record from before whiteout_dirs counts as incomplete (refetched, completed)
            file_bytes if isinstance(file_bytes, int) and "whiteout_dirs" in meta else None,
            encrypted if isinstance(encrypted, bool) else None,
            frozenset(meta.get("keys", [])),
            frozenset(meta.get("claims", [])),
        )

    def reusable(self, diff_id: str, limits: UnpackLimits, key: bytes | None) -> bool:
        """Whether a pull may take layer ``diff_id`` from the store instead of fetching it;
        ``key``: the private options the pull unwrapped from its descriptor (None: the
        descriptor is not encrypted). See the module docstring."""
        if not self.has(diff_id):
            return False
        info = self.get(diff_id)
        if info.encrypted is None or not info.within(limits):
            return False
        if key is None:
            return not info.encrypted
        return self._proof(diff_id, key) in info.keys

    def proven(self, diff_id: str, limits: UnpackLimits, claim: bytes) -> bool:
        """Whether encrypted layer ``diff_id`` may be reused on the strength of ``claim`` alone
        (recorded by :meth:`remember_claim` or :meth:`commit`; see the module docstring)."""
        if not self.has(diff_id):
            return False
        info = self.get(diff_id)
        if info.encrypted is not True or not info.within(limits):
            return False
        return self._claim_proof(diff_id, claim) in info.claims

    def remember_claim(self, diff_id: str, claim: bytes) -> None:
        """Record that the key files of ``claim`` proved a key for ``diff_id`` (just now, by
        unwrapping and matching a proof)."""
        proof = self._claim_proof(diff_id, claim)
        info = self.get(diff_id)
        if info.encrypted is True and proof not in info.claims:
            self._complete(diff_id, {"keys": [], "claims": [proof]})

    def _proof(self, diff_id: str, key: bytes) -> str:
        msg = diff_id.encode() + b"\0" + key
        return hmac.new(self._secret(), msg, hashlib.sha256).hexdigest()

    def _claim_proof(self, diff_id: str, claim: bytes) -> str:
        # private options are JSON and start with "{": the two kinds of proof never meet
        msg = diff_id.encode() + b"\0claim\0" + claim
        return hmac.new(self._secret(), msg, hashlib.sha256).hexdigest()

    def _secret(self) -> bytes:
        """The key-proof secret, made on first use (linked into place, so that two pulls
        making it at once agree on one)."""
        if self._secret_key is None:
            path = self.root / "secret"
            try:
                if not path.exists():
                    fd, tmp = create_temp(self._tmp, "secret-")  # mode 0600
                    try:
                        os.write(fd, os.urandom(_SECRET_SIZE))
                        os.fsync(fd)
                        with contextlib.suppress(FileExistsError):
                            os.link(tmp, path)
                    finally:
                        os.close(fd)
                        os.unlink(tmp)
                data = path.read_bytes()
            except OSError as e:
                raise LayerStoreError(
                    f"layer store: {path}: cannot make or read the key-proof secret: "
                    f"{e.strerror or e}"
                ) from None
            if len(data) != _SECRET_SIZE:
                raise LayerStoreError(
                    f"layer store: {path}: expected {_SECRET_SIZE} bytes, found {len(data)} "
                    "(remove it to make a new one: encrypted layers are then fetched again)"
                )
            self._secret_key = data
        return self._secret_key

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
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="layer-", dir=self._tmp))
        (tmp / "fs").mkdir(mode=0o755)
        try:
            yield tmp
        except BaseException:
            _rmtree(tmp, ignore_errors=True)
            raise

    def commit(
        self,
        diff_id: str,
        tmp: Path,
        stats: UnpackStats,
        key: bytes | None = None,
        claim: bytes | None = None,
    ) -> LayerInfo:
        """Move a finished unpack into place; ``key``: the private options that decrypted it
        (None: it was not encrypted), ``claim``: the key files that unwrapped them, if known.
        If the layer is there already, that one stays and its record gains the proofs (a record
        from before sizes and keys is completed)."""
        target = self._dir(diff_id)
        meta = {
            "diff_id": diff_id,
            "implicit_dirs": stats.implicit_dirs,
            "fresh_dirs": stats.fresh_dirs,
            "whiteout_dirs": stats.whiteout_dirs,
            "entries": stats.entries,
            "bytes": stats.bytes_read,
            "file_bytes": stats.file_bytes,
            "encrypted": key is not None,
            "keys": [] if key is None else [self._proof(diff_id, key)],
            "claims": [] if key is None or claim is None else [self._claim_proof(diff_id, claim)],
        }
        try:
            (tmp / "meta.json").write_text(json.dumps(meta))
            os.rename(tmp, target)
        except OSError:
            _rmtree(tmp, ignore_errors=True)
            if not self.has(diff_id):
                raise
            self._complete(diff_id, meta)
        return self.get(diff_id)

    def _complete(self, diff_id: str, new: dict[str, Any]) -> None:
        """Merge what another verified unpack of a stored layer learnt into its record."""
        path = self._dir(diff_id) / "meta.json"
        with self._flock("index.lock", fcntl.LOCK_EX):
            old = json.loads(path.read_text())
            if isinstance(old.get("encrypted"), bool) and isinstance(old.get("keys"), list):
                keys = sorted(set(old["keys"]) | set(new["keys"]))
                old_claims = old.get("claims") if isinstance(old.get("claims"), list) else []
                claims = sorted(set(old_claims) | set(new.get("claims", [])))
                missing = {k: new[k] for k in _LAYOUT_FIELDS if k not in old and k in new}
                if keys == sorted(old["keys"]) and claims == sorted(old_claims) and not missing:
                    return
                meta = {**old, **missing, "keys": keys, "claims": claims}
            else:  # recorded before sizes and keys were: this unpack's record stands for it
                fields = ("entries", "bytes", "file_bytes", "encrypted", "keys", "claims",
                          *_LAYOUT_FIELDS)  # fmt: skip
                meta = {**old, **{k: new[k] for k in fields}}
            _replace(self._tmp, path, json.dumps(meta).encode(), "meta-")

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
            from coco.image.unpack import unpack_layer

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
        text = json.dumps(data, indent=1, sort_keys=True)
        _replace(self.root, self.root / "index.json", text.encode(), "index-")

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

    # -- image configs ---------------------------------------------------------------------
    @staticmethod
    def cached_config(root: str | os.PathLike[str], digest: str) -> bytes | None:
        """The config blob ``digest`` if a pull into the store at ``root`` kept it and it still
        hashes to its digest; None otherwise. Creates nothing (a refused pull writes nothing)."""
        try:
            path = Path(root, "configs", _check_diff_id(digest))
            with open(path, "rb") as f:
                data = f.read(_MAX_CONFIG + 1)
        except (OSError, LayerStoreError):
            return None
        if len(data) > _MAX_CONFIG or sha256_digest(data) != digest:
            return None  # sha512 configs are not kept (see keep_config)
        return data

    def keep_config(self, digest: str, data: bytes) -> None:
        """Keep a config blob the pull checked against ``digest`` (best effort)."""
        if len(data) > _MAX_CONFIG or not digest.startswith("sha256:"):
            return
        d = self.root / "configs"
        with contextlib.suppress(OSError):
            d.mkdir(mode=0o700, exist_ok=True)
            _replace(d, d / _check_diff_id(digest), data, ".config-")

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
                _rmtree(doomed)
                removed.append(diff_id or d.name)
            for t in self._tmp.iterdir():
                _rmtree(t, ignore_errors=True)
            _rmtree(self.root / "configs", ignore_errors=True)  # a cache: pulls refill it
        return removed


def _replace(tmp_dir: Path, target: Path, data: bytes, prefix: str) -> None:
    """Put ``data`` at ``target`` in one rename from a temporary file in ``tmp_dir`` (not
    synced to disk, as the store's records never were); the temporary file goes on failure."""
    fd, tmp = create_temp(tmp_dir, prefix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _rmtree(path: str | os.PathLike[str], ignore_errors: bool = False) -> None:
    import shutil  # only when something is taken away

    shutil.rmtree(path, ignore_errors=ignore_errors)
