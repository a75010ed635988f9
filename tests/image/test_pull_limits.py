"""``coco image pull --max-layer-size / --max-files``: a layer past either limit is refused with
one line naming the flag, and the pull leaves no bundle and nothing in the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from coco.image import LayerStore
from tests.conftest import Registry

from ._util import F, tar
from .test_pull import _cli, leftovers, push


@pytest.fixture
def ref(tmp_path: Path, open_registry: Registry) -> str:
    files = [F(f"d/f{i:02d}", bytes([65 + i]) * 3000) for i in range(20)]  # 20 files, 60 kB
    return push(tmp_path, open_registry, [tar(files)])[0]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--max-files", "10"], "--max-files"),
        (["--max-layer-size", "16K"], "--max-layer-size"),
        (["--max-layer-size", "20000"], "--max-layer-size"),
    ],
)
@pytest.mark.parametrize("flatten", [False, True])
def test_limit_refuses_and_leaves_nothing(
    tmp_path: Path,
    store: LayerStore,
    ref: str,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    needle: str,
    flatten: bool,
) -> None:
    args = ["image", "pull", "-q", "--tls-verify=false", "--store", str(store.root), *flags]
    if flatten:
        args.append("--flatten")
    capsys.readouterr()
    assert _cli([*args, ref, str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "b").exists()
    assert leftovers(store) == ([], [])


def test_limits_that_fit_pass(
    tmp_path: Path, store: LayerStore, ref: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["image", "pull", "-q", "--tls-verify=false", "--store", str(store.root)]
    assert (
        _cli([*args, "--max-files", "30", "--max-layer-size", "1M", ref, str(tmp_path / "b")]) == 0
    )
    assert (tmp_path / "b/rootfs/d/f19").read_bytes() == b"T" * 3000
    assert len(store.layers()) == 1


@pytest.mark.parametrize(
    "flags", [["--max-files", "0"], ["--max-layer-size", "0"], ["--max-layer-size", "lots"]]
)
def test_bad_limit_values_are_usage_errors(
    tmp_path: Path, store: LayerStore, ref: str, flags: list[str]
) -> None:
    args = ["image", "pull", "-q", "--tls-verify=false", "--store", str(store.root), *flags]
    assert _cli([*args, ref, str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--max-files", "5"], "--max-files"), (["--max-layer-size", "100K"], "--max-layer-size")],
)
@pytest.mark.parametrize("flatten", [False, True])
def test_limits_apply_to_stored_layers(
    tmp_path: Path,
    store: LayerStore,
    open_registry: Registry,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    needle: str,
    flatten: bool,
) -> None:
    """A layer in the store from a pull without limits is held to the next pull's limits: the
    pull fails with the line a fresh store gives, and the stored layer stays for others."""
    files = [F(f"d/f{i:03d}", b"x" * 100) for i in range(302)]  # 302 entries, ~310 kB of tar
    ref = push(tmp_path, open_registry, [tar(files)])[0]
    args = ["image", "pull", "--tls-verify=false", *(["--flatten"] if flatten else [])]
    assert _cli([*args, "--store", str(store.root), ref, str(tmp_path / "b1")]) == 0
    (held,) = store.layers()
    assert (store.get(held).entries, store.get(held).file_bytes) == (302, 30200)
    capsys.readouterr()
    assert _cli([*args, "--store", str(tmp_path / "fresh"), *flags, ref, str(tmp_path / "f")]) == 1
    fresh = capsys.readouterr().err
    assert _cli([*args, "--store", str(store.root), *flags, ref, str(tmp_path / "b2")]) == 1
    err = capsys.readouterr().err
    assert err == fresh and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "b2").exists()
    assert leftovers(store) == ([held], [])
    # limits it fits in: reused
    fits = ["--max-files", "302", "--max-layer-size", "1M"]
    assert _cli([*args, "--store", str(store.root), *fits, ref, str(tmp_path / "b3")]) == 0
    assert "0 pulled, 1 reused" in capsys.readouterr().err


def test_stored_sparse_layer_counts_its_file_sizes(
    tmp_path: Path, store: LayerStore, open_registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-layer-size bounds the declared file sizes too (a sparse hole), also when stored."""
    from .test_hostile import _gnu_sparse

    ref = push(tmp_path, open_registry, [_gnu_sparse("hole", b"s" * 512, 4 << 20)])[0]
    args = ["image", "pull", "--tls-verify=false", "--flatten", "--store", str(store.root)]
    assert _cli([*args, ref, str(tmp_path / "b1")]) == 0
    (held,) = store.layers()
    info = store.get(held)
    assert info.size < 1 << 20 and info.file_bytes == 4 << 20
    capsys.readouterr()
    assert _cli([*args, "--max-layer-size", "1M", ref, str(tmp_path / "b2")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-layer-size" in err, err
    assert not (tmp_path / "b2").exists()
