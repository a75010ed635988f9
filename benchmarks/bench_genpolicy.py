"""Benchmark: ``coco policy generate`` on a 5-layer, ~300 MB image in a loopback registry.

Runs, in one go and against the same docker-registry: a cold generate (empty layers cache: every
layer is downloaded, inflated, indexed and verity-hashed), a warm generate (cache filled: no
download), and the time to merely download the same layers, measured with ``skopeo copy`` to an
``oci:`` directory (a real peer: no decompression, no hashing beyond the blob digests). Prints
the best of ``--rounds`` for each and the ratios. Usage:

    .venv/bin/python benchmarks/bench_genpolicy.py [--size-mb 300] [--layers 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import start_registry

COCO = [sys.executable, "-m", "coco.cli.main"]


def layer_tar(size: int, seed: int) -> bytes:
    """A tar of 4 MiB files, half random and half text, so gzip has something to do."""
    import io
    import random
    import tarfile

    rnd = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(max(1, size >> 22)):
            half = rnd.randbytes(2 << 20)
            text = (f"line {seed} {i} " * 200000).encode()[: 2 << 20]
            data = half + text
            ti = tarfile.TarInfo(f"data/l{seed}/f{i:03d}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def make_images(tmp: Path, size_mb: int, layers: int) -> tuple[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import sys; sys.path.insert(0, {root!r})\n"
        "from benchmarks.bench_genpolicy import layer_tar\n"
        "from tests.imagekit import write_image, tar_layer\n"
        f"ls = [layer_tar(({size_mb} << 20) // {layers}, s) for s in range({layers})]\n"
        f"print(write_image({str(tmp / 'big')!r}, ls, tag='v1').ref)\n"
        f"print(write_image({str(tmp / 'pause')!r}, [tar_layer({{'pause': b'x'}})], tag='v1',"
        " config_extra={'config': {'Entrypoint': ['/pause']}}).ref)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    return out[0], out[1]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} failed: {p.stderr}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=300)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="coco-bench-genpolicy-"))
    try:
        big, pause = make_images(tmp, args.size_mb, args.layers)
        with start_registry(tmp / "reg") as reg:
            for src, repo in ((big, "bench/big"), (pause, "bench/pause")):
                timed([*COCO, "image", "copy", "--dest-tls-verify=false", src, reg.url(repo, "v1")])
            blobs = sum(f.stat().st_size for f in (tmp / "big" / "blobs" / "sha256").iterdir())
            settings = tmp / "settings.json"
            settings.write_text(
                json.dumps(
                    {"cluster_config": {"pause_container_image": f"{reg.host}/bench/pause:v1"}}
                )
            )
            pod = tmp / "pod.yaml"
            pod.write_text(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: big}\nspec:\n  containers:\n"
                f"  - name: big\n    image: {reg.host}/bench/big:v1\n"
            )
            gen = [*COCO, "policy", "generate", str(pod), "-o", str(tmp / "out.yaml"),
                   "--settings", str(settings), "--src-tls-verify=false"]  # fmt: skip
            best = {"download (skopeo)": 1e9, "cold": 1e9, "warm": 1e9}
            for r in range(args.rounds):
                dst = tmp / f"dl{r}"
                best["download (skopeo)"] = min(
                    best["download (skopeo)"],
                    timed(
                        [
                            "skopeo",
                            "copy",
                            "-q",
                            "--src-tls-verify=false",
                            reg.url("bench/big", "v1"),
                            f"oci:{dst}:v1",
                        ]
                    ),
                )
                shutil.rmtree(dst)
                cache = tmp / f"cache{r}.json"
                best["cold"] = min(best["cold"], timed([*gen, "--layers-cache", str(cache)]))
                best["warm"] = min(best["warm"], timed([*gen, "--layers-cache", str(cache)]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"image: {args.layers} layers, {blobs / 1e6:.0f} MB of blobs (gzip), "
          f"{args.size_mb} MB of tar; best of {args.rounds}")  # fmt: skip
    base = best["download (skopeo)"]
    for k, v in best.items():
        print(f"  {k:20s} {v:7.2f} s   {v / base:5.2f}x download")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
