"""``coco image pull``: one pass per layer from the registry into the layer store, then a bundle.

For every layer of the platform's manifest that the store cannot give (keyed by diff_id; see
:meth:`coco.image.store.LayerStore.reusable`), the bytes flow once through a chain of threads with
bounded queues between them, so both cores work and no layer is ever held whole in memory::

    registry stream + sha256 (manifest digest)            reader thread
      -> AES-CTR (when +encrypted)                         decrypt worker (coco.ocicrypt.cipher)
      -> HMAC + sha256 (private-options digest) + inflate  gunzip thread (isal) / inline zstd
      -> sha256 (diff_id) + hardened untar                 the layer's pool thread

Every check sits at the end of its stream; the layer is unpacked into a temporary directory of
the store and committed only after all of them passed (blob digest and size, HMAC, plaintext
digest, diff_id, no trailing bytes). Layers run in a thread pool (``jobs``); the first failure
cancels the others. A pull that fails removes its temporary layers and the bundle directory (only
ever created by :func:`coco.image.bundle.create_bundle` once all layers are in the store).

A layer in the store is reused only when its record fits the pull's limits and, if the layer is
encrypted in this manifest or was first stored from an encrypted one, when this pull proves the
key: the layer's wrapped key is unwrapped with the keys given (one private-key operation, no data
touched) and must be one the store saw decrypt that layer. Otherwise the layer is fetched as if
the store lacked it, so a pull without the key fails exactly as it would on a fresh store.

A signature policy (containers-policy.json) is evaluated on the manifest before any layer or the
config is fetched; a refused image writes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import coco.log
from coco.crypto.digest import sha256_digest
from coco.errors import (
    CocoError,
    DecryptionError,
    DigestMismatchError,
    PullError,
)
from coco.oci import mediatypes as mt
from coco.oci.compression import decompressed
from coco.oci.models import Descriptor, ImageConfig, Manifest
from coco.oci.reference import ImageReference, parse_reference
from coco.oci.stream import Cancelled, ChunkReader, prefetch
from coco.oci.transport import Access, ImageSource, open_source, platform_manifest
from coco.record import Factory, record

TYPE_CHECKING = False  # typing stays unloaded in a short pull
if TYPE_CHECKING:  # a warm pull (every layer in the store) needs neither threads nor the untar
    from concurrent.futures import Future

    from coco.image.bundle import Bundle
    from coco.image.limits import UnpackLimits
    from coco.image.store import LayerStore
    from coco.ocicrypt.images import DecryptLayers, PrivateOptions

__all__ = ["LayerPull", "PullOptions", "PullResult", "pull_image"]

log = coco.log.get(__name__)  # logging loads only if a record needs it

_QUEUE_DEPTH = 4  # chunks between the reader thread and the decoders
_CHUNK = 1 << 20  # registry read size: every queue downstream holds chunks of this size


if TYPE_CHECKING:
    from typing import Any, Protocol

    class SignaturePolicy(Protocol):
        """What the pull needs from a signature policy: refuse (raise a CocoError) or return."""

        def check(self, source: ImageSource, manifest_raw: bytes, manifest_digest: str) -> None: ...

    class _Progress(Protocol):
        def task(self, description: str, total: int | None) -> Any: ...


@record
class PullOptions:
    """How to reach the image, which keys and policy apply, and how the bundle is assembled."""

    access: Access = Factory(Access)
    decryption: Any = None
    """A coco.ocicrypt.DecryptConfig, or a callable making one (called only when the image has
    an encrypted layer: its key is needed even when the layer is in the store), or None."""
    policy: SignaturePolicy | None = None
    jobs: int = 3
    flatten: bool = False
    os: str | None = None
    arch: str | None = None
    variant: str | None = None
    limits: UnpackLimits | None = None
    decryption_keys: tuple[str, ...] = ()
    """The ``--decryption-key`` values ``decryption`` was made from, if it was: the store then
    remembers which key files proved a layer's key, and a later pull with the same files reuses
    the layer without loading a key (see LayerStore.proven)."""

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise PullError(f"pull: --jobs must be at least 1, found {self.jobs}")


@record
class LayerPull:
    digest: str
    diff_id: str
    action: str  # "pulled" or "reused"


@record
class PullResult:
    reference: str
    manifest_digest: str
    config_digest: str
    bundle: Bundle
    layers: tuple[LayerPull, ...]


# -- streams -----------------------------------------------------------------------------------


def _plaintext(
    desc: Descriptor,
    chunks: Iterator[bytes],
    decrypter: DecryptLayers,
    private: PrivateOptions,
    index: int,
    total: int,
) -> Iterator[bytes]:
    """Decrypt an encrypted layer; its HMAC is checked at the end of the stream.

    The plaintext digest the private options name is not recomputed here (a SHA-256 over the
    whole compressed layer, ~55 ms per 150 MB): whoever can wrap a key to us chooses it along
    with the data, so it proves nothing the HMAC and the diff_id (from the digest-checked
    config, over every decompressed byte, with no trailing bytes allowed) do not already prove.
    """
    return decrypter.apply(index, total, desc, chunks, private).chunks


# -- the pipeline ------------------------------------------------------------------------------
class _Puller:
    def __init__(
        self,
        source: ImageSource,
        store: LayerStore,
        options: PullOptions,
        ref: str,
        progress: _Progress | None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.source = source
        self.store = store
        self.o = options
        self.ref = ref
        self.progress = progress
        self.cancel = cancel or threading.Event()
        self.committed: list[str] = []  # layers this pull added to the store
        self.decrypter: DecryptLayers | None = None
        self.private: dict[int, PrivateOptions] = {}  # unwrapped key options by layer index
        self.key_files: bytes | None = None  # digest of the key files given (keyspec)
        self._lock = threading.Lock()
        if options.limits is None:
            from coco.image.limits import UnpackLimits

            self.limits = UnpackLimits()
        else:
            self.limits = options.limits

    def prepare(self, m: Manifest) -> None:
        """If a layer is encrypted, keys must be given: in the store or not, its key must be
        proven (errors before any download). The keys themselves are loaded when a layer's key
        is first unwrapped, which a layer the store knows these key files for does not need."""
        encrypted = [d for d in m.layers if mt.is_encrypted(d.media_type)]
        if not encrypted:
            return
        if not self.o.decryption:
            raise PullError(
                f"{self.ref}: layer {encrypted[0].digest} is encrypted ({encrypted[0].media_type});"
                " expected a --decryption-key that can open it, found none given"
            )
        if self.o.decryption_keys:
            from coco.ocicrypt.keyspec import key_files_digest

            self.key_files = key_files_digest(self.o.decryption_keys)

    def _decrypter(self) -> DecryptLayers:
        with self._lock:
            if self.decrypter is None:
                from coco.ocicrypt import DecryptLayers  # ocicrypt only when a key is needed

                dec = self.o.decryption
                self.decrypter = DecryptLayers(dec() if callable(dec) else dec, self.ref)
            return self.decrypter

    def _unwrap(self, i: int, total: int, desc: Descriptor) -> PrivateOptions:
        """The layer's private options (fails as decrypting it would when no key unwraps them)."""
        private = self.private.get(i)
        if private is None:
            private = self.private[i] = self._decrypter().unwrap(i, total, desc)
        return private

    def _claim(self, desc: Descriptor) -> bytes | None:
        """What the store remembers a key proof by: this descriptor's wrapped keys and public
        options with the key files given (None: the keys are not all plain files)."""
        if self.key_files is None:
            return None
        from coco.ocicrypt.keyspec import ANN_PREFIX

        ann = {k: v for k, v in desc.annotations.items() if k.startswith(ANN_PREFIX)}
        doc = {"digest": desc.digest, "mediaType": desc.media_type, "annotations": ann}
        text = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return sha256_digest(text + b"\0" + self.key_files).encode()

    def reusable(self, i: int, total: int, desc: Descriptor, diff_id: str) -> bool:
        """Whether the store may give this layer (see LayerStore.reusable and .proven)."""
        if not self.store.has(diff_id):
            return False
        if not mt.is_encrypted(desc.media_type):
            return self.store.reusable(diff_id, self.limits, None)
        claim = self._claim(desc)
        if claim is not None and self.store.proven(diff_id, self.limits, claim):
            return True
        key = self._unwrap(i, total, desc).to_bytes()
        if not self.store.reusable(diff_id, self.limits, key):
            return False
        if claim is not None and self._same_key_files():
            self.store.remember_claim(diff_id, claim)
        return True

    def _same_key_files(self) -> bool:
        """Whether the key files still hold the bytes the claims were computed from (a file
        changed while the keys were loaded must not name what it did not unwrap)."""
        from coco.ocicrypt.keyspec import key_files_digest

        return key_files_digest(self.o.decryption_keys) == self.key_files

    def _open(self, desc: Descriptor, where: str) -> Iterator[bytes]:
        """The blob (digest checked at its end), in chunks small enough that the queues of every
        stage of every parallel layer stay within the memory goal."""
        client = getattr(self.source, "client", None)
        repo = getattr(self.source.ref, "repository", None)
        if client is not None and repo is not None:  # a registry: choose the chunk size
            return client.open_blob(repo, desc.digest, desc.size, where, chunk=_CHUNK)  # type: ignore[no-any-return]
        return self.source.open_blob(desc, where)

    def layer(self, i: int, total: int, desc: Descriptor, diff_id: str) -> LayerPull:
        where = f"{self.ref}: layer {i + 1}/{total} {desc.digest}"
        if self.cancel.is_set():
            raise Cancelled
        if self.reusable(i, total, desc, diff_id):
            return LayerPull(desc.digest, diff_id, "reused")
        base = desc.media_type.removesuffix(mt.ENCRYPTED_SUFFIX)
        if not mt.is_layer(desc.media_type) or base.startswith("application/vnd.oci.empty"):
            raise PullError(f"{where}: expected a layer media type, found {desc.media_type!r}")
        private = None
        if mt.is_encrypted(desc.media_type):
            private = self._unwrap(i, total, desc)  # before any download
        stored = self.store.has(diff_id)  # fetched again: not this pull's to take back
        task = None
        if self.progress is not None:
            task = self.progress.task(f"layer {i + 1}/{total} {desc.short}", desc.size)
        stop = threading.Event()  # this layer failed: stop its reader at once
        chunks: Iterator[bytes] = prefetch(
            self._open(desc, where), self.cancel, task, stop=stop, depth=_QUEUE_DEPTH
        )
        if private is not None:
            assert self.decrypter is not None
            chunks = _plaintext(desc, chunks, self.decrypter, private, i, total)
        raw = ChunkReader(chunks)
        from coco.image.unpack import unpack_layer

        try:
            with self.store.staging() as tmp:
                stream = decompressed(raw, mt.compression(desc.media_type))
                try:
                    stats = unpack_layer(stream, tmp / "fs", limits=self.o.limits, diff_id=diff_id)
                finally:
                    stream.close()
                extra = raw.leftover()
                if extra:
                    raise PullError(
                        f"{where}: expected the layer to end with its compressed stream, "
                        f"found {extra} trailing bytes"
                    )
                key = None if private is None else private.to_bytes()
                claim = None if private is None else self._claim(desc)
                if claim is not None and not self._same_key_files():
                    claim = None
                self.store.commit(diff_id, tmp, stats, key, claim)
                if not stored:
                    self.committed.append(diff_id)
        except Cancelled:
            raise
        except Exception as e:
            if self.cancel.is_set():
                raise Cancelled from None
            cause = _root_cause(raw)
            if cause is not None:
                raise cause from None
            if isinstance(e, CocoError):
                raise
            raise PullError(f"{where}: {_describe(e)}") from None  # gzip, zstd, tar internals
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                chunks.close()  # type: ignore[attr-defined]
        return LayerPull(desc.digest, diff_id, "pulled")

    def layers(self, m: Manifest, config: ImageConfig) -> list[LayerPull]:
        total = len(m.layers)
        firsts: dict[str, int] = {}  # a layer repeated is pulled (or proven) once
        for i, d in enumerate(config.diff_ids):
            firsts.setdefault(d, i)
        if all(self.reusable(i, total, m.layers[i], d) for d, i in firsts.items()):
            pairs = zip(m.layers, config.diff_ids, strict=True)
            return [LayerPull(x.digest, d, "reused") for x, d in pairs]
        from concurrent.futures import ThreadPoolExecutor

        results: dict[int, LayerPull] = {}
        errors: list[BaseException] = []
        lock = threading.Lock()

        def done(f: Future[LayerPull]) -> None:
            e = f.exception()
            if e is not None and not isinstance(e, Cancelled):
                with lock:
                    errors.append(e)
                self.cancel.set()

        with ThreadPoolExecutor(max_workers=self.o.jobs, thread_name_prefix="coco-pull") as pool:
            futures: dict[int, Future[LayerPull]] = {}
            for d, i in firsts.items():
                futures[i] = pool.submit(self.layer, i, total, m.layers[i], d)
                futures[i].add_done_callback(done)
            try:
                for i, f in futures.items():
                    with contextlib.suppress(Exception):  # recorded by done()
                        results[i] = f.result()
            except BaseException:  # interrupted: stop every layer, let them clean up
                self.cancel.set()
                raise
        if errors:
            raise errors[0]
        if self.cancel.is_set():
            raise PullError(f"{self.ref}: the pull was cancelled")
        out = []
        for i, (desc, d) in enumerate(zip(m.layers, config.diff_ids, strict=True)):
            first = results[firsts[d]]
            out.append(first if firsts[d] == i else LayerPull(desc.digest, d, "reused"))
        return out


