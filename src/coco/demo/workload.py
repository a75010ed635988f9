"""Step 2 of the demo, the workload: an application image built from nothing on this machine,
signed, its layer encrypted through ``coco keyprovider serve`` so that the key lives only in the
KBS, pushed; then the secret and the image key's companions (the signature policy and the
signature's public key) uploaded to the KBS.

The image is busybox (Debian's ``busybox-static``) and ``/app/show-secret``, a shell script that
asks the guest's REST API on ``127.0.0.1:8006`` for the secret and prints it. The layer is made
with Python's tarfile and the image with ``umoci``; the owner keeps the plain layout and only the
encrypted image leaves.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from coco.demo.owner import Kbs
from coco.demo.session import Blocked, DemoError, Session, free_port, listening

SECRET_PATH = "default/demo-secret/1"
IMAGE_KEY = "kbs:///default/demo-image-key/1"
POLICY_PATH = "default/security-policy/demo"
COSIGN_KEY_PATH = "default/cosign-key/demo"
SECRET_LINE = "the secret, fetched inside the pod from 127.0.0.1:8006:"
SCRIPT_NAME = "show-secret"

SCRIPT = f"""#!/bin/sh
# runs in the confidential pod: the guest's REST API hands out what the KBS releases to this guest
secret=$(wget -q -O - http://127.0.0.1:8006/cdh/resource/{SECRET_PATH}) || {{
    echo "show-secret: the guest's API on 127.0.0.1:8006 gave no secret" >&2; exit 1; }}
echo "{SECRET_LINE} $secret"
"""
APPLETS = ("sh", "wget", "echo", "cat", "sleep", "ls", "true")


@dataclass
class Workload:
    image: str  # registry/demo/app:1 (encrypted, signed)
    pause: str  # registry/demo/pause:1 (plain: containerd's sandbox image)
    digest: str  # the pushed manifest's digest
    layer_digest: str  # the encrypted layer blob in the registry
    secret: str


def pause_image(registry: str) -> str:
    """The pod's sandbox (pause) image, plain: containerd's CRI pulls and runs it."""
    return f"{registry}/demo/pause:1"


def _layer(work: Path) -> Path:
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        raise Blocked("busybox-static is not installed (scripts/install-system-deps)")
    passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
    group = "root:x:0:\nnobody:x:65534:\n"
    path = work / "layer.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, data: bytes | None = None, mode: int = 0o644, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.mtime, info.uname, info.gname = 0, "root", "root"
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif data is None:
                info.type, info.mode = tarfile.DIRTYPE, mode
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), mode
                tar.addfile(info, io.BytesIO(data))

        for d in ("bin", "app", "etc", "tmp", "proc", "sys", "dev"):
            add(d, mode=0o1777 if d == "tmp" else 0o755)
        add("bin/busybox", Path(busybox).read_bytes(), 0o755)
        for applet in APPLETS:
            add(f"bin/{applet}", link="busybox")
        add(f"app/{SCRIPT_NAME}", SCRIPT.encode(), 0o755)
        add("pause", b"#!/bin/sh\nexec sleep 2147483647\n", 0o755)
        add("etc/passwd", passwd.encode())
        add("etc/group", group.encode())
    return path


def build_images(session: Session) -> Path:
    """The plain layout, tags ``app`` and ``pause``."""
    work = session.work / "image"
    work.mkdir()
    layer = _layer(work)
    layout = work / "layout"
    session.run(["umoci", "init", "--layout", str(layout)])
    for tag, cmd in (("app", [f"/app/{SCRIPT_NAME}"]), ("pause", ["/pause"])):
        ref = f"{layout}:{tag}"
        session.run(["umoci", "new", "--image", ref])
        session.run(["umoci", "raw", "add-layer", "--image", ref, str(layer)])
        args = ["umoci", "config", "--image", ref, "--config.env", "PATH=/bin"]
        for c in cmd:
            args += ["--config.cmd", c]
        session.run(args)
    return layout


def make_keys(session: Session) -> tuple[Path, Path]:
    """The owner's signing key pair (ECDSA P-256, cosign's kind)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = session.work / "image" / "cosign.key", session.work / "image" / "cosign.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )  # fmt: skip
    priv.chmod(0o600)
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, pub


