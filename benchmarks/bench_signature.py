"""Benchmark: verifying one GPG simple-signing signature, coco against ``skopeo
standalone-verify``, in the same run; and signing one (coco ``sign_simple`` against ``skopeo
standalone-sign``). Both sides spawn ``gpg`` (skopeo through gpgme), so this measures the
overhead around it. Prints the mean per operation and the ratio coco/skopeo. Usage:

    .venv/bin/python benchmarks/bench_signature.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.image.signature.conftest import make_gpg_key

from coco.image.signature import Policy, PolicyContext, Signatures, sign_simple
from coco.oci.reference import parse_docker

REF = "registry.example.com/bench/app:v1"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        key = make_gpg_key(d, "bench")
        home, fpr = key.home, key.fingerprint
        os.environ["GNUPGHOME"] = str(home)
        manifest = json.dumps({"schemaVersion": 2, "layers": []}).encode()
        (d / "manifest.json").write_bytes(manifest)
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        subprocess.run(
            ["skopeo", "standalone-sign", "-o", str(d / "sig"), str(d / "manifest.json"), REF, fpr],
            check=True,
            capture_output=True,
        )
        sig = (d / "sig").read_bytes()
        policy = Policy.from_bytes(
            json.dumps(
                {
                    "default": [
                        {"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(key.public)}
                    ]
                }
            ).encode()
        )
        ctx = PolicyContext(policy)
        ref = parse_docker(REF)

        def ours_verify() -> None:
            v = ctx.evaluate(ref, digest, lambda: Signatures(simple=[sig]))
            assert v.accepted, v.reason

        def skopeo_verify() -> None:
            subprocess.run(
                ["skopeo", "standalone-verify", str(d / "manifest.json"), REF, fpr, str(d / "sig")],
                check=True,
                capture_output=True,
            )

        def ours_sign() -> None:
            sign_simple(REF, digest, fpr, gnupghome=home)

        def skopeo_sign() -> None:
            subprocess.run(
                [
                    "skopeo",
                    "standalone-sign",
                    "-o",
                    str(d / "sig2"),
                    str(d / "manifest.json"),
                    REF,
                    fpr,
                ],
                check=True,
                capture_output=True,
            )

        for name, ours, peer in (
            ("verify", ours_verify, skopeo_verify),
            ("sign", ours_sign, skopeo_sign),
        ):
            ours(), peer()  # warm up (gpg-agent start, page cache)
            t_ours = t_peer = 0.0
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                ours()
                t1 = time.perf_counter()
                peer()
                t2 = time.perf_counter()
                t_ours += t1 - t0
                t_peer += t2 - t1
            a, b = t_ours / args.rounds * 1000, t_peer / args.rounds * 1000
            print(f"{name:7s} coco {a:7.1f} ms   skopeo {b:7.1f} ms   coco/skopeo {a / b:5.2f}")
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)


if __name__ == "__main__":
    main()
