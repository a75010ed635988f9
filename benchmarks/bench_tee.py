"""Benchmark: verifying a TPM 2.0 quote, coco's ``tpm`` verifier vs ``tpm2_checkquote``.

Starts a throwaway swtpm, takes a quote of all 24 SHA-256 PCRs with coco's TPM attester (which
drives tpm2-tools) and one with ``tpm2_quote`` for the peer, then times, alternating:

* ``tpm2_checkquote`` (tpm2-tools 5.4) as a process, per quote;
* ``coco attestation verify --tee tpm`` as a process, per quote (same process cost as the peer);
* coco's ``TpmVerifier.verify`` in-process (what the Attestation Service pays per request).

Prints the median time per quote and the ratios coco/peer.

    .venv/bin/python benchmarks/bench_tee.py [--runs 30]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.swtpm

from tests.swtpm import start_swtpm

from coco.tee.tpm.attester import AK_ATTRIBUTES, ALL_PCRS, TpmAttester
from coco.tee.tpm.verifier import TpmVerifier


def tpm2(tcti: str, cwd: Path, *args: str) -> None:
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti}
    subprocess.run(list(args), cwd=cwd, env=env, check=True, capture_output=True)
    subprocess.run(["tpm2_flushcontext", "-t"], cwd=cwd, env=env, check=True, capture_output=True)


def timed(fn, runs: int) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    coco = Path(sys.executable).with_name("coco")
    with tempfile.TemporaryDirectory(prefix="bench-tee-") as tmp:
        work = Path(tmp)
        with start_swtpm(work / "state") as tcti:
            report_data = hashlib.sha384(b"bench").digest()
            attester = TpmAttester(tcti)
            evidence = attester.get_evidence(report_data)
            trusted = work / "trusted"
            trusted.mkdir()
            (trusted / "ak.pub").write_bytes(attester.ak_public_pem())
            (work / "evidence.json").write_text(json.dumps(evidence))
            peer = work / "peer"
            peer.mkdir()
            tpm2(tcti, peer, "tpm2_createprimary", "-C", "e", "-G", "rsa2048:rsassa-sha256:null",
                 "-g", "sha256", "-a", AK_ATTRIBUTES, "-c", "ak.ctx")  # fmt: skip
            tpm2(tcti, peer, "tpm2_readpublic", "-c", "ak.ctx", "-f", "pem", "-o", "ak.pem")
            nonce = report_data[:32].hex()
            tpm2(tcti, peer, "tpm2_quote", "-c", "ak.ctx", "-l", ALL_PCRS, "-q", nonce,
                 "-g", "sha256", "-m", "msg", "-s", "sig", "-o", "pcrs")  # fmt: skip

        verifier = TpmVerifier(trusted)
        env = {**os.environ, "COCO_TPM_TRUSTED_AK_KEYS_DIR": str(trusted)}
        checkquote = ["tpm2_checkquote", "-u", "ak.pem", "-m", "msg", "-s", "sig", "-f", "pcrs",
                      "-g", "sha256", "-q", nonce]  # fmt: skip
        cli = [str(coco), "attestation", "verify", "--tee", "tpm", str(work / "evidence.json"),
               "--expected-report-data", report_data.hex()]  # fmt: skip

        def run_peer() -> None:
            subprocess.run(checkquote, cwd=peer, check=True, capture_output=True)

        def run_cli() -> None:
            subprocess.run(cli, env=env, check=True, capture_output=True)

        def run_inproc() -> None:
            verifier.verify(evidence, report_data)

        run_peer(), run_cli(), run_inproc()  # warm up, and prove all three accept
        peer_t, cli_t, inproc_t = [], [], []
        for _ in range(max(1, args.runs // 5)):
            peer_t.append(timed(run_peer, 5))
            cli_t.append(timed(run_cli, 5))
            inproc_t.append(timed(run_inproc, 50))
        p, c, i = (statistics.median(x) for x in (peer_t, cli_t, inproc_t))
        print(f"tpm2_checkquote (process)            {p * 1000:8.2f} ms/quote")
        print(
            f"coco attestation verify (process)    {c * 1000:8.2f} ms/quote   ratio coco/peer {c / p:6.2f}"
        )
        print(
            f"TpmVerifier.verify (in-process)      {i * 1000:8.3f} ms/quote   ratio coco/peer {i / p:6.3f}"
        )
        if shutil.which("tpm2_checkquote") is None:
            print("(tpm2_checkquote not found)")


if __name__ == "__main__":
    main()
