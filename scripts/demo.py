"""`make demo`: the life of a confidential container image on this machine, step by step.

Today it covers the owner's side of image confidentiality against real peers: build a plain image
(with umoci), encrypt its layer with `coco image copy --encryption-key` into a real docker-registry
that wants a password, show that Debian's skopeo decrypts what coco encrypted and that coco decrypts
it too, both giving back the plain image's layer digests, and that a wrong key is refused.
Then the guest's side: `coco image pull` verifies, decrypts and unpacks the image into a bundle
in one pass, and `runc` runs it. Every step prints the command it runs, so the demo doubles as a tour of the CLI.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

console = Console(highlight=False)
VENV_BIN = Path(sys.executable).parent
COCO = str(VENV_BIN / "coco")
USER, PASSWORD = "demo", "s3cret-demo"


def step(title: str) -> None:
    console.rule(f"[bold cyan]{title}")


def run(
    *argv: str, check: bool = True, env: dict[str, str] | None = None, show: bool = True
) -> subprocess.CompletedProcess[str]:
    shown = " ".join(shlex.quote(a if a != COCO else "coco") for a in argv)
    console.print(f"[dim]$ {shown}")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    out = (proc.stdout + proc.stderr).strip()
    if out and show:
        console.print(out, markup=False)
    if check and proc.returncode != 0:
        console.print(f"[bold red]command failed with exit code {proc.returncode}")
        sys.exit(1)
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    htpasswd = work / "htpasswd"
    pw = subprocess.run(
        ["htpasswd", "-Bbn", USER, PASSWORD], capture_output=True, text=True, check=True
    )
    htpasswd.write_text(pw.stdout)
    config = work / "registry.yml"
    config.write_text(
        json.dumps(
            {
                "version": 0.1,
                "log": {"level": "error"},
                "storage": {
                    "filesystem": {"rootdirectory": str(work / "registry-data")},
                    "delete": {"enabled": True},
                },
                "http": {"addr": f"127.0.0.1:{port}"},
                "auth": {"htpasswd": {"realm": "coco-demo", "path": str(htpasswd)}},
            }
        )
    )
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("docker-registry did not start")


def layer_digests(layout: Path, tag: str) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            algo, hexd = m["digest"].split(":", 1)
            manifest = json.loads((layout / "blobs" / algo / hexd).read_text())
            return [layer["digest"] for layer in manifest["layers"]]
    sys.exit(f"tag {tag} not found in {layout}")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="coco-demo-"))
    registry = None
    try:
        step("1. Build a plain image with umoci (busybox, prints a greeting)")
        root = work / "rootfs" / "bin"
        root.mkdir(parents=True)
        shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "busybox")
        run("tar", "-C", str(work / "rootfs"), "-cf", str(work / "layer.tar"), "bin")
        layout = work / "images"
        run("umoci", "init", "--layout", str(layout))
        run("umoci", "new", "--image", f"{layout}:plain")
        run("umoci", "raw", "add-layer", "--image", f"{layout}:plain", str(work / "layer.tar"))
        run(
            "umoci", "config", "--image", f"{layout}:plain",
            "--config.cmd", "/bin/busybox", "--config.cmd", "echo",
            "--config.cmd", "hello from a confidential container",
        )  # fmt: skip
        plain = layer_digests(layout, "plain")
        console.print(f"plain layer digests: {plain}")

        step("2. The owner's key pair (RSA 3072, PKCS#8)")
        priv, pub = work / "owner.key", work / "owner.pub"
        run("openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072",
            "-out", str(priv), show=False)  # fmt: skip
        run("openssl", "pkey", "-in", str(priv), "-pubout", "-out", str(pub))

        step("3. A real docker-registry on loopback, with a password")
        registry, host = start_registry(work)
        console.print(f"registry listening on {host} (basic auth, user {USER})")
        creds = f"{USER}:{PASSWORD}"
        enc_ref = f"docker://{host}/demo/app:encrypted"

        step("4. coco encrypts the layer on its way to the registry")
        run(COCO, "image", "copy", "--dest-creds", creds, "--dest-tls-verify=false",
            "--encryption-key", f"jwe:{pub}", f"oci:{layout}:plain", enc_ref)  # fmt: skip
        inspected = run(COCO, "image", "inspect", "--creds", creds, "--tls-verify=false",
                        "--raw", enc_ref, show=False)  # fmt: skip
        manifest = json.loads(inspected.stdout)
        for layer in manifest["layers"]:
            keys = sorted(k for k in layer.get("annotations", {}) if ".enc." in k)
            console.print(f"registry holds {layer['mediaType']} with {', '.join(keys)}")

        step("5. skopeo (the Go peer) decrypts what coco encrypted")
        run("skopeo", "copy", "--insecure-policy", "--src-creds", creds,
            "--src-tls-verify=false", "--decryption-key", str(priv),
            enc_ref, f"oci:{layout}:skopeo-decrypted")  # fmt: skip
        by_skopeo = layer_digests(layout, "skopeo-decrypted")

        step("6. coco decrypts it too")
        run(COCO, "image", "copy", "--src-creds", creds, "--src-tls-verify=false",
            "--decryption-key", str(priv), enc_ref, f"oci:{layout}:coco-decrypted")  # fmt: skip
        by_coco = layer_digests(layout, "coco-decrypted")

        step("7. The guest pulls it in one pass (verify, decrypt, unpack) and runc runs it")
        bundle, store = work / "bundle", work / "store"
        run(COCO, "image", "pull", "--creds", creds, "--tls-verify=false", "--flatten",
            "--decryption-key", str(priv), "--store", str(store), enc_ref, str(bundle))  # fmt: skip
        ran = run("runc", "--root", str(work / "runc"), "run", "--bundle", str(bundle),
                  f"coco-demo-{os.getpid()}")  # fmt: skip
        greeted = "hello from a confidential container" in ran.stdout

        step("8. A wrong key is refused, and nothing is written")
        wrong = work / "wrong.key"
        run("openssl", "genpkey", "-algorithm", "RSA", "-out", str(wrong), show=False)
        refused = run(COCO, "image", "copy", "--src-creds", creds, "--src-tls-verify=false",
                      "--decryption-key", str(wrong), enc_ref, f"oci:{layout}:never",
                      check=False)  # fmt: skip
        tags = [
            m.get("annotations", {}).get("org.opencontainers.image.ref.name")
            for m in json.loads((layout / "index.json").read_text())["manifests"]
        ]

        step("Result")
        ok = (
            plain == by_skopeo == by_coco
            and greeted
            and refused.returncode == 1
            and "never" not in tags
        )
        console.print(f"plain layers           {plain}")
        console.print(f"decrypted by skopeo    {by_skopeo}")
        console.print(f"decrypted by coco      {by_coco}")
        console.print(f"runc printed greeting  {greeted}")
        console.print(f"wrong key exit code    {refused.returncode}; tags now {tags}")
        if not ok:
            console.print("[bold red]demo FAILED")
            sys.exit(1)
        console.print(
            "[bold green]demo passed: coco and skopeo agree byte for byte, and runc ran the pulled bundle"
        )
    finally:
        if registry is not None:
            registry.terminate()
            registry.wait()
        if os.environ.get("COCO_DEMO_KEEP"):
            console.print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
