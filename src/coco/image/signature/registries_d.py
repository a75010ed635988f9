"""The containers ``registries.d`` configuration and the signature "lookaside" storage layout.

A registries.d directory holds YAML files (``*.yaml``)::

    default-docker:
      lookaside: file:///var/lib/sigs
    docker:
      reg.example.com/team:
        lookaside: https://sigs.example.com/team
        lookaside-staging: file:///srv/sigs-staging
        use-sigstore-attachments: true

``sigstore`` / ``sigstore-staging`` are the legacy names of ``lookaside`` / ``lookaside-staging``
(giving both spellings in one entry is refused). The most specific ``docker`` scope wins (full
reference, repository, parent namespaces, host), then ``default-docker``.

Signatures for manifest ``sha256:HEX`` of ``host/path/repo`` live at
``<base>/path/repo@sha256=HEX/signature-N``, N from 1 upward until one is missing (the layout
skopeo writes and reads). Only ``file://`` bases are read and written here; other URLs are named
in a clear error so a registry client can take over.
"""

from __future__ import annotations

import os
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from coco import yamlio
from coco.errors import PolicyError, SignatureError
from coco.image.signature.policy import docker_scope_candidates
from coco.oci.reference import DockerReference

_ENTRY_KEYS = {
    "lookaside",
    "lookaside-staging",
    "sigstore",
    "sigstore-staging",
    "use-sigstore-attachments",
}
_MAX_SIGNATURES = 1000


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """One ``docker`` (or ``default-docker``) entry of registries.d."""

    lookaside: str | None = None
    lookaside_staging: str | None = None
    use_sigstore_attachments: bool = False

    @property
    def write_url(self) -> str | None:
        """Where new signatures go: staging if set, else the read URL."""
        return self.lookaside_staging or self.lookaside


def _parse_entry(doc: object, where: str) -> RegistryEntry:
    if doc is None:
        return RegistryEntry()
    if not isinstance(doc, dict):
        raise PolicyError(f"{where}: expected a mapping, found {type(doc).__name__}")
    unknown = sorted(str(k) for k in set(doc) - _ENTRY_KEYS)
    if unknown:
        raise PolicyError(f"{where}: unknown field {unknown[0]!r}")
    vals: dict[str, str | None] = {}
    for new, old in (("lookaside", "sigstore"), ("lookaside-staging", "sigstore-staging")):
        if new in doc and old in doc:
            raise PolicyError(f"{where}: both {new!r} and its legacy name {old!r} are set")
        v = doc.get(new, doc.get(old))
        if v is not None and (not isinstance(v, str) or not v):
            raise PolicyError(f"{where}.{new}: expected a URL string, found {v!r}")
        if v is not None:
            scheme = urllib.parse.urlsplit(v).scheme
            if scheme not in ("file", "http", "https"):
                raise PolicyError(
                    f"{where}.{new}: expected a file://, http:// or https:// URL, found {v!r}"
                )
        vals[new] = v
    att = doc.get("use-sigstore-attachments", False)
    if not isinstance(att, bool):
        raise PolicyError(f"{where}.use-sigstore-attachments: expected true/false, found {att!r}")
    return RegistryEntry(vals["lookaside"], vals["lookaside-staging"], att)


@dataclass(frozen=True, slots=True)
class RegistriesD:
    """All registries.d files of a directory, merged (a scope given twice is refused)."""

    default_docker: RegistryEntry | None
    docker: dict[str, RegistryEntry]

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> RegistriesD:
        d = Path(directory)
        if not d.exists():  # as containers/image: a missing directory configures nothing
            return cls(None, {})
        if not d.is_dir():
            raise PolicyError(f"{d}: expected a registries.d directory, found something else")
        default: RegistryEntry | None = None
        default_from = ""
        docker: dict[str, RegistryEntry] = {}
        origin: dict[str, str] = {}
        for f in sorted(d.iterdir()):
            if f.suffix != ".yaml" or not f.is_file():
                continue
            where = str(f)
            try:
                raw = f.read_bytes()
            except OSError as e:
                raise PolicyError(f"{where}: cannot read it: {e.strerror or e}") from None
            doc = yamlio.load(raw, what=where, error=PolicyError)
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise PolicyError(f"{where}: expected a mapping, found {type(doc).__name__}")
            unknown = sorted(str(k) for k in set(doc) - {"default-docker", "docker"})
            if unknown:
                raise PolicyError(f"{where}: unknown field {unknown[0]!r}")
            if "default-docker" in doc:
                if default is not None:
                    raise PolicyError(
                        f"{where}: default-docker is also set in {default_from}; set it once"
                    )
                default = _parse_entry(doc["default-docker"], f"{where}: default-docker")
                default_from = where
            scopes = doc.get("docker") or {}
            if not isinstance(scopes, dict):
                raise PolicyError(f"{where}: docker: expected a mapping of scopes")
            for scope, entry in scopes.items():
                if scope in docker:
                    raise PolicyError(
                        f"{where}: docker[{scope!r}] is also set in {origin[scope]}; set it once"
                    )
                docker[str(scope)] = _parse_entry(entry, f"{where}: docker[{scope!r}]")
                origin[str(scope)] = where
        return cls(default, docker)

    def entry_for(self, ref: DockerReference) -> RegistryEntry:
        """The most specific entry for ``ref`` (an empty one if nothing matches)."""
        for c in docker_scope_candidates(ref):
            if c in self.docker:
                return self.docker[c]
        return self.default_docker or RegistryEntry()


def signature_dir(base_url: str, ref: DockerReference, manifest_digest: str) -> Path:
    """The lookaside directory for one manifest: ``<base>/<repo path>@sha256=<hex>``."""
    u = urllib.parse.urlsplit(base_url)
    if u.scheme != "file":
        raise SignatureError(
            f"lookaside {base_url!r}: only file:// URLs are read and written here, found "
            f"{u.scheme}://"
        )
    alg, _, hexpart = manifest_digest.partition(":")
    path = urllib.parse.unquote(u.path).rstrip("/") or "/"
    return Path(path) / f"{ref.repository}@{alg}={hexpart}"


def read_lookaside(base_url: str, ref: DockerReference, manifest_digest: str) -> list[bytes]:
    """Every ``signature-N`` for the manifest, in order (stops at the first missing N)."""
    d = signature_dir(base_url, ref, manifest_digest)
    out: list[bytes] = []
    for n in range(1, _MAX_SIGNATURES + 1):
        try:
            out.append((d / f"signature-{n}").read_bytes())
        except FileNotFoundError:
            break
        except OSError as e:
            raise SignatureError(f"{d}/signature-{n}: cannot read: {e.strerror}") from None
    return out


def write_lookaside(
    base_url: str, ref: DockerReference, manifest_digest: str, signature: bytes
) -> Path:
    """Store ``signature`` as the next free ``signature-N``; return its path. The file appears
    whole (written to a temporary name, then linked in place without overwriting)."""
    d = signature_dir(base_url, ref, manifest_digest)
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".signature-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(signature)
            f.flush()
            os.fsync(f.fileno())
        for n in range(1, _MAX_SIGNATURES + 1):
            target = d / f"signature-{n}"
            try:
                os.link(tmp, target)
            except FileExistsError:
                continue
            return target
        raise SignatureError(f"{d}: already holds {_MAX_SIGNATURES} signatures")
    finally:
        os.unlink(tmp)
