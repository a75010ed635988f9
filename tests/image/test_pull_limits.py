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