def pull_image(
    ref: ImageReference | str,
    bundle_dir: str | os.PathLike[str],
    store: LayerStore | str | os.PathLike[str],
    options: PullOptions | None = None,
    *,
    progress: _Progress | None = None,
    cancel: threading.Event | None = None,
) -> PullResult:
    """Pull ``ref`` into ``store`` and assemble ``bundle_dir`` (which must not exist yet).

    Raises a :class:`~coco.errors.CocoError` on any failure, and a PullError when ``cancel`` is
    set before the bundle is made; nothing partial is left behind.
    """
    o = options or PullOptions()
    r = parse_reference(ref) if isinstance(ref, str) else ref
    name = str(r)
    target = Path(bundle_dir).absolute()
    if os.path.lexists(target):
        raise PullError(
            f"pull {name}: bundle {target}: expected a new directory, found one already there"
        )
    if not target.parent.is_dir():
        raise PullError(f"pull {name}: bundle {target}: expected an existing parent directory")
    source = open_source(r, o.access)
    try:
        m = platform_manifest(source, name, os=o.os, arch=o.arch, variant=o.variant)
        if o.policy is not None:
            o.policy.check(source, m.raw, m.digest)
        cwhat = f"{name}: config {m.config.digest}"
        from coco.image.store import LayerStore

        root = store.root if isinstance(store, LayerStore) else store
        cached = LayerStore.cached_config(root, m.config.digest)  # checked against the digest
        raw_cfg = cached if cached is not None else b"".join(source.open_blob(m.config, cwhat))
        config = ImageConfig.parse(raw_cfg, cwhat)
        if config.os != "linux":
            raise PullError(f"{cwhat}: expected os 'linux', found {config.os!r}")
        if len(config.diff_ids) != len(m.layers):
            raise PullError(
                f"{name}: expected as many rootfs.diff_ids in the config as layers in the "
                f"manifest ({len(m.layers)}), found {len(config.diff_ids)}"
            )
        if not m.layers:
            raise PullError(f"{name}: expected at least one layer, found none")
        from coco.image.bundle import create_bundle  # not loaded by copy's load_policy

        st = store if isinstance(store, LayerStore) else LayerStore(store)  # after the policy
        puller = _Puller(source, st, o, name, progress, cancel)
        try:
            with st.session():
                puller.prepare(m)
                layers = puller.layers(m, config)
                if puller.cancel.is_set():
                    raise PullError(f"{name}: the pull was cancelled")
                bundle = create_bundle(
                    st,
                    list(config.diff_ids),
                    target,
                    image_config=_config_obj(raw_cfg),
                    flatten=o.flatten,
                )
            if cached is None:
                st.keep_config(m.config.digest, raw_cfg)
        except BaseException:
            _rollback(st, puller.committed)
            raise
    finally:
        source.close()
    return PullResult(name, m.digest, sha256_digest(raw_cfg), bundle, tuple(layers))


