"""Guest components benchmark: ``GetResource`` through ``coco cdh serve`` over ttRPC, warm and cold,
and what a KBS-keyed encrypted pull costs over a pull with the key on disk.

Everything runs on loopback and in a temporary directory: ``coco kbs serve`` (allow-all resource
policy), ``coco aa serve --tee sample`` (and ``--tee tpm`` on a throwaway swtpm whose AK the KBS
trusts, when swtpm and tpm2-tools are here), ``coco cdh serve`` (cc_kbc, tokens from the AA),
``coco keyprovider serve`` and a ``docker-registry``: the test suite's own ``guest_stack``.

* warm: N ``GetResource`` calls on one ttRPC connection to a CDH that already holds a token
  (median and p95; goal < 5 ms);
* cold: a new CDH process per sample (its KBC has no token), the time of its first
  ``GetResource``: the AA's RCAR handshake with the KBS (auth, evidence, attest), the resource
  read and the CDH's first-call set-up; beside it the AA's ``GetToken("kbs")`` alone (the AA never
  caches: every call is a full RCAR flow), per attester;
* pull: one image (two layers) encrypted twice by ``coco image copy``, to a JWE key on disk and
  through ``coco keyprovider serve`` (the KEK registered in the KBS under its kid). Alternating
  rounds, fresh stores: ``coco image pull --decryption-key KEY`` as its own process and through
  a running ``coco image serve``, against ``coco cdh pull-image`` to a CDH started for the round
  (the first pull attests: cold token; a second image, other kid, with the token warm). Medians
  and deltas.

The machine's load average is printed beside the numbers.

    .venv/bin/python benchmarks/bench_guest.py [--calls 300] [--cold 8] [--rounds 5] [--size-mb 24]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import free_port, start_registry
from tests.guest.test_api_server import Proc, Stack, guest_stack
from tests.imagekit import tar_layer, write_image

from coco.rpc import Stub, SyncClient
from coco.rpc.protos import attestation_agent_pb2 as aa_pb
from coco.rpc.protos import confidential_data_hub_pb2 as cdh_pb
from coco.rpc.services import ATTESTATION_AGENT, GET_RESOURCE

COCO = [sys.executable, "-m", "coco.cli.main"]
GOAL_WARM_MS = 5.0
RESOURCE = "kbs:///default/bench/secret"
KIDS = ("kbs:///default/bench-image/one", "kbs:///default/bench-image/two")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def ms(xs: list[float]) -> tuple[float, float]:
    """Median and p95 of seconds, in ms."""
    s = sorted(x * 1000 for x in xs)
    return statistics.median(s), s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]


def timed(f: Callable[[], object]) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of a child process that must succeed."""
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:7])} failed: {p.stderr.strip()[-800:]}")
    return dt


