"""The native verity block loop (coco.integrity._native) gives the same bytes as the Python loop,
for every hash, format and salt, through build_tree (threads reading ranges) as through the
buffer call; without a compiler the Python loop does the work."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from coco.integrity import _native, verity

ALGS = verity.HASH_ALGORITHMS


@pytest.fixture(scope="module")
def fn():
    f = _native.native()
    if f is None:
        pytest.fail("the native block loop could not be built (is a C compiler installed?)")
    return f


@pytest.mark.parametrize("name", ALGS)
@pytest.mark.parametrize("htype", [0, 1])
@pytest.mark.parametrize("salt", [b"", b"s", bytes(range(32)), bytes(256)])
def test_native_equals_python(fn, name: str, htype: int, salt: bytes) -> None:
    rnd = random.Random(f"{name}{htype}{len(salt)}")
    for bs in (512, 4096):
        buf = rnd.randbytes(bs * 9)
        want = verity._digest_python(buf, bs, bs, 7, salt, htype, name)
        addr, holder = _native.address(buf)
        got = verity._digest_native(fn, addr + bs, bs, 7, salt, htype, name)
        del holder
        assert got == want
        assert verity._digest_buffer(buf, bs, bs, 7, salt, htype, name) == want


def _trees(data: Path, params: verity.VerityParams, monkeypatch: pytest.MonkeyPatch):
    native = verity.build_tree(data, params, workers=2)
    monkeypatch.setattr(_native, "_loaded", [None])  # as without a compiler
    python = verity.build_tree(data, params, workers=2)
    return native, python


@pytest.mark.parametrize("htype", [0, 1])
def test_build_tree_same_bytes(
    tmp_path: Path, fn, monkeypatch: pytest.MonkeyPatch, htype: int
) -> None:
    data = tmp_path / "data"
    data.write_bytes(os.urandom(verity.PARALLEL_THRESHOLD + 3 * 4096))  # the threaded path
    params = verity.VerityParams(salt=b"\x01\x02", hash_type=htype, superblock=False)
    native, python = _trees(data, params, monkeypatch)
    assert native.root_hash == python.root_hash
    assert native.tree == python.tree


def test_no_compiler_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(_native, "_loaded", [])
    assert _native.native() is None
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-built left behind
    data = tmp_path / "data"
    data.write_bytes(bytes(range(256)) * 64)
    tree = verity.build_tree(data, verity.VerityParams(salt=b"", superblock=False))
    assert len(tree.root_hash) == 32


@pytest.mark.parametrize("bs", [512, 4096])
def test_reads_across_buffer_and_thread_boundaries(
    tmp_path: Path, fn, monkeypatch: pytest.MonkeyPatch, bs: int
) -> None:
    """Each thread reads its range into a small buffer (here 3 blocks and a bit): the digests
    land in the right places whatever the cuts."""
    data = tmp_path / "data"
    data.write_bytes(os.urandom(bs * 1000 + bs))
    monkeypatch.setattr(verity, "_READ", 3 * bs + 100)
    monkeypatch.setattr(verity, "PARALLEL_THRESHOLD", 0)
    params = verity.VerityParams(
        salt=b"salt", data_block_size=bs, hash_block_size=bs, superblock=False
    )
    native = verity.build_tree(data, params, workers=3)
    monkeypatch.setattr(_native, "_loaded", [None])
    assert native.tree == verity.build_tree(data, params, workers=3).tree


def test_a_file_shorter_than_its_blocks_is_an_error(tmp_path: Path, fn) -> None:
    data = tmp_path / "data"
    data.write_bytes(bytes(4096 * 5))
    params = verity.VerityParams(salt=b"", superblock=False)
    with pytest.raises(
        verity.VerityError, match=r"expected 32768 bytes of data, found it ends at 20480"
    ):
        verity._digest_file_native(fn, str(data), 4096, 8, params, 2)