def _rollback(store: LayerStore, diff_ids: list[str]) -> None:
    """A failed pull takes back the layers it committed, unless a bundle uses them meanwhile.

    Needs the store's exclusive lock (as ``prune``); when another pull holds the store the layers
    stay (they are complete and verified) and the next ``coco image prune`` removes them.
    """
    if not diff_ids:
        return
    try:
        # LayerStore has no public "remove these layers"; its lock file is the one prune takes.
        fd = os.open(store.root / "gc.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info(
                "store %s busy: leaving %d verified layer(s) for prune", store.root, len(diff_ids)
            )
            return
        used = {d for ids in store.bundles().values() for d in ids}
        for d in diff_ids:
            if d in used or not store.has(d):
                continue
            layer_dir = store.get(d).path.parent
            doomed = store.root / "tmp" / f"rollback-{layer_dir.name}"
            with contextlib.suppress(OSError):
                os.rename(layer_dir, doomed)
                import shutil  # only when something is removed

                shutil.rmtree(doomed, ignore_errors=True)
    except CocoError:
        pass
    finally:
        os.close(fd)


def _root_cause(raw: ChunkReader) -> CocoError | None:
    """After a decoding or unpacking error: read the rest of the blob, and if it fails its digest
    or HMAC, that is the error to report (the bytes were not the image's)."""
    if raw.eof:
        return None
    try:
        raw.leftover()
    except (DigestMismatchError, DecryptionError) as e:
        return e
    except Exception:  # the original error stands
        return None
    return None


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}" if not isinstance(e, OSError) else text


