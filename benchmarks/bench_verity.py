"""Benchmark: ``coco verity format`` against ``veritysetup format`` on the same file.

Both run on one random file (1 GiB by default), alternating, several rounds; the script checks
that both wrote the same tree and root, then prints the median times and the ratio coco /
veritysetup (below 1.0: coco is faster). Two figures for coco: the ``coco`` command as a user
runs it (a fresh process, CLI start-up included) and the library call in this process.

    .venv/bin/python benchmarks/bench_verity.py [--size-mib 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coco.integrity import verity

SALT = "00" * 32


def _make_data(path: Path, size: int) -> None:
    chunk = 64 * 1024 * 1024
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def _timed(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{cmd[0]} failed: {r.stderr.strip()}")
    root = next(line for line in r.stdout.splitlines() if line.startswith("Root hash:"))
    return elapsed, root.split("\t")[-1].strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to put the data file (default: a temp dir)")
    args = ap.parse_args()
    exe = shutil.which("veritysetup")
    if exe is None:
        sys.exit("veritysetup (cryptsetup-bin) is needed")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        data = Path(tmp) / "data.bin"
        size = args.size_mib * 1024 * 1024
        _make_data(data, size)
        ref, mine, lib = (Path(tmp) / n for n in ("ref.hash", "coco.hash", "lib.hash"))
        common = ["--no-superblock", f"--salt={SALT}"]
        peer_cmd = [exe, "format", *common, str(data), str(ref)]
        coco_cmd = [
            sys.executable,
            "-m",
            "coco.cli.main",
            "verity",
            "format",
            *common,
            str(data),
            str(mine),
        ]
        params = verity.VerityParams(salt=bytes(32), superblock=False)
        t_peer, t_cli, t_lib = [], [], []
        # warm the page cache once so neither side pays for the first read, and let coco build
        # its native block loop (once per machine, cached) before it is timed
        _timed(peer_cmd)
        _timed(coco_cmd)
        for i in range(args.rounds):
            order = [("peer", peer_cmd), ("cli", coco_cmd)]
            if i % 2:
                order.reverse()
            roots = {}
            for name, cmd in order:
                elapsed, roots[name] = _timed(cmd)
                (t_peer if name == "peer" else t_cli).append(elapsed)
            t = time.perf_counter()
            tree = verity.format_file(data, lib, params)
            t_lib.append(time.perf_counter() - t)
            if not (roots["peer"] == roots["cli"] == tree.root_hash.hex()):
                sys.exit(f"root hashes differ: {roots} lib={tree.root_hash.hex()}")
            if ref.read_bytes() != mine.read_bytes() or ref.read_bytes() != lib.read_bytes():
                sys.exit("hash trees differ")
    peer, cli, libt = (statistics.median(x) for x in (t_peer, t_cli, t_lib))
    cores = len(os.sched_getaffinity(0))
    print(f"data: {args.size_mib} MiB, {args.rounds} rounds, {cores} cores, sha256 4096/4096")
    print(
        f"veritysetup format      median {peer:6.3f} s  {size / peer / 1e6:7.0f} MB/s  "
        f"runs {', '.join(f'{x:.3f}' for x in t_peer)}"
    )
    print(
        f"coco verity format      median {cli:6.3f} s  {size / cli / 1e6:7.0f} MB/s  "
        f"runs {', '.join(f'{x:.3f}' for x in t_cli)}"
    )
    print(
        f"coco (library call)     median {libt:6.3f} s  {size / libt / 1e6:7.0f} MB/s  "
        f"runs {', '.join(f'{x:.3f}' for x in t_lib)}"
    )
    print(f"ratio coco CLI / veritysetup:     {cli / peer:.2f}")
    print(f"ratio coco library / veritysetup: {libt / peer:.2f}")


if __name__ == "__main__":
    main()
