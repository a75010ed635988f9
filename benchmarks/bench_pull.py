"""Benchmark: ``coco image pull`` against ``skopeo copy --decryption-key`` + ``umoci unpack``.

One encrypted image (~200 MB of tar, gzip-compressed, encrypted by skopeo to an RSA key) sits in
a docker-registry on loopback. Each round runs, alternating which goes first:

- coco:  ``coco image pull --decryption-key K docker://… BUNDLE --store FRESH`` (overlay bundle)
- peer:  ``skopeo copy --decryption-key K docker://… oci:DIR:t`` then ``umoci unpack``

and prints wall times, peak RSS (the largest process of each side) and the ratio coco/peer; then a
second pull of the same image into a new bundle from the warm store, against the first pull, in two
ways: a new ``coco image pull`` process (mostly Python start-up), and ``coco image pull --service``
through a running ``coco image serve`` (the guest's way: a long-running puller, as upstream's
image-rs in CDH), whose first pull is timed the same way for its ratio.

    .venv/bin/python benchmarks/bench_pull.py [--size-mb 200] [--rounds 3] [--flatten]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import start_registry

from coco.files import mark_hierarchy_top

COCO = [sys.executable, "-m", "coco.cli.main"]

_MAKE = r"""
import io, random, sys, tarfile
from pathlib import Path
from tests.imagekit import write_image
size = int(sys.argv[2]) << 20
rnd = random.Random(1)
words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))
         for _ in range(5000)]
text = b" ".join(rnd.choice(words) for _ in range(300_000))  # ~1.8 MB of compressible text
buf = io.BytesIO()
total = 0
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
    i = 0
    while total < size:
        if i % 10 == 0:  # a 1 MiB file: half random (incompressible), half text
            data = rnd.randbytes(512 << 10) + text[(i * 7919) % 1_000_000:][: 512 << 10]
        else:  # small files, as /usr has many
            n = rnd.randint(512, 16 << 10)
            off = rnd.randint(0, len(text) - n)
            data = text[off : off + n]
        ti = tarfile.TarInfo(f"usr/share/d{i // 100:03d}/f{i:05d}")
        ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
        tf.addfile(ti, io.BytesIO(data))
        total += len(data) + 1024
        i += 1
    for name, data in (("bin/hello", b"#!/bin/sh\necho hi\n"),):
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode = len(data), 0o755
        tf.addfile(ti, io.BytesIO(data))
whole = buf.getvalue()
n = int(sys.argv[3])
if n == 1:
    layers = [whole]
else:  # the same entries dealt into n layers
    bufs = [io.BytesIO() for _ in range(n)]
    tfs = [tarfile.open(fileobj=b, mode="w", format=tarfile.PAX_FORMAT) for b in bufs]
    src = tarfile.open(fileobj=io.BytesIO(whole))
    for k, ti in enumerate(src):
        tfs[k % n].addfile(ti, src.extractfile(ti))
    for t in tfs:
        t.close()
    layers = [b.getvalue() for b in bufs]