def encrypt_sign_push(session: Session, kbs: Kbs, registry: str, layout: Path) -> Workload:
    priv, pub = make_keys(session)
    session.say(
        "The layer's key is made by coco keyprovider serve, which registers it in the KBS: it is "
        "never written to this disk."
    )
    port = free_port()
    session.spawn(
        "keyprovider",
        ["coco", "keyprovider", "serve", "--socket", f"127.0.0.1:{port}", "--kbs", kbs.url,
         "--auth-private-key", str(kbs.admin_key)],
        ready=listening(port),
        reach=f"gRPC keyprovider.KeyProviderService on 127.0.0.1:{port}",
    )  # fmt: skip
    ocicrypt = session.work / "image" / "ocicrypt.json"
    ocicrypt.write_text(
        json.dumps({"key-providers": {"attestation-agent": {"grpc": f"127.0.0.1:{port}"}}})
    )
    image = f"{registry}/demo/app:1"
    out = session.run(
        ["coco", "image", "copy", "-q", "--dest-tls-verify=false", "--insecure-policy",
         "--encryption-key", f"provider:attestation-agent:keyid={IMAGE_KEY}",
         "--sign-by-sigstore-private-key", str(priv),
         f"oci:{layout}:app", f"docker://{image}"],
        env={"OCICRYPT_KEYPROVIDER_CONFIG": str(ocicrypt)},
        what="encrypting, signing and pushing the image",
    )  # fmt: skip
    digest = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    pause = pause_image(registry)
    session.run(
        ["coco", "image", "copy", "-q", "--dest-tls-verify=false", "--insecure-policy",
         f"oci:{layout}:pause", f"docker://{pause}"],
        what="pushing the pause image",
    )  # fmt: skip
    raw = session.run(
        ["coco", "image", "inspect", "--tls-verify=false", "--raw", f"docker://{image}"],
        show=False,
    ).stdout
    manifest = json.loads(raw)
    layers = manifest.get("layers", [])
    if len(layers) != 1 or not layers[0]["mediaType"].endswith("+encrypted"):
        raise DemoError(f"expected one encrypted layer in {image}, found {layers}")
    keys = [k for k in layers[0].get("annotations", {}) if ".enc.keys." in k]
    session.say(f"the registry holds {layers[0]['mediaType']} (wrapped by {', '.join(keys)})")
    secret = base64.b32encode(os.urandom(10)).decode().lower()
    kbs.config(
        session, "set-resource", "--path", SECRET_PATH, "--resource-file",
        str(_write(session, "secret.txt", secret.encode())),
    )  # fmt: skip
    policy = {
        "default": [{"type": "reject"}],
        "transports": {
            "docker": {
                f"{registry}/demo": [
                    {"type": "sigstoreSigned", "keyPath": f"kbs:///{COSIGN_KEY_PATH}"}
                ],
                f"{registry}/demo/pause": [{"type": "insecureAcceptAnything"}],
            }
        },
    }
    kbs.config(session, "set-resource", "--path", COSIGN_KEY_PATH, "--resource-file", str(pub))
    kbs.config(
        session, "set-resource", "--path", POLICY_PATH, "--resource-file",
        str(_write(session, "policy.json", json.dumps(policy, indent=2).encode())),
    )  # fmt: skip
    return Workload(image, pause, digest, layers[0]["digest"], secret)


def _write(session: Session, name: str, data: bytes) -> Path:
    path = session.work / "kbs" / name
    path.write_bytes(data)
    path.chmod(0o600)
    return path
