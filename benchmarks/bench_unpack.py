"""Benchmark: unpacking one layer with coco against ``umoci unpack`` on the same OCI image.

The layer is a tar of a real directory tree (the project's virtualenv ``lib`` by default, a few
thousand files, ~200 MB), stored uncompressed so that both sides do only tar reading and file
writing. Rounds alternate: ``umoci unpack --image LAYOUT:TAG BUNDLE``; coco ``add_layer`` (with the
diff_id checked) + ``create_bundle`` flattened; coco ``add_layer`` + overlay bundle. The script
checks the trees are equal, then prints median times and the ratios coco / umoci (below 1.0:
coco is faster).

    .venv/bin/python benchmarks/bench_unpack.py [--source DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.image._util import snapshot
from tests.imagekit import sha256, write_image

from coco.image import LayerStore, create_bundle, remove_bundle


def _layer(source: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(source, arcname="payload")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    default = Path(__file__).resolve().parents[1] / ".venv" / "lib"
    ap.add_argument("--source", type=Path, default=default)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-unpack-"))
    try:
        data = _layer(a.source)
        did = sha256(data)
        write_image(work / "layout", [data], tag="t", compression="none")
        (work / "layer.tar").write_bytes(data)
        print(f"layer: {len(data) / 1e6:.0f} MB tar of {a.source}")
        times: dict[str, list[float]] = {"umoci": [], "flatten": [], "overlay": []}
        for r in range(a.rounds):
            out = work / f"umoci{r}"
            t = time.perf_counter()
            subprocess.run(
                ["umoci", "unpack", "--image", f"{work / 'layout'}:t", str(out)],
                check=True,
                capture_output=True,
            )
            times["umoci"].append(time.perf_counter() - t)
            for mode in ("flatten", "overlay"):
                store = LayerStore(work / f"store-{mode}-{r}")
                t = time.perf_counter()
                with open(work / "layer.tar", "rb", buffering=0) as f:
                    store.add_layer(did, f)
                b = create_bundle(
                    store,
                    [did],
                    work / f"bundle-{mode}-{r}",
                    image_config={"Cmd": ["x"]},
                    flatten=mode == "flatten",
                )
                times[mode].append(time.perf_counter() - t)
                if r == 0:
                    assert snapshot(b.rootfs) == snapshot(out / "rootfs"), f"{mode} differs"
                remove_bundle(store, b.path)
                shutil.rmtree(store.root)
            shutil.rmtree(out)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            print(f"{k:8s} median {v:.2f} s  (runs: {', '.join(f'{x:.2f}' for x in times[k])})")
        print(f"ratio flatten/umoci {med['flatten'] / med['umoci']:.2f}")
        print(f"ratio overlay/umoci {med['overlay'] / med['umoci']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
