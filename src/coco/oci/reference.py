"""Image references as the CLI takes them: ``oci:PATH[:TAG]`` and
``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`` (with Docker Hub short names normalized)."""

from __future__ import annotations

import re

from coco.crypto.digest import Digest
from coco.errors import ManifestError, UsageError
from coco.record import record

DOCKER_HUB = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?$"
)


@record
class LayoutReference:
    """``oci:PATH[:TAG]``: an image in an OCI layout directory (TAG is its ref.name)."""

    path: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")


@record
class DockerReference:
    """``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]``: an image in a registry."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if given, else the tag (default latest)."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        s = f"docker://{self.registry}/{self.repository}"
        if self.digest:
            return s + "@" + self.digest
        return s + ":" + (self.tag or "latest")


ImageReference = LayoutReference | DockerReference


def parse_reference(text: str) -> ImageReference:
    """Parse a transport-qualified reference; raise :class:`UsageError` naming what is wrong."""
    if text.startswith("oci:"):
        rest = text[4:]
        path, sep, tag = rest.partition(":")
        if not path:
            raise UsageError(f"{text!r}: expected oci:PATH[:TAG], the path is empty")
        if sep and not tag:
            raise UsageError(f"{text!r}: empty tag after ':'")
        return LayoutReference(path, tag or None)
    if text.startswith("docker://"):
        return parse_docker(text[len("docker://") :], original=text)
    transport = text.partition(":")[0] if ":" in text else ""
    raise UsageError(
        f"{text!r}: unsupported transport {transport!r}: expected oci:PATH[:TAG] or "
        "docker://HOST[:PORT]/REPO[:TAG|@DIGEST]"
        if transport
        else f"{text!r}: expected oci:PATH[:TAG] or docker://HOST[:PORT]/REPO[:TAG|@DIGEST]"
    )


def parse_docker(text: str, original: str | None = None) -> DockerReference:
    """Parse ``HOST[:PORT]/REPO[:TAG|@DIGEST]`` (no transport prefix), Docker-style."""
    where = repr(original or text)
    if text.startswith("//") or not text:
        raise UsageError(f"{where}: expected docker://HOST[:PORT]/REPO[:TAG|@DIGEST]")
    name, at, digest = text.partition("@")
    if at:
        try:
            digest = str(Digest.parse(digest, f"{where}: digest"))
        except ManifestError as e:
            raise UsageError(str(e)) from None
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise UsageError(f"{where}: invalid tag {tag!r}")
    if tag and digest:
        raise UsageError(f"{where}: a reference with both a tag and a digest is not supported")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, repo = first, rest
        if not _HOST_RE.match(registry):
            raise UsageError(f"{where}: invalid registry host {registry!r}")
    else:
        registry, repo = DOCKER_HUB, name
        if "/" not in repo:
            repo = "library/" + repo
    if not _REPO_RE.match(repo):
        raise UsageError(
            f"{where}: invalid repository name {repo!r} (lowercase letters, digits, separators)"
        )
    return DockerReference(registry, repo, tag, digest or None)
