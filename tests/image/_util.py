"""Helpers for the image tests: raw tar entries, tree snapshots, umoci as the reference."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.imagekit import write_image

MTIME = 1_700_000_000

Entry = tuple[tarfile.TarInfo, bytes | None]


def T(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    *,
    mode: int | None = None,
    link: str = "",
    uid: int = 0,
    gid: int = 0,
    data: bytes | None = None,
    dev: tuple[int, int] = (0, 0),
    xattrs: dict[str, str] | None = None,
) -> Entry:
    """One tar entry: a TarInfo (raw: no name cleaning) and its data for regular files."""
    ti = tarfile.TarInfo(name)
    ti.type = kind
    if mode is None:
        mode = {tarfile.DIRTYPE: 0o755, tarfile.SYMTYPE: 0o777}.get(kind, 0o644)
    ti.mode, ti.linkname, ti.uid, ti.gid, ti.mtime = mode, link, uid, gid, MTIME
    ti.devmajor, ti.devminor = dev
    if xattrs:
        ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) and data is None:
        data = b""
    return ti, data


def D(name: str, **kw: object) -> Entry:
    return T(name, tarfile.DIRTYPE, **kw)  # type: ignore[arg-type]


def L(name: str, target: str, **kw: object) -> Entry:
    return T(name, tarfile.SYMTYPE, link=target, **kw)  # type: ignore[arg-type]


def H(name: str, target: str, **kw: object) -> Entry:
    return T(name, tarfile.LNKTYPE, link=target, **kw)  # type: ignore[arg-type]


def F(name: str, data: bytes = b"", **kw: object) -> Entry:
    return T(name, tarfile.REGTYPE, data=data, **kw)  # type: ignore[arg-type]


def tar(entries: Iterable[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in entries:
            if data is not None:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                ti.size = 0
                tf.addfile(ti)
    return buf.getvalue()


def diff_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def snapshot(
    root: Path, *, hide_whiteouts: bool = False, dir_times: bool = False
) -> dict[str, object]:
    """Everything the comparison checks, path by path, plus hardlink groups (by inode)."""
    out: dict[str, object] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if hide_whiteouts and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                continue
            rec: tuple[object, ...] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid)
            if dir_times and stat.S_ISDIR(st.st_mode):
                rec += (int(st.st_mtime),)
            if stat.S_ISLNK(st.st_mode):
                rec += (os.readlink(p),)
            elif stat.S_ISREG(st.st_mode):
                rec += (hashlib.sha256(p.read_bytes()).hexdigest(), int(st.st_mtime))
                inodes.setdefault(st.st_ino, []).append(rel)
            elif not stat.S_ISDIR(st.st_mode):
                rec += (st.st_rdev,)
            out[rel] = rec
    st = root.stat()
    out["."] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid)
    out["#links"] = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
    return out


def umoci_unpack(tmp: Path, layers: Sequence[bytes]) -> Path:
    """Write ``layers`` as an OCI layout and unpack it with umoci; returns umoci's rootfs."""
    write_image(tmp / "layout", list(layers), tag="t", compression="gzip")
    proc = subprocess.run(
        ["umoci", "unpack", "--image", f"{tmp / 'layout'}:t", str(tmp / "umoci")],
        check=False,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise AssertionError(f"umoci unpack failed: {proc.stderr.strip()}")
    return tmp / "umoci" / "rootfs"


def tree_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def make_request(ref: str, bundle: str | Path, store: str | Path, **kw: object) -> dict:
    """The wire request ``coco image pull --service`` sends for these flags."""
    from coco.image.request import PullRequest

    return PullRequest(ref=ref, bundle=bundle, store=store, **kw).for_service()
