"""Benchmark: ``coco image copy`` against ``skopeo copy`` on one large layer, same run.

Copies oci->oci, oci->registry and registry->oci (a docker-registry on loopback) with both tools
and prints wall time, peak RSS and the ratio coco/skopeo. Usage:

    .venv/bin/python benchmarks/bench_copy.py [--size-mb 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
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


def big_tar(size: int) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        chunk = os.urandom(1 << 20)
        for i in range(max(1, size >> 24)):  # 16 MiB files
            data = chunk * 16
            ti = tarfile.TarInfo(f"data/f{i:03d}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (MB) of a child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert p.stderr is not None
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed: {err.decode()}")
    return dt, usage.ru_maxrss // 1024


def make_image(path: Path, size_mb: int) -> str:
    """Build the test image in a child process, so this process stays small: children inherit
    the parent's RSS at fork and ru_maxrss would count it."""
    root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import sys; sys.path.insert(0, {root!r})\n"
        "from benchmarks.bench_copy import big_tar\n"
        "from tests.imagekit import write_image\n"
        f"print(write_image({str(path)!r}, [big_tar({size_mb} << 20)], tag='v1',"
        " compression='none').ref)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="coco-bench-"))
    best: dict[tuple[str, str], tuple[float, int]] = {}

    def record(case: str, tool: str, cmd: list[str]) -> None:
        dt, rss = run(cmd)
        old = best.get((case, tool), (float("inf"), 0))
        best[(case, tool)] = (min(old[0], dt), max(old[1], rss))

    try:
        ref = make_image(tmp / "src", args.size_mb)
        for r in range(args.rounds):
            # Fresh registries per round and per tool: nobody finds blobs pushed earlier.
            with (
                start_registry(tmp / f"creg{r}") as creg,
                start_registry(tmp / f"sreg{r}") as sreg,
            ):
                coco = [*COCO, "image", "copy", "-q"]
                sk = ["skopeo", "copy", "-q"]
                record("oci->oci", "coco", [*coco, ref, f"oci:{tmp / f'c{r}'}:v1"])
                record("oci->oci", "skopeo", [*sk, ref, f"oci:{tmp / f's{r}'}:v1"])
                cdst, sdst = f"docker://{creg.host}/b/x:1", f"docker://{sreg.host}/b/x:1"
                record("oci->registry", "coco", [*coco, "--dest-tls-verify=false", ref, cdst])
                record("oci->registry", "skopeo", [*sk, "--dest-tls-verify=false", ref, sdst])
                record(
                    "registry->oci",
                    "coco",
                    [*coco, "--src-tls-verify=false", cdst, f"oci:{tmp / f'rc{r}'}:v1"],
                )
                record(
                    "registry->oci",
                    "skopeo",
                    [*sk, "--src-tls-verify=false", sdst, f"oci:{tmp / f'rs{r}'}:v1"],
                )
            for d in tmp.glob(f"*{r}"):
                shutil.rmtree(d, ignore_errors=True)
        print(f"layer: {args.size_mb} MiB uncompressed tar; best wall time of {args.rounds} rounds")
        for case in ("oci->oci", "oci->registry", "registry->oci"):
            (ct, cm), (st, sm) = best[(case, "coco")], best[(case, "skopeo")]
            print(
                f"{case:14s} coco {ct:6.2f}s {cm:4d} MB   skopeo {st:6.2f}s {sm:4d} MB"
                f"   time ratio coco/skopeo {ct / st:5.2f}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