def _config_obj(raw: bytes) -> dict[str, Any]:
    obj = json.loads(raw)
    assert isinstance(obj, dict)  # ImageConfig.parse accepted it
    return obj


def load_policy(policy: Path, registries_d: Path | None = None) -> SignaturePolicy:
    """The signature policy of ``--policy`` / ``--registries.d`` (see coco.image.signature).

    A policy that accepts anything (``{"default": [{"type": "insecureAcceptAnything"}]}``, as
    distributions ship /etc/containers/policy.json) needs none of the signature machinery: it gets
    an :class:`_AcceptAnything` that does what evaluating it does, without loading that code.
    """
    if registries_d is None:
        from coco.jsonio import loads

        try:
            doc = loads(policy.read_bytes(), what=str(policy), error=PullError)
        except (OSError, PullError):
            doc = None  # the full loader reports it
        if doc == _ACCEPT_ANYTHING:
            return _AcceptAnything()
    from coco.image.signature import pull_policy

    return pull_policy(policy, registries_d)


_ACCEPT_ANYTHING = {"default": [{"type": "insecureAcceptAnything"}]}


class _AcceptAnything:
    """The verdict of a policy whose only requirement is ``default[0]`` insecureAcceptAnything:
    the manifest bytes must hash to their digest, then the image is accepted with the warning
    the evaluator gives."""

    def check(self, source: ImageSource, manifest_raw: bytes, manifest_digest: str) -> None:
        from coco.errors import PolicyRefusedError

        where = str(source.ref)
        if sha256_digest(manifest_raw) != manifest_digest:
            raise PolicyRefusedError(
                f"{where}: manifest bytes do not hash to {manifest_digest}; refusing to check "
                "signatures against them"
            )
        log.warning(
            "%s: policy default[0] (insecureAcceptAnything): accepting without any signature "
            "check (insecureAcceptAnything)",
            where,
        )