img = write_image(Path(sys.argv[1]), layers, tag="t", compression="gzip")
print(sum(map(len, layers)), sum(map(len, img.layers)))
"""


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (MB) of a child process.

    The page cache is written back first (untimed): otherwise the kernel's flusher threads write
    the previous command's few hundred MB on our two cores while this one runs, and whichever
    side runs next pays for the other's data.
    """
    os.sync()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert p.stderr is not None
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} failed: {err.decode()}")
    if os.environ.get("BENCH_CPU"):
        print(
            f"  {cmd[3] if len(cmd) > 3 else cmd[0]}: wall {dt:.2f}s user {usage.ru_utime:.2f}s sys {usage.ru_stime:.2f}s"
        )
    return dt, usage.ru_maxrss // 1024


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def umount_bundle(bundle: Path) -> None:
    rootfs = bundle / "rootfs"
    if os.path.ismount(rootfs):
        subprocess.run(["umount", "-l", str(rootfs)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flatten", action="store_true", help="coco: flattened rootfs, no overlay")
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=1, help="split the image into N layers")
    args = ap.parse_args()
    # Time the code, not the compiler: with PYTHONDONTWRITEBYTECODE set (as in some shells) every
    # `coco` process would otherwise recompile the modules edited since the last cached bytecode.
    src = Path(__file__).resolve().parents[1] / "src"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    for tool in ("skopeo", "umoci", "docker-registry"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed")
    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory(prefix="bench-pull-", dir="/var/tmp") as tmps:
        tmp = Path(tmps)
        gen = subprocess.run(
            [sys.executable, "-c", _MAKE, str(tmp / "plain"), str(args.size_mb), str(args.layers)],
            cwd=root,
            env={**os.environ, "PYTHONPATH": root},
            check=True,
            capture_output=True,
            text=True,
        )
        tar_size, gz_size = map(int, gen.stdout.split())
        key, pub = tmp / "k.pem", tmp / "k.pub"
        openssl(
            "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key)
        )
        openssl("pkey", "-in", str(key), "-pubout", "-out", str(pub))
        with start_registry(tmp / "registry") as reg:
            ref = f"docker://{reg.host}/bench/pull:enc"
            subprocess.run(
                ["skopeo", "--insecure-policy", "copy", "-q", "--dest-tls-verify=false",
                 "--encryption-key", f"jwe:{pub}", f"oci:{tmp / 'plain'}:t", ref],
                check=True,
            )  # fmt: skip
            print(
                f"image: {args.layers} layer(s), {tar_size / 1e6:.0f} MB tar, {gz_size / 1e6:.0f} MB gzip, "
                f"encrypted (jwe, RSA); registry {reg.host}"
            )
            coco_t: list[float] = []
            peer_t: list[float] = []
            coco_m: list[int] = []
            peer_m: list[int] = []
            second: list[float] = []
            svc_first: list[float] = []
            svc_second: list[float] = []
            sock = str(tmp / "image.sock")
            service = subprocess.Popen([*COCO, "image", "serve", "--socket", sock])
            for _ in range(200):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            for r in range(args.rounds):
                work = tmp / f"r{r}"
                work.mkdir()
                # Both sides' trees placed as coco places its own (see mark_hierarchy_top): ext4
                # without a journal, as here, passes over each inode freed in the last minutes one
                # at a time, so after the previous round's rmtree whichever side creates its files
                # beside those inodes pays ~1 ms per file (umoci did: 3.4 s -> 4.6-5.7 s).
                mark_hierarchy_top(work)

                def coco(w: Path = work) -> None:
                    cmd = [*COCO, "image", "pull", "-q", "--tls-verify=false",
                           "--decryption-key", str(key), "--store", str(w / "store"),
                           "--jobs", str(args.jobs)]  # fmt: skip
                    if args.flatten:
                        cmd.append("--flatten")
                    dt, mem = run([*cmd, ref, str(w / "bundle")])
                    coco_t.append(dt)
                    coco_m.append(mem)
                    dt2, _ = run([*cmd, ref, str(w / "bundle2")])
                    second.append(dt2)
                    svc = [*cmd, "--service", sock]
                    svc[svc.index("--store") + 1] = str(w / "svc-store")
                    svc_first.append(run([*svc, ref, str(w / "bundle3")])[0])
                    svc_second.append(run([*svc, ref, str(w / "bundle4")])[0])
                    for b in ("bundle", "bundle2", "bundle3", "bundle4"):
                        umount_bundle(w / b)

                def peer(w: Path = work) -> None:
                    d1, m1 = run(
                        ["skopeo", "--insecure-policy", "copy", "-q", "--src-tls-verify=false",
                         "--decryption-key", str(key), ref, f"oci:{w / 'oci'}:t"]
                    )  # fmt: skip
                    d2, m2 = run(["umoci", "unpack", "--image", f"{w / 'oci'}:t", str(w / "umoci")])
                    peer_t.append(d1 + d2)
                    peer_m.append(max(m1, m2))

                for f in (coco, peer) if r % 2 == 0 else (peer, coco):
                    f()
                print(
                    f"round {r + 1}: coco {coco_t[-1]:.2f}s ({coco_m[-1]} MB)  "
                    f"peer {peer_t[-1]:.2f}s ({peer_m[-1]} MB)  ratio {coco_t[-1] / peer_t[-1]:.2f}"
                    f"  second pull {second[-1]:.3f}s; service: first {svc_first[-1]:.2f}s, "
                    f"second {svc_second[-1]:.3f}s"
                )
                shutil.rmtree(work, ignore_errors=True)
            service.terminate()
            service.wait(10)
    c, p = statistics.median(coco_t), statistics.median(peer_t)
    s = statistics.median(second)
    f1, f2 = statistics.median(svc_first), statistics.median(svc_second)
    print(
        f"median: coco pull {c:.2f}s, skopeo+umoci {p:.2f}s, ratio {c / p:.2f} (goal <= 0.28); "
        f"peak RSS coco {max(coco_m)} MB, peer {max(peer_m)} MB (goal coco < 100 MB)"
    )
    print(
        f"second pull (goal < 0.10 of the first): through `coco image serve` {f2 * 1000:.0f} ms = "
        f"{f2 / f1:.3f} of its first pull ({f1:.2f}s); as a new process {s * 1000:.0f} ms = "
        f"{s / c:.3f} of the first"
    )


if __name__ == "__main__":
    main()
