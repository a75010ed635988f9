"""Differential fuzzing against umoci: random benign multi-layer images, flattened by us and
unpacked by umoci, must give the same tree (paths, types, modes, owners, symlink targets,
hardlink groups, contents). Examples umoci itself refuses are skipped."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from coco.image import LayerStore, create_bundle
from tests.imagekit import write_image

from ._util import D, F, H, L, T, diff_id, snapshot, tar

_PATHS = ["a", "b", "a/x", "a/y", "b/x", "a/x/z", "c"]


@st.composite
def layer(draw: st.DrawFn) -> list:
    out = []
    files: list[str] = []
    for _ in range(draw(st.integers(1, 8))):
        p = draw(st.sampled_from(_PATHS))
        kind = draw(st.sampled_from(["file", "dir", "link", "hard", "wh", "opq"]))
        parent = p.rpartition("/")[0]
        if parent and draw(st.booleans()):
            out.append(D(parent + "/", mode=draw(st.sampled_from([0o755, 0o700]))))
        if kind == "file":
            out.append(
                F(
                    p,
                    draw(st.binary(max_size=20)),
                    mode=draw(st.sampled_from([0o644, 0o4755])),
                    uid=draw(st.sampled_from([0, 7])),
                )
            )
            files.append(p)
        elif kind == "dir":
            out.append(
                D(
                    p + "/",
                    mode=draw(st.sampled_from([0o755, 0o711])),
                    gid=draw(st.sampled_from([0, 9])),
                )
            )
        elif kind == "link":
            out.append(L(p, draw(st.sampled_from(["a", "../b", "/a/x", "nowhere"]))))
        elif kind == "hard" and files:
            out.append(H(p, draw(st.sampled_from(files))))
        elif kind == "wh":
            name = p.rpartition("/")[2]
            out.append(T(f"{parent}/.wh.{name}" if parent else f".wh.{name}"))
        elif kind == "opq":
            out.append(T(f"{parent}/.wh..wh..opq" if parent else "a/.wh..wh..opq"))

    # whiteouts first, as image builders write them: a whiteout of a path the same layer
    # creates is outside what the image spec defines (umoci keeps some lower metadata there)
    # and parents before children, as tar writers walk a tree (umoci resolves an entry's parent
    # when it meets it, a layer directory only holds the layer's final state)
    def order(e: tuple) -> tuple[bool, int]:
        name = e[0].name.rstrip("/")
        return (not name.rpartition("/")[2].startswith(".wh."), name.count("/"))

    return sorted(out, key=order)


@pytest.fixture(scope="module")
def umoci_bin() -> str:
    path = shutil.which("umoci")
    if path is None:
        pytest.skip("umoci is not installed")
    return path


@settings(
    max_examples=int(os.environ.get("COCO_DIFF_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(layers=st.lists(layer(), min_size=1, max_size=3))
def test_flatten_equals_umoci(umoci_bin: str, layers: list) -> None:
    tars = [tar(entries) for entries in layers]
    root = Path(tempfile.mkdtemp(prefix="coco-diff-"))
    try:
        write_image(root / "layout", tars, tag="t", compression="none")
        proc = subprocess.run(
            [umoci_bin, "unpack", "--image", f"{root / 'layout'}:t", str(root / "umoci")],
            capture_output=True,
            check=False,
        )
        if proc.returncode != 0:
            event("umoci refused")
        assume(proc.returncode == 0)
        store = LayerStore(root / "store")
        from coco.errors import UnpackError

        try:
            ids = [store.add_layer(diff_id(t), io.BytesIO(t)).diff_id for t in tars]
        except UnpackError as e:
            event("we refused: " + str(e).rpartition("': ")[2][:40])
            assume(False)  # we refuse some things umoci accepts (parent symlinks in one layer)
            return
        b = create_bundle(store, ids, root / "bundle", image_config={"Cmd": ["x"]}, flatten=True)
        event("compared")
        assert snapshot(b.rootfs) == snapshot(root / "umoci" / "rootfs")
    finally:
        shutil.rmtree(root)
