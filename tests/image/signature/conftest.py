"""Fixtures for the signature tests: throwaway GPG keys (real ``gpg``), a P-256 key pair, an image
pushed to the real ``docker-registry`` and a skopeo runner with an explicit policy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.imagekit import tar_layer, write_image


@dataclass
class GpgKey:
    home: Path
    fingerprint: str
    public: Path  # exported public keyring (binary)
    public_armored: Path


def make_gpg_key(base: Path, name: str) -> GpgKey:
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    home = base / f"gnupg-{name}"
    home.mkdir(mode=0o700)
    env = ["gpg", "--homedir", str(home), "--batch"]
    subprocess.run(
        [
            *env,
            "--passphrase",
            "",
            "--quick-gen-key",
            f"{name} <{name}@example.com>",
            "ed25519",
            "sign",
            "never",
        ],
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        [*env, "--with-colons", "--list-secret-keys"], check=True, capture_output=True, text=True
    ).stdout
    fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
    pub = base / f"{name}.gpg"
    pub.write_bytes(subprocess.run([*env, "--export", fpr], check=True, capture_output=True).stdout)
    arm = base / f"{name}.asc"
    arm.write_bytes(
        subprocess.run([*env, "--armor", "--export", fpr], check=True, capture_output=True).stdout
    )
    return GpgKey(home, fpr, pub, arm)


@pytest.fixture(scope="session")
def gpg_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GpgKey, GpgKey]]:
    """Two unrelated signing keys, each in its own GNUPGHOME."""
    base = tmp_path_factory.mktemp("gpg")
    keys = (make_gpg_key(base, "alice"), make_gpg_key(base, "mallory"))
    yield keys
    for k in keys:
        subprocess.run(
            ["gpgconf", "--homedir", str(k.home), "--kill", "gpg-agent"], capture_output=True
        )


@dataclass
class EcKey:
    private_pem: bytes
    public_pem: bytes


def make_ec_key(passphrase: bytes | None = None) -> EcKey:
    k = ec.generate_private_key(ec.SECP256R1())
    enc = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    priv = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    pub = k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return EcKey(priv, pub)


@pytest.fixture(scope="session")
def oci_image(tmp_path_factory: pytest.TempPathFactory):
    """A small single-layer image in an OCI layout (tag v1)."""
    path = tmp_path_factory.mktemp("sig-img") / "layout"
    return write_image(path, [tar_layer({"etc/motd": b"signed\n"})], tag="v1")


def skopeo(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    full_env = {**os.environ, **(env or {})}
    r = subprocess.run(
        ["skopeo", *args], capture_output=True, text=True, check=False, timeout=60, env=full_env
    )
    if check and r.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed: {r.stderr}")
    return r


def write_policy(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="session")
def accept_all_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_policy(
        tmp_path_factory.mktemp("acc") / "policy.json",
        {"default": [{"type": "insecureAcceptAnything"}]},
    )