def umount_under(base: Path) -> None:
    prefix = str(base) + "/"
    mounts = [ln.split()[1] for ln in Path("/proc/self/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], check=False, capture_output=True)


# ------------------------------------------------------------------------------ the processes


def cdh_config(stack: Stack, d: Path, aa: str, registry: str) -> Path:
    """A cdh.toml like the stack's, with its own socket and work_dir, tokens from ``aa``."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "cdh.toml"
    cfg.write_text(
        f'socket = "unix://{d}/cdh.sock"\n[aa]\naa_socket = "{aa}"\n'
        f'[kbc]\nname = "cc_kbc"\nurl = "{stack.kbs.url}"\n'
        f'[image]\nwork_dir = "{d / "work"}"\n'
        f'[[image.registry_config.registry]]\nlocation = "{registry}"\ninsecure = true\n'
    )
    return cfg


@contextlib.contextmanager
def cdh(cfg: Path) -> Iterator[str]:
    """A ``coco cdh serve`` of its own, stopped by pid however the block ends; its address."""
    sock = cfg.parent / "cdh.sock"
    p = Proc("coco cdh serve", ["cdh", "serve", "--config", str(cfg)], cfg.parent / "cdh.log")
    p.start(sock)
    try:
        yield f"unix://{sock}"
    finally:
        p.stop()


@contextlib.contextmanager
def tpm_aa(d: Path, stack: Stack, tcti: str) -> Iterator[str]:
    """``coco aa serve --tee tpm`` on the swtpm ``tcti``; its address."""
    sock = d / "aa-tpm.sock"
    (d / "aa-tpm.toml").write_text(
        f'[token_configs.kbs]\nurl = "{stack.kbs.url}"\n\n[eventlog_config]\nenable_eventlog = false\n'
    )
    p = Proc(
        "coco aa serve --tee tpm",
        ["aa", "serve", "--socket", f"unix://{sock}", "--config", str(d / "aa-tpm.toml"),
         "--tee", "tpm", "--eventlog", str(d / "eventlog-tpm")],
        d / "aa-tpm.log", env={"TPM2TOOLS_TCTI": tcti},
    )  # fmt: skip
    p.start(sock)
    try:
        yield f"unix://{sock}"
    finally:
        p.stop()


def get_resource(client: SyncClient) -> bytes:
    req = cdh_pb.GetResourceRequest(ResourcePath=RESOURCE)
    return Stub(client, GET_RESOURCE, timeout=60).GetResource(req).Resource


# ------------------------------------------------------------------------------ GetResource


def warm(stack: Stack, calls: int, secret: bytes) -> list[float]:
    with SyncClient(stack.cdh) as c:
        for _ in range(5):  # the token, the connection, the code paths
            assert get_resource(c) == secret
        return [timed(lambda: get_resource(c)) for _ in range(calls)]


def cold(stack: Stack, d: Path, aa: str, n: int, secret: bytes, registry: str) -> list[float]:
    out = []
    for i in range(n):
        with cdh(cdh_config(stack, d / f"cold{i}", aa, registry)) as addr, SyncClient(addr) as c:
            t = time.perf_counter()
            got = get_resource(c)
            out.append(time.perf_counter() - t)
            assert got == secret
    return out


def aa_tokens(aa: str, n: int) -> list[float]:
    req = aa_pb.GetTokenRequest(TokenType="kbs")
    with SyncClient(aa) as c:
        stub = Stub(c, ATTESTATION_AGENT, timeout=120)
        stub.GetToken(req)  # first-call set-up out of the numbers
        return [timed(lambda: stub.GetToken(req)) for _ in range(n)]


# ------------------------------------------------------------------------------ the pulls


def make_image(path: Path, size_mb: int) -> None:
    """Two layers, ~size_mb of files: 1 MiB half random (incompressible) half text, and small."""
    rnd = random.Random(7)
    text = b" ".join(rnd.randbytes(rnd.randint(2, 8)).hex().encode() for _ in range(200_000))
    layers = []
    for n in range(2):
        files: dict[str, bytes | str | None] = {}
        total, i = 0, 0
        while total < (size_mb << 20) // 2:
            if i % 8 == 0:
                data = rnd.randbytes(512 << 10) + text[: 512 << 10]
            else:
                off = rnd.randint(0, len(text) - (16 << 10))
                data = text[off : off + rnd.randint(512, 16 << 10)]
            files[f"usr/share/l{n}/f{i:05d}"] = data
            total += len(data)
            i += 1
        layers.append(tar_layer(files))
    write_image(path, layers, tag="t")


def encrypt(tmp: Path, stack: Stack, registry: str, kp_port: int) -> tuple[str, list[str], Path]:
    """The plain image pushed encrypted: to a JWE key on disk, and twice through the keyprovider
    (one kid each). Returns (jwe ref, [kbs refs], private key)."""
    key, pub = tmp / "k.pem", tmp / "k.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                    "-out", str(key)], check=True, capture_output=True)  # fmt: skip
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)],
                   check=True, capture_output=True)  # fmt: skip
    plain = f"oci:{tmp / 'plain'}:t"
    jwe = f"{registry}/bench/guest:jwe"
    run([*COCO, "image", "copy", "-q", "--dest-tls-verify=false", "--encryption-key",
         f"jwe:{pub}", plain, f"docker://{jwe}"])  # fmt: skip
    kp_cfg = tmp / "ocicrypt.json"
    kp_cfg.write_text(
        json.dumps({"key-providers": {"attestation-agent": {"grpc": f"127.0.0.1:{kp_port}"}}})
    )
    refs = []
    for n, kid in enumerate(KIDS):
        ref = f"{registry}/bench/guest:kbs{n}"
        run([*COCO, "image", "copy", "-q", "--dest-tls-verify=false", "--encryption-key",
             f"provider:attestation-agent:keyid={kid}", plain, f"docker://{ref}"],
            env={"OCICRYPT_KEYPROVIDER_CONFIG": str(kp_cfg)})  # fmt: skip
        refs.append(ref)
    return jwe, refs, key


def pulls(tmp: Path, stack: Stack, registry: str, rounds: int, jwe: str, kbs: list[str],
          key: Path) -> dict[str, list[float]]:  # fmt: skip
    res: dict[str, list[float]] = {"disk": [], "disk-svc": [], "kbs-cold": [], "kbs-warm": []}
    svc_sock = tmp / "image.sock"
    svc = Proc("coco image serve", ["image", "serve", "--socket", str(svc_sock)], tmp / "img.log")
    svc.start(svc_sock)
    try:
        for r in range(rounds):
            w = tmp / f"pull{r}"
            w.mkdir()

            def disk(w: Path = w) -> None:
                base = [*COCO, "image", "pull", "-q", "--tls-verify=false", "--decryption-key",
                        str(key)]  # fmt: skip
                res["disk"].append(
                    run([*base, "--store", str(w / "s1"), f"docker://{jwe}", str(w / "b1")])
                )
                res["disk-svc"].append(run([*base, "--service", str(svc_sock), "--store",
                                            str(w / "s2"), f"docker://{jwe}", str(w / "b2")]))  # fmt: skip

            def keyed(w: Path = w) -> None:
                with cdh(cdh_config(stack, w / "cdh", stack.aa, registry)) as addr:
                    for name, ref, b in (("kbs-cold", kbs[0], "b3"), ("kbs-warm", kbs[1], "b4")):
                        res[name].append(run([*COCO, "cdh", "pull-image", ref, str(w / b),
                                              "--socket", addr]))  # fmt: skip

            for f in (disk, keyed) if r % 2 == 0 else (keyed, disk):
                f()
            umount_under(w)
            shutil.rmtree(w, ignore_errors=True)
            print(f"  pull round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in res.items()),
                  f"(load {load()})")  # fmt: skip
    finally:
        svc.stop()
    return res


# ------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300, help="warm GetResource calls")
    ap.add_argument(
        "--cold", type=int, default=8, help="cold samples (a new CDH each) per attester"
    )
    ap.add_argument("--tokens", type=int, default=10, help="AA GetToken calls per attester")
    ap.add_argument("--rounds", type=int, default=5, help="pull rounds")
    ap.add_argument("--size-mb", type=int, default=24, help="image size (two layers)")
    ap.add_argument("--no-tpm", action="store_true", help="sample attester only")
    args = ap.parse_args()
    src = Path(__file__).resolve().parents[1] / "src"  # time the code, not the byte compiler
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    for tool in ("docker-registry", "openssl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed")
    use_tpm = not args.no_tpm and all(shutil.which(t) for t in ("swtpm", "tpm2_quote"))
    print(f"load average at start: {load()}")
    tmp = Path(tempfile.mkdtemp(prefix="bg-", dir="/tmp"))  # short: sockets live in it
    trusted = tmp / "trusted-aks"
    trusted.mkdir()
    saved = os.environ.get("COCO_TPM_TRUSTED_AK_KEYS_DIR")
    os.environ["COCO_TPM_TRUSTED_AK_KEYS_DIR"] = str(trusted)  # read by the KBS the stack starts
    secret = os.urandom(64)
    try:
        with contextlib.ExitStack() as es:
            reg = es.enter_context(start_registry(tmp / "registry"))
            (tmp / "stack").mkdir()
            stack = es.enter_context(guest_stack(tmp / "stack", registry_host=reg.host))
            with stack.admin() as admin:
                admin.set_resource(RESOURCE.removeprefix("kbs:///"), secret)
            aas = {"sample": stack.aa}
            if use_tpm:
                from tests.swtpm import start_swtpm

                from coco.tee.tpm.attester import TpmAttester

                tcti = es.enter_context(start_swtpm(tmp / "swtpm"))
                (trusted / "ak.pub").write_bytes(TpmAttester(tcti).ak_public_pem())
                aas["tpm"] = es.enter_context(tpm_aa(tmp, stack, tcti))

            w = warm(stack, args.calls, secret)
            wm, wp = ms(w)
            print(f"warm GetResource ({len(w)} calls, one connection): median {wm:.2f} ms, "
                  f"p95 {wp:.2f} ms (load {load()})")  # fmt: skip
            colds: dict[str, tuple[list[float], list[float]]] = {}
            for name, aa in aas.items():
                colds[name] = (
                    cold(stack, tmp / name, aa, args.cold, secret, reg.host),
                    aa_tokens(aa, args.tokens),
                )
                c, t = ms(colds[name][0]), ms(colds[name][1])
                print(f"cold GetResource ({name}): median {c[0]:.1f} ms, p95 {c[1]:.1f} ms; "
                      f"AA GetToken alone median {t[0]:.1f} ms (load {load()})")  # fmt: skip

            port = free_port()
            kp = Proc(
                "coco keyprovider serve",
                ["keyprovider", "serve", "--socket", f"127.0.0.1:{port}", "--kbs", stack.kbs.url,
                 "--auth-private-key", str(stack.admin_key)],
                tmp / "kp.log",
            )  # fmt: skip
            es.callback(kp.stop)
            kp.start(("127.0.0.1", port))
            make_image(tmp / "plain", args.size_mb)
            jwe, kbs, key = encrypt(tmp, stack, reg.host, port)
            p = pulls(tmp, stack, reg.host, args.rounds, jwe, kbs, key)
            print_table(wm, wp, colds, p, args)
    finally:
        umount_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if saved is None:
            os.environ.pop("COCO_TPM_TRUSTED_AK_KEYS_DIR", None)
        else:
            os.environ["COCO_TPM_TRUSTED_AK_KEYS_DIR"] = saved


def print_table(wm: float, wp: float, colds: dict, p: dict[str, list[float]], args) -> None:  # type: ignore[no-untyped-def]
    rows = [("GetResource, warm token", f"{wm:8.2f} ms {wp:8.2f} ms",
             f"{wm / GOAL_WARM_MS:.2f} x the {GOAL_WARM_MS:g} ms goal (< 1 meets it)")]  # fmt: skip
    for name, (c, t) in colds.items():
        (cm, cp), (tm, tp) = ms(c), ms(t)
        rows += [
            (f"GetResource, cold, {name}", f"{cm:8.1f} ms {cp:8.1f} ms", f"{cm / wm:.0f} x warm"),
            (f"  AA GetToken (RCAR), {name}", f"{tm:8.1f} ms {tp:8.1f} ms", ""),
            ("  rest: a new CDH's first call", f"{cm - tm - wm:8.1f} ms", "cold - token - warm"),
        ]
    med = {k: statistics.median(v) for k, v in p.items()}
    names = {
        "disk": "pull, key on disk (coco image pull)",
        "disk-svc": "pull, key on disk (coco image serve)",
        "kbs-cold": "pull, KBS key (cdh, attests)",
        "kbs-warm": "pull, KBS key (cdh, token warm)",
    }
    for k, label in names.items():
        rows.append((label, f"{med[k] * 1000:8.0f} ms", f"median of {len(p[k])}"))
    for base in ("disk", "disk-svc"):
        for k in ("kbs-cold", "kbs-warm"):
            d = (med[k] - med[base]) * 1000
            rows.append((f"  {k} - {base}", f"{d:+8.0f} ms", f"ratio {med[k] / med[base]:.2f}"))
    print(f"\nimage: {args.size_mb} MB in two layers, encrypted; load average now {load()}")
    print(f"{'':38s}{'median':>11s} {'p95':>11s}")
    for label, value, note in rows:
        print(f"{label:38s}{value:23s}  {note}")


if __name__ == "__main__":
    main()
