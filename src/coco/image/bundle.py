"""Bundles: a rootfs assembled from the layer store, and the OCI runtime ``config.json``.

``create_bundle`` mounts an overlay of the store's layer directories (top layer first) when the
kernel allows it, with the writable upper and work dirs inside the bundle; with ``flatten=True``
(or when the mount is refused) it copies the layers into ``rootfs/`` (:mod:`coco.image.flatten`).
``config.json`` comes from :mod:`coco.image.runtime_spec`.

In overlay mode the kernel shows the topmost copy of a directory; after mounting, an implicit
directory is given the metadata of the lower explicit one through the merged view (a metadata
copy-up), a directory that only ever held whiteouts is removed, and directories holding
whiteouts are copied up so that their listing never shows the whiteouts. Residual differences
of overlay mode, for layers no image builder writes: an implicit directory over a lower
non-directory hides it instead of following or keeping it. In both modes, the mtime of a
directory in which an implicit parent was created is not bumped to "now" as umoci leaves it.

Layer directories are read-only lowers of every overlay bundle: the store is shared on disk,
and a container's writes land in its bundle's ``overlay/upper``.

A failure removes the bundle directory (unmounting first) and its registration; nothing partial
is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

import coco.log
from coco.errors import BundleError
from coco.files import mark_hierarchy_top
from coco.image.flatten import DIR_FLAGS, flatten_layers, holds_only_whiteouts, open_under
from coco.image.layerdir import OPAQUE_XATTR
from coco.image.runtime_spec import runtime_config
from coco.image.store import LayerInfo, LayerStore
from coco.record import record

TYPE_CHECKING = False  # typing stays unloaded in short processes
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "Bundle",
    "create_bundle",
    "remove_bundle",
    "runtime_config",
]  # runtime_config: re-exported

log = coco.log.get(__name__)  # logging loads only if a record needs it


@record
class Bundle:
    """An assembled bundle: ``path/config.json`` and ``path/rootfs``."""

    path: Path
    mode: str  # "overlay" or "flatten"
    diff_ids: tuple[str, ...]

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"


# -- mounting ----------------------------------------------------------------------------------
_libc = ctypes.CDLL(
    None, use_errno=True
)  # libc, already loaded: no find_library (it runs ldconfig)


def _mount_overlay(lowers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    for p in [*lowers, upper, work]:
        if any(c in str(p) for c in ",:\\"):
            raise OSError(errno.EINVAL, f"overlay cannot name the path {p}")
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    if len(opts) >= 4000:
        raise OSError(errno.E2BIG, "too many layers for one overlay option string")
    rc = _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, opts.encode())
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _umount(target: Path) -> None:
    if _libc.umount2(os.fsencode(target), 2) != 0:  # MNT_DETACH
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOENT):
            raise OSError(e, f"umount {target}: {os.strerror(e)}")


def _is_mount(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.path.ismount(path)
    return False


# -- bundles -----------------------------------------------------------------------------------
def create_bundle(
    store: LayerStore,
    diff_ids: Sequence[str],
    bundle_dir: str | os.PathLike[str],
    *,
    image_config: Mapping[str, Any] | None = None,
    flatten: bool = False,
    args: Sequence[str] | None = None,
) -> Bundle:
    """Assemble ``bundle_dir`` (which must not exist) from layers already in ``store``."""
    path = Path(bundle_dir).absolute()
    where = f"bundle {path}"
    if not diff_ids:
        raise BundleError(f"{where}: expected at least one layer, found none")
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        raise BundleError(f"{where}: expected a new directory, found one already there") from None
    except OSError as e:
        raise BundleError(f"{where}: cannot create: {e.strerror}") from None
    mode = "flatten"
    try:
        with store.session():
            layers = [store.get(d) for d in diff_ids]
            store.register_bundle(path, diff_ids)
            rootfs = path / "rootfs"
            mark_hierarchy_top(path)  # a flattened rootfs in a block group of its own
            rootfs.mkdir(mode=0o755)
            os.chmod(rootfs, 0o755)
            if not flatten:
                upper, work = path / "overlay" / "upper", path / "overlay" / "work"
                upper.mkdir(parents=True)
                work.mkdir()
                _root_meta(layers, upper)
                try:
                    # an empty bottom layer: overlay trusts the bottom-most lower to hold no
                    # whiteouts and would list them; no store layer is ever bottom-most
                    _mount_overlay(_visible_lowers(layers), upper, work, rootfs)
                    mode = "overlay"
                except OSError as e:
                    log.info("%s: overlay mount refused (%s); flattening instead", where, e)
                    import shutil  # only when something is removed

                    shutil.rmtree(path / "overlay")
            if mode == "flatten":
                flatten_layers(layers, rootfs)
            else:
                _fix_implicit_dirs(layers, rootfs)
                _merge_whiteout_dirs(layers, rootfs)
            config = runtime_config(image_config or {}, rootfs=rootfs, args=args)
            (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    except BaseException as e:
        _teardown(store, path)
        if isinstance(e, OSError):
            raise BundleError(f"{where}: {e.strerror or e}") from None
        if isinstance(e, RecursionError):
            raise BundleError(f"{where}: expected a shallower tree, found it too deep") from None
        raise
    return Bundle(path, mode, tuple(diff_ids))


def _visible_lowers(layers: Sequence[LayerInfo]) -> list[Path]:
    """Overlay lowerdirs, top first; overlay ignores an opaque layer root, so the layers
    below one (``.wh..wh..opq`` at the top level) are left out instead."""
    out: list[Path] = []
    for layer in reversed(layers):
        out.append(layer.path)
        with contextlib.suppress(OSError):
            if os.getxattr(layer.path, OPAQUE_XATTR) == b"y":
                break
    return out


def _lstat_under(root: Path, rel: str) -> os.stat_result | None:
    """lstat of ``rel`` inside a layer directory, parents walked without following."""
    parent, _, name = rel.rpartition("/")
    try:
        fd = _open_under_path(root, parent)
    except OSError:
        return None
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(fd)


def _open_under_path(root: Path, rel: str) -> int:
    rfd = os.open(root, DIR_FLAGS)
    try:
        return open_under(rfd, rel)
    finally:
        os.close(rfd)


def _fix_implicit_dirs(layers: Sequence[LayerInfo], rootfs: Path) -> None:
    """Make the overlay view of implicit directories what a sequential untar gives.

    overlay shows the topmost layer's copy of a directory; when that copy is implicit (no tar
    entry), umoci shows the lower explicit directory's owner, mode and mtime instead, and shows
    nothing at all for a directory that only ever held whiteouts. Both are fixed through the
    merged view (a metadata copy-up, or an rmdir that the kernel records as a whiteout). Only
    the layers the merged directory is made of count: a later layer that deletes the directory,
    or replaces it or a parent with a file or a symlink, or makes a parent opaque, hides them.
    """
    paths = sorted({p for ly in layers for p in ly.implicit_dirs if p}, key=lambda p: -len(p))
    stacks: dict[str, list[tuple[LayerInfo, os.stat_result, bool]]] = {}
    for p in paths:
        found = [(ly, st) for ly, st, _ in _merged_dir(layers, p, stacks)]
        if not found or p not in found[0][0].implicit_dirs:
            continue
        source: os.stat_result | None = None
        for layer, st in found:
            if p not in layer.implicit_dirs:
                source = st
                break
            if p in layer.fresh_dirs:  # this layer whited out what was below
                break
        parent, _, name = p.rpartition("/")
        try:
            if source is None:
                if all(p in ly.implicit_dirs and _only_whiteouts_at(ly, p) for ly, _ in found):
                    pfd = _open_under_path(rootfs, parent)
                    try:
                        with contextlib.suppress(OSError):
                            os.rmdir(name, dir_fd=pfd)
                    finally:
                        os.close(pfd)
                continue
            fd = _open_under_path(rootfs, p)
        except OSError as e:  # not a directory of the merged view after all: nothing to fix
            log.debug("overlay: implicit directory %r not reachable: %s", p, e)
            continue
        try:
            os.fchown(fd, source.st_uid, source.st_gid)
            os.fchmod(fd, stat.S_IMODE(source.st_mode))
            os.utime(fd, ns=(source.st_atime_ns, source.st_mtime_ns))
        finally:
            os.close(fd)


def _merged_dir(
    layers: Sequence[LayerInfo],
    rel: str,
    memo: dict[str, list[tuple[LayerInfo, os.stat_result, bool]]],
) -> list[tuple[LayerInfo, os.stat_result, bool]]:
    """The layers (top first) whose directory ``rel`` the overlay merges, with its lstat and
    whether it is opaque; empty when ``rel`` is no directory of the merged view. Lookups walk
    down from the root as overlay does: a non-directory (a whiteout included) ends the stack,
    and only an opaque parent stops the layers below it (an opaque ``rel`` keeps them: they
    still say what the directory itself was)."""
    if rel in memo:
        return memo[rel]
    if rel:
        parent = rel.rpartition("/")[0]
        above = _merged_dir(layers, parent, memo)
        lower: list[LayerInfo] = []
        for ly, _, opaque in above:
            lower.append(ly)
            if opaque:
                break
    else:
        lower = list(reversed(layers))
    out: list[tuple[LayerInfo, os.stat_result, bool]] = []
    for layer in lower:
        st, opaque = _dir_under(layer.path, rel)
        if st is None:
            continue
        if not stat.S_ISDIR(st.st_mode):
            break
        out.append((layer, st, opaque))
        if not rel and opaque:  # overlay ignores an opaque root: see _visible_lowers
            break
    memo[rel] = out if out and stat.S_ISDIR(out[0][1].st_mode) else []
    return memo[rel]


def _dir_under(root: Path, rel: str) -> tuple[os.stat_result | None, bool]:
    """lstat of ``rel`` inside a layer directory (parents walked without following), and
    whether it is an opaque directory."""
    st = _lstat_under(root, rel) if rel else os.lstat(root)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return st, False
    try:
        fd = _open_under_path(root, rel)
    except OSError:
        return st, False
    try:
        return st, os.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return st, False
    finally:
        os.close(fd)


def _merge_whiteout_dirs(layers: Sequence[LayerInfo], rootfs: Path) -> None:
    """overlay reads a directory that only one layer has straight from that layer, whiteouts
    included (it trusts them to be absent); a metadata copy-up makes such a directory a merged
    one, whose listing hides them. Real images whiteout inside directories lower layers have,
    so this touches nothing there."""
    for p in sorted({d for ly in layers for d in ly.whiteout_dirs if d}):
        try:
            fd = _open_under_path(rootfs, p)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)


def _only_whiteouts_at(layer: LayerInfo, rel: str) -> bool:
    try:
        fd = _open_under_path(layer.path, rel)
    except OSError:
        return False
    try:
        return holds_only_whiteouts(fd, rel, layer.implicit_dirs)
    finally:
        os.close(fd)


def _root_meta(layers: Sequence[LayerInfo], upper: Path) -> None:
    """The overlay root shows the upper dir: give it the last explicit root entry's metadata."""
    os.chmod(upper, 0o755)
    for layer in reversed(layers):
        if "" not in layer.implicit_dirs:
            st = os.stat(layer.path)
            os.chown(upper, st.st_uid, st.st_gid)
            os.chmod(upper, stat.S_IMODE(st.st_mode))
            os.utime(upper, ns=(st.st_mtime_ns, st.st_mtime_ns))
            return


def _teardown(store: LayerStore, path: Path) -> None:
    rootfs = path / "rootfs"
    if _is_mount(rootfs):
        _umount(rootfs)
    import shutil  # only when something is removed

    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(Exception):
        store.unregister_bundle(path)


def remove_bundle(store: LayerStore, bundle_dir: str | os.PathLike[str]) -> None:
    """Unmount and delete a bundle and forget it in the store (its layers become prunable)."""
    path = Path(bundle_dir).absolute()
    try:
        if _is_mount(path / "rootfs"):
            _umount(path / "rootfs")
    except OSError as e:
        raise BundleError(f"bundle {path}: {e}") from None
    import shutil  # only when something is removed

    shutil.rmtree(path, ignore_errors=True)
    store.unregister_bundle(path)
