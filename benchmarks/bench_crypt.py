"""Benchmark: decrypting (and encrypting) a ~200 MB one-layer image, coco vs skopeo.

Builds a one-layer gzip image (random files and compressible text, about 200 MB of layer blob)
in a temporary OCI layout, encrypts it with ``skopeo copy --encryption-key jwe:…``, then times
``skopeo copy --decryption-key`` and ``coco image copy --decryption-key`` of that image,
alternating between the two, each into a fresh layout. Peak memory is the child's maximum RSS
(``wait4``). Prints the median wall and CPU times, the wall ratio coco/skopeo and the peak RSS of
each, and
checks that both produced the plain layer digest. The same for encryption with ``--encrypt``.

    .venv/bin/python benchmarks/bench_crypt.py [--runs 3] [--size-mb 200] [--encrypt]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import isal.igzip as igzip

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coco.oci.layout import OciLayout  # noqa: E402
from coco.oci.models import Descriptor, go_json  # noqa: E402

COCO = [str(ROOT / ".venv/bin/coco")]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build_layer(size_mb: int) -> tuple[bytes, bytes]:
    """(tar, gzip) with ~85% random bytes and ~15% text, gzip ~``size_mb`` MB."""
    buf = io.BytesIO()
    rnd_total = int(size_mb * 0.92) << 20
    text_total = int(size_mb * 0.6) << 20  # compresses ~4x
    line = b"".join(
        f"{i:08d} the quick brown fox jumps over the lazy dog {i * 7919 % 100003}\n".encode()
        for i in range(2000)
    )
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        n = 0
        while n < rnd_total:
            size = min(8 << 20, rnd_total - n)
            ti = tarfile.TarInfo(f"data/random-{n >> 20:05d}.bin")
            ti.size, ti.mtime = size, 1_700_000_000
            tf.addfile(ti, io.BytesIO(os.urandom(size)))
            n += size
        n = 0
        while n < text_total:
            data = (line * ((4 << 20) // len(line) + 1))[: min(4 << 20, text_total - n)]
            ti = tarfile.TarInfo(f"text/file-{n >> 20:05d}.txt")
            ti.size, ti.mtime = len(data), 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
            n += len(data)
    tar = buf.getvalue()
    return tar, igzip.compress(tar, compresslevel=1)


def write_image(path: Path, tar: bytes, gz: bytes) -> None:
    cfg = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
        },
        separators=(",", ":"),
    ).encode()
    man = go_json(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": Descriptor(
                "application/vnd.oci.image.config.v1+json", sha256(cfg), len(cfg)
            ).to_json(),
            "layers": [
                Descriptor(
                    "application/vnd.oci.image.layer.v1.tar+gzip", sha256(gz), len(gz)
                ).to_json()
            ],
        }
    )
    lay = OciLayout.init(path)
    with lay.transaction() as tx:
        for b in (cfg, gz, man):
            tx.put_bytes(b)
        tx.set_tag(
            "latest",
            Descriptor("application/vnd.oci.image.manifest.v1+json", sha256(man), len(man)),
        )


def run(cmd: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (MB) and CPU seconds (user + system) of one child."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err}")
    return wall, usage.ru_maxrss // 1024, usage.ru_utime + usage.ru_stime


def layer_digest(path: Path) -> str:
    index = json.loads((path / "index.json").read_text())
    d = index["manifests"][0]["digest"].split(":")[1]
    man = json.loads((path / "blobs/sha256" / d).read_bytes())
    return man["layers"][0]["digest"]


def compare(label: str, cmds: dict[str, list[str]], out: Path, runs: int, want: str | None) -> None:
    times: dict[str, list[float]] = {k: [] for k in cmds}
    rss: dict[str, int] = dict.fromkeys(cmds, 0)
    cpu: dict[str, list[float]] = {k: [] for k in cmds}
    for i in range(runs):
        order = list(cmds) if i % 2 == 0 else list(reversed(cmds))
        for name in order:
            shutil.rmtree(out, ignore_errors=True)
            wall, peak, used = run([*cmds[name], f"oci:{out}:latest"])
            if want is not None and layer_digest(out) != want:
                raise SystemExit(f"{name}: wrong layer digest {layer_digest(out)}, want {want}")
            times[name].append(wall)
            rss[name] = max(rss[name], peak)
            cpu[name].append(used)
            print(
                f"  {label} run {i + 1} {name:6s} {wall:6.2f} s  cpu {used:5.2f} s  "
                f"peak RSS {peak:4d} MB",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in times.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(
        f"{label}: wall skopeo {med['skopeo']:.2f} s, coco {med['coco']:.2f} s, "
        f"coco/skopeo = {med['coco'] / med['skopeo']:.2f}; cpu skopeo {mcpu['skopeo']:.2f} s, "
        f"coco {mcpu['coco']:.2f} s; peak RSS skopeo {rss['skopeo']} MB, coco {rss['coco']} MB"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--encrypt", action="store_true", help="also time encryption")
    ap.add_argument("--skopeo", default=shutil.which("skopeo") or "skopeo")
    ap.add_argument("--build-into", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_into:
        tar, gz = build_layer(args.size_mb)
        write_image(Path(args.build_into), tar, gz)
        print(sha256(gz), f"tar {len(tar) >> 20} MB, gzip blob {len(gz) >> 20} MB")
        return
    skopeo = [args.skopeo, "--insecure-policy", "copy", "-q"]
    with tempfile.TemporaryDirectory(prefix="bench-crypt-") as tmp:
        d = Path(tmp)
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", str(d / "k.pem")], check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            ["openssl", "pkey", "-in", str(d / "k.pem"), "-pubout", "-out", str(d / "k.pub")],
            check=True,
            capture_output=True,
        )
        # Built in a child process so this one stays small: a forked child's peak RSS would
        # otherwise include the parent's pages.
        t0 = time.perf_counter()
        built = subprocess.run(
            [sys.executable, __file__, "--build-into", str(d / "plain"), "--size-mb",
             str(args.size_mb)], check=True, capture_output=True, text=True,
        )  # fmt: skip
        plain_digest, info = built.stdout.split(" ", 1)
        print(f"image: one layer, {info.strip()} (built in {time.perf_counter() - t0:.1f} s)")
        subprocess.run(
            [*skopeo, "--encryption-key", f"jwe:{d / 'k.pub'}", f"oci:{d / 'plain'}:latest",
             f"oci:{d / 'enc'}:latest"], check=True,
        )  # fmt: skip
        src = f"oci:{d / 'enc'}:latest"
        key = str(d / "k.pem")
        compare(
            "decrypt",
            {
                "skopeo": [*skopeo, "--decryption-key", key, src],
                "coco": [*COCO, "image", "copy", "-q", "--decryption-key", key, src],
            },
            d / "out",
            args.runs,
            plain_digest,
        )
        if args.encrypt:
            psrc = f"oci:{d / 'plain'}:latest"
            pub = f"jwe:{d / 'k.pub'}"
            compare(
                "encrypt",
                {
                    "skopeo": [*skopeo, "--encryption-key", pub, psrc],
                    "coco": [*COCO, "image", "copy", "-q", "--encryption-key", pub, psrc],
                },
                d / "out",
                args.runs,
                None,
            )


if __name__ == "__main__":
    main()
