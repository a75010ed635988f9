"""The "simple signing" payload and GPG signatures over it, made and checked with the real ``gpg``.

The payload is the JSON document containers/image calls an "atomic container signature"::

    {"critical": {"identity": {"docker-reference": "reg/repo:tag"},
                  "image": {"docker-manifest-digest": "sha256:..."},
                  "type": "atomic container signature"},
     "optional": {"creator": "...", "timestamp": 1700000000}}

The cosign (sigstore) format uses the same shape with type ``cosign container image signature``.
Parsing is strict: ``critical`` and its members must hold exactly these keys; ``optional`` is free.

GPG signatures are OpenPGP signed messages (the payload inside). Verification imports the policy's
keys into a temporary, isolated GNUPGHOME, runs ``gpg --status-fd`` and accepts only a message with
exactly one good signature (``GOODSIG`` + ``VALIDSIG``) and no bad, expired or revoked one; the
signing key's fingerprint is returned for the caller to check against the trusted set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coco.errors import SignatureError
from coco.jsonfields import Fields

ATOMIC_TYPE = "atomic container signature"
COSIGN_TYPE = "cosign container image signature"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$|^sha512:[0-9a-f]{128}$")
_FPR_RE = re.compile(r"^[0-9A-F]{40}$|^[0-9A-F]{64}$")
_GPG_TIMEOUT = 60


@dataclass(frozen=True, slots=True)
class Payload:
    """The signed claim: this manifest digest is the image called ``docker_reference``."""

    docker_reference: str
    manifest_digest: str
    type: str = ATOMIC_TYPE
    optional: dict[str, Any] | None = None

    def to_bytes(self, *, creator: str = "coco", timestamp: int | None = None) -> bytes:
        """Serialize (compact, keys sorted as Go's encoding/json writes maps)."""
        optional = dict(self.optional or {})
        optional.setdefault("creator", creator)
        optional.setdefault("timestamp", int(time.time()) if timestamp is None else timestamp)
        doc = {
            "critical": {
                "identity": {"docker-reference": self.docker_reference},
                "image": {"docker-manifest-digest": self.manifest_digest},
                "type": self.type,
            },
            "optional": optional,
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes, *, expected_type: str, where: str) -> Payload:
        """Strictly parse a payload; raise :class:`SignatureError` naming the bad field."""
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SignatureError(f"{where}: payload is not JSON: {e}") from None
        top = _FIELDS.check(doc, f"{where}: payload", required={"critical"}, optional={"optional"})
        crit = _FIELDS.check(
            top["critical"], f"{where}: critical", required={"identity", "image", "type"}
        )
        if crit["type"] != expected_type:
            raise SignatureError(
                f"{where}: critical.type: expected {expected_type!r}, found {crit['type']!r}"
            )
        ident = _FIELDS.check(
            crit["identity"], f"{where}: critical.identity", required={"docker-reference"}
        )
        image = _FIELDS.check(
            crit["image"], f"{where}: critical.image", required={"docker-manifest-digest"}
        )
        ref = _FIELDS.string(
            ident, "docker-reference", f"{where}: critical.identity", nonempty=True
        )
        digest = image["docker-manifest-digest"]
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise SignatureError(
                f"{where}: critical.image.docker-manifest-digest: expected sha256:<64 hex>, "
                f"found {digest!r}"
            )
        optional = top.get("optional") or {}  # cosign writes "optional": null
        if not isinstance(optional, dict):
            raise SignatureError(f"{where}: optional: expected an object, found {optional!r}")
        return cls(ref, digest, expected_type, optional)


_FIELDS = Fields(SignatureError)


def _gpg() -> str:
    path = shutil.which("gpg")
    if path is None:
        raise SignatureError("gpg: the gpg binary is not installed (apt-get install gnupg)")
    return path


def _run_gpg(
    home: str | os.PathLike[str], args: list[str], stdin: bytes, what: str
) -> tuple[bytes, list[list[str]], str]:
    """Run gpg with status lines on fd 3; return (stdout, status lines split, stderr)."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            [
                _gpg(),
                "--homedir",
                os.fspath(home),
                "--batch",
                "--no-tty",
                "--status-fd",
                str(w),
                *args,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(w,),
        )
    except OSError as e:
        os.close(r)
        os.close(w)
        raise SignatureError(f"{what}: cannot run gpg: {e}") from None
    os.close(w)
    with os.fdopen(r, "rb") as status_file:
        status_chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: status_chunks.append(status_file.read()))
        reader.start()
        try:
            out, err = proc.communicate(stdin, timeout=_GPG_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise SignatureError(f"{what}: gpg did not finish in {_GPG_TIMEOUT}s") from None
        finally:
            reader.join()
    status = [
        line[len("[GNUPG:] ") :].split(" ")
        for line in b"".join(status_chunks).decode("utf-8", "replace").splitlines()
        if line.startswith("[GNUPG:] ")
    ]
    if proc.returncode != 0 and not status:
        raise SignatureError(f"{what}: gpg failed: {_last_line(err)}")
    return out, status, err.decode("utf-8", "replace")


def _last_line(err: bytes | str) -> str:
    text = err.decode("utf-8", "replace") if isinstance(err, bytes) else err
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


class GpgKeyring:
    """A temporary, isolated GNUPGHOME holding only the given public keys. Use as a context."""

    def __init__(self, keyrings: Iterable[bytes], where: str) -> None:
        self.where = where
        self._home = tempfile.mkdtemp(prefix="coco-gpg-")
        os.chmod(self._home, 0o700)
        self.fingerprints: frozenset[str] = frozenset()
        try:
            fprs: set[str] = set()
            for data in keyrings:
                _out, status, err = _run_gpg(self._home, ["--import"], data, where)
                found = {s[2] for s in status if s[0] == "IMPORT_OK" and len(s) > 2}
                if not found:
                    raise SignatureError(
                        f"{where}: expected an OpenPGP public keyring, gpg imported no key "
                        f"({_last_line(err)})"
                    )
                fprs |= found
            self.fingerprints = frozenset(fprs)
        except BaseException:
            self.close()
            raise

    def verify(self, signature: bytes, where: str) -> tuple[bytes, str]:
        """Check one signed message; return (payload, primary key fingerprint) or raise."""
        out, status, err = _run_gpg(
            self._home, ["--no-auto-key-retrieve", "--decrypt"], signature, where
        )
        kinds = [s[0] for s in status]
        for bad in ("BADSIG", "ERRSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "DECRYPTION_FAILED"):
            if bad in kinds:
                detail = "the signing key is not in the policy's keyring" if bad == "ERRSIG" else ""
                raise SignatureError(
                    f"{where}: gpg reported {bad}" + (f": {detail}" if detail else "")
                )
        if kinds.count("NEWSIG") != 1 or kinds.count("GOODSIG") != 1:
            raise SignatureError(
                f"{where}: expected exactly one good OpenPGP signature, found "
                f"{kinds.count('GOODSIG')} ({_last_line(err)})"
            )
        valid = [s for s in status if s[0] == "VALIDSIG"]
        if len(valid) != 1 or len(valid[0]) < 11:
            raise SignatureError(f"{where}: gpg gave no VALIDSIG line for the signature")
        primary = valid[0][10]
        if not _FPR_RE.match(primary) or primary not in self.fingerprints:
            raise SignatureError(
                f"{where}: signed by key {primary}, which is not one of the policy's keys"
            )
        return out, primary

    def close(self) -> None:
        shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> GpgKeyring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gpg_sign(
    payload: bytes,
    fingerprint: str,
    *,
    gnupghome: str | os.PathLike[str] | None = None,
    passphrase_file: str | os.PathLike[str] | None = None,
) -> bytes:
    """Sign ``payload`` with the secret key ``fingerprint`` from ``gnupghome`` (default: the
    user's GNUPGHOME); return the OpenPGP signed message as skopeo writes it."""
    where = f"signing with key {fingerprint}"
    home = gnupghome or os.environ.get("GNUPGHOME") or Path.home() / ".gnupg"
    args = ["--local-user", fingerprint]
    if passphrase_file is not None:
        args += ["--pinentry-mode", "loopback", "--passphrase-file", os.fspath(passphrase_file)]
    out, status, err = _run_gpg(home, [*args, "--sign", "--output", "-"], payload, where)
    if not any(s[0] == "SIG_CREATED" for s in status) or not out:
        raise SignatureError(f"{where}: gpg made no signature: {_last_line(err)}")
    return out


def sign_simple(
    docker_reference: str,
    manifest_digest: str,
    fingerprint: str,
    *,
    gnupghome: str | os.PathLike[str] | None = None,
    passphrase_file: str | os.PathLike[str] | None = None,
) -> bytes:
    """A GPG simple-signing signature claiming ``manifest_digest`` is ``docker_reference``."""
    if not _DIGEST_RE.match(manifest_digest):
        raise SignatureError(
            f"signing {docker_reference}: expected a sha256:<hex> manifest digest, "
            f"found {manifest_digest!r}"
        )
    payload = Payload(docker_reference, manifest_digest).to_bytes(creator="coco")
    return gpg_sign(payload, fingerprint, gnupghome=gnupghome, passphrase_file=passphrase_file)


def check_secret_key(fingerprint: str, *, gnupghome: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`SignatureError` unless ``gnupghome`` holds the secret key ``fingerprint``
    (so a copy can refuse before it writes anything)."""
    home = gnupghome or os.environ.get("GNUPGHOME") or Path.home() / ".gnupg"
    where = f"--sign-by {fingerprint}"
    try:
        r = subprocess.run(
            [
                _gpg(),
                "--homedir",
                os.fspath(home),
                "--batch",
                "--with-colons",
                "--list-secret-keys",
                "--",
                fingerprint,
            ],
            capture_output=True,
            timeout=_GPG_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SignatureError(f"{where}: cannot run gpg: {e}") from None
    if r.returncode != 0 or b"\nsec:" not in b"\n" + r.stdout:
        raise SignatureError(f"{where}: expected a secret key in {home}, gpg found none")
