"""Strict parsing of the containers ``policy.json`` format (containers-policy.json(5) subset).

One class per spec object; unknown fields and types are refused with the field named::

    {"default": [{"type": "reject"}],
     "transports": {"docker": {"reg.example.com/app": [{"type": "signedBy", "keyType": "GPGKeys",
                                                      "keyPath": "/keys/app.gpg"}],
                               "*.example.com": [{"type": "insecureAcceptAnything"}]}}}

Requirements: ``insecureAcceptAnything``, ``reject``, ``signedBy`` (GPG simple signing) and
``sigstoreSigned`` (cosign format, ECDSA P-256 public key). Identity rules (``signedIdentity``):
``matchExact``, ``matchRepoDigestOrExact`` (the default), ``matchRepository``, ``exactReference``,
``exactRepository`` and ``remapIdentity``. Scope matching lives in :func:`scope_candidates`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from coco import jsonio
from coco.errors import PolicyError, UsageError
from coco.jsonfields import Fields, kind
from coco.oci.reference import DockerReference, parse_docker

KeyLoader = Callable[[str], bytes]
"""Turns a ``keyPath`` that is not a local file (``kbs:///…``) into key bytes."""

DOCKER_TRANSPORTS = ("docker", "atomic")
PATH_TRANSPORTS = ("oci", "dir", "oci-archive", "docker-archive", "sif", "tarball")
OTHER_TRANSPORTS = ("docker-daemon", "containers-storage")
TRANSPORTS = DOCKER_TRANSPORTS + PATH_TRANSPORTS + OTHER_TRANSPORTS
_WILDCARD_RE = re.compile(r"^\*\.[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


# ---------------------------------------------------------------- identities


def canonical(ref: DockerReference) -> str:
    """``host/repo[:tag][@digest]`` without the transport, as signatures write it."""
    s = ref.name
    if ref.tag:
        s += ":" + ref.tag
    if ref.digest:
        s += "@" + ref.digest
    return s


def parse_identity(text: str, where: str) -> DockerReference:
    """A ``docker-reference`` as signatures and identity rules write it (no transport)."""
    try:
        return parse_docker(text, original=text)
    except UsageError as e:
        raise PolicyError(f"{where}: invalid docker reference: {e}") from None


@dataclass(frozen=True, slots=True)
class MatchExact:
    type = "matchExact"

    def matches(self, image: DockerReference, signed: DockerReference) -> bool:
        if image.digest or not image.tag:
            return False
        return canonical(image) == canonical(signed)


@dataclass(frozen=True, slots=True)
class MatchRepoDigestOrExact:
    type = "matchRepoDigestOrExact"

    def matches(self, image: DockerReference, signed: DockerReference) -> bool:
        if image.digest:
            return image.name == signed.name
        return canonical(image) == canonical(signed)


@dataclass(frozen=True, slots=True)
class MatchRepository:
    type = "matchRepository"

    def matches(self, image: DockerReference, signed: DockerReference) -> bool:
        return image.name == signed.name


@dataclass(frozen=True, slots=True)
class ExactReference:
    docker_reference: DockerReference
    type = "exactReference"

    def matches(self, image: DockerReference, signed: DockerReference) -> bool:
        return canonical(self.docker_reference) == canonical(signed)


@dataclass(frozen=True, slots=True)
class ExactRepository:
    docker_repository: DockerReference
    type = "exactRepository"

    def matches(self, image: DockerReference, signed: DockerReference) -> bool:
        return self.docker_repository.name == signed.name


@dataclass(frozen=True, slots=True)
class RemapIdentity:
    """If the image's name starts with ``prefix``, use ``signed_prefix`` instead, then behave as
    matchRepoDigestOrExact."""

    prefix: str
    signed_prefix: str
    type = "remapIdentity"

    def matches(self, image: DockerReference, signed: DockerReference) -> bool:
        name = image.name
        if name == self.prefix or name.startswith(self.prefix.rstrip("/") + "/"):
            new = self.signed_prefix + name[len(self.prefix) :]
            try:
                host, _, repo = new.partition("/")
                image = DockerReference(host, repo, image.tag, image.digest)
            except ValueError:  # pragma: no cover - dataclass never raises
                return False
        return MatchRepoDigestOrExact().matches(image, signed)


Identity = (
    MatchExact
    | MatchRepoDigestOrExact
    | MatchRepository
    | ExactReference
    | ExactRepository
    | RemapIdentity
)


def _parse_identity_rule(doc: object, where: str) -> Identity:
    d = _fields(doc, where, required={"type"}, optional=None)
    t = d["type"]
    if t in ("matchExact", "matchRepoDigestOrExact", "matchRepository"):
        _fields(doc, where, required={"type"}, optional=set())
        return {
            "matchExact": MatchExact,
            "matchRepoDigestOrExact": MatchRepoDigestOrExact,
            "matchRepository": MatchRepository,
        }[t]()
    if t == "exactReference":
        d = _fields(doc, where, required={"type", "dockerReference"}, optional=set())
        ref = parse_identity(_str(d, "dockerReference", where), f"{where}.dockerReference")
        if not ref.tag and not ref.digest:
            raise PolicyError(
                f"{where}.dockerReference: expected a reference with a tag or digest, "
                f"found {d['dockerReference']!r}"
            )
        return ExactReference(ref)
    if t == "exactRepository":
        d = _fields(doc, where, required={"type", "dockerRepository"}, optional=set())
        text = _str(d, "dockerRepository", where)
        ref = parse_identity(text, f"{where}.dockerRepository")
        if ref.tag or ref.digest:
            raise PolicyError(
                f"{where}.dockerRepository: expected a repository without tag or digest, "
                f"found {text!r}"
            )
        return ExactRepository(ref)
    if t == "remapIdentity":
        d = _fields(doc, where, required={"type", "prefix", "signedPrefix"}, optional=set())
        prefix = _prefix(_str(d, "prefix", where), f"{where}.prefix")
        signed = _prefix(_str(d, "signedPrefix", where), f"{where}.signedPrefix")
        return RemapIdentity(prefix, signed)
    raise PolicyError(
        f"{where}.type: expected one of matchExact, matchRepoDigestOrExact, matchRepository, "
        f"exactReference, exactRepository, remapIdentity; found {t!r}"
    )


def _prefix(text: str, where: str) -> str:
    """A remapIdentity prefix: ``host``, ``host/namespace`` or ``host/repo`` (no tag/digest)."""
    if "@" in text or not text:
        raise PolicyError(f"{where}: expected host[/namespace], found {text!r}")
    host, _, rest = text.partition("/")
    if "." not in host and ":" not in host and host != "localhost":
        raise PolicyError(f"{where}: expected a prefix with an explicit registry host, {text!r}")
    if rest and ":" in rest:
        raise PolicyError(f"{where}: expected no tag in a prefix, found {text!r}")
    return text


# ---------------------------------------------------------------- requirements


@dataclass(frozen=True, slots=True)
class InsecureAcceptAnything:
    type = "insecureAcceptAnything"


@dataclass(frozen=True, slots=True)
class Reject:
    type = "reject"


@dataclass(frozen=True, slots=True)
class KeySource:
    """Where a requirement's keys come from: files (or ``kbs://`` URIs) or inline bytes."""

    paths: tuple[str, ...] = ()
    data: tuple[bytes, ...] = ()

    def load(self, where: str, loader: KeyLoader | None = None) -> list[bytes]:
        out = list(self.data)
        for p in self.paths:
            if p.startswith(("kbs://", "kbs+")):
                if loader is None:
                    raise PolicyError(
                        f"{where}: key {p!r} needs a KBS resource loader, none is configured"
                    )
                out.append(loader(p))
                continue
            path = p[len("file://") :] if p.startswith("file://") else p
            try:
                out.append(Path(path).read_bytes())
            except OSError as e:
                raise PolicyError(f"{where}: cannot read key file {path}: {e.strerror}") from None
        return out


@dataclass(frozen=True, slots=True)
class SignedBy:
    keys: KeySource
    signed_identity: Identity = field(default_factory=MatchRepoDigestOrExact)
    type = "signedBy"


@dataclass(frozen=True, slots=True)
class SigstoreSigned:
    keys: KeySource
    signed_identity: Identity = field(default_factory=MatchRepoDigestOrExact)
    type = "sigstoreSigned"


Requirement = InsecureAcceptAnything | Reject | SignedBy | SigstoreSigned


def _keys(d: dict, where: str, base: Path | None, *, single: str, plural: str) -> KeySource:
    given = [k for k in ("keyPath", "keyPaths", "keyData") if k in d]
    if len(given) != 1:
        raise PolicyError(
            f"{where}: expected exactly one of keyPath, {plural}keyData; found "
            + (", ".join(given) if given else "none")
        )
    k = given[0]
    if k == "keyPath":
        return KeySource(paths=(_path(_str(d, k, where), base),))
    if k == "keyPaths":
        v = d[k]
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise PolicyError(f"{where}.keyPaths: expected a non-empty list of paths, found {v!r}")
        return KeySource(paths=tuple(_path(x, base) for x in v))
    text = _str(d, "keyData", where)
    if single == "base64":
        try:
            return KeySource(data=(base64.b64decode(text, validate=True),))
        except binascii.Error:
            raise PolicyError(f"{where}.keyData: expected base64, found {text[:20]!r}…") from None
    return KeySource(data=(text.encode(),))


def _path(p: str, base: Path | None) -> str:
    if p.startswith(("kbs://", "kbs+", "file://")) or Path(p).is_absolute() or base is None:
        return p
    return str(base / p)


def _parse_requirement(doc: object, where: str, base: Path | None) -> Requirement:
    d = _fields(doc, where, required={"type"}, optional=None)
    t = d["type"]
    if t == "insecureAcceptAnything":
        _fields(doc, where, required={"type"}, optional=set())
        return InsecureAcceptAnything()
    if t == "reject":
        _fields(doc, where, required={"type"}, optional=set())
        return Reject()
    if t == "signedBy":
        d = _fields(
            doc,
            where,
            required={"type", "keyType"},
            optional={"keyPath", "keyPaths", "keyData", "signedIdentity"},
        )
        if d["keyType"] != "GPGKeys":
            raise PolicyError(f"{where}.keyType: expected 'GPGKeys', found {d['keyType']!r}")
        keys = _keys(d, where, base, single="base64", plural="keyPaths, ")
        ident = (
            _parse_identity_rule(d["signedIdentity"], f"{where}.signedIdentity")
            if "signedIdentity" in d
            else MatchRepoDigestOrExact()
        )
        return SignedBy(keys, ident)
    if t == "sigstoreSigned":
        for unsupported in ("fulcio", "rekorPublicKeyPath", "rekorPublicKeyData", "pki"):
            if isinstance(doc, dict) and unsupported in doc:
                raise PolicyError(
                    f"{where}.{unsupported}: keyless (Fulcio/Rekor/PKI) verification is not "
                    "supported; use keyPath or keyData with an ECDSA P-256 public key"
                )
        d = _fields(
            doc, where, required={"type"}, optional={"keyPath", "keyData", "signedIdentity"}
        )
        keys = _keys(d, where, base, single="pem", plural="")
        ident = (
            _parse_identity_rule(d["signedIdentity"], f"{where}.signedIdentity")
            if "signedIdentity" in d
            else MatchRepoDigestOrExact()
        )
        return SigstoreSigned(keys, ident)
    raise PolicyError(
        f"{where}.type: expected one of insecureAcceptAnything, reject, signedBy, "
        f"sigstoreSigned; found {t!r}"
    )


def _parse_requirements(doc: object, where: str, base: Path | None) -> tuple[Requirement, ...]:
    if not isinstance(doc, list):
        raise PolicyError(f"{where}: expected a list of requirements, found {kind(doc)}")
    if not doc:
        raise PolicyError(f"{where}: expected at least one requirement, found an empty list")
    return tuple(_parse_requirement(r, f"{where}[{i}]", base) for i, r in enumerate(doc))


# ---------------------------------------------------------------- policy


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed policy.json: the default requirements and, per transport, per scope."""

    default: tuple[Requirement, ...]
    transports: dict[str, dict[str, tuple[Requirement, ...]]]

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise PolicyError(f"{p}: cannot read policy: {e.strerror}") from None
        return cls.from_bytes(data, where=str(p), base=p.resolve().parent)

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "policy.json", base: Path | None = None):
        doc = jsonio.loads(data, what=where, error=PolicyError)
        d = _fields(doc, where, required={"default"}, optional={"transports"})
        default = _parse_requirements(d["default"], f"{where}: default", base)
        transports: dict[str, dict[str, tuple[Requirement, ...]]] = {}
        tdoc = d.get("transports", {})
        if not isinstance(tdoc, dict):
            raise PolicyError(f"{where}: transports: expected an object, found {kind(tdoc)}")
        for tname, scopes in tdoc.items():
            tw = f"{where}: transports.{tname}"
            if tname not in TRANSPORTS:
                raise PolicyError(
                    f"{tw}: unknown transport {tname!r} (expected one of {', '.join(TRANSPORTS)})"
                )
            if not isinstance(scopes, dict):
                raise PolicyError(f"{tw}: expected an object of scopes, found {kind(scopes)}")
            parsed: dict[str, tuple[Requirement, ...]] = {}
            for scope, reqs in scopes.items():
                _check_scope(tname, scope, f"{tw}[{scope!r}]")
                parsed[scope] = _parse_requirements(reqs, f"{tw}[{scope!r}]", base)
            transports[tname] = parsed
        return cls(default, transports)

    def requirements_for(self, transport: str, candidates: list[str]) -> tuple[str, tuple]:
        """The most specific scope among ``candidates`` (ordered most specific first) that the
        policy names for ``transport``, else ``""`` of the transport, else ``default``; returns
        (scope description, requirements)."""
        scopes = self.transports.get(transport, {})
        for c in candidates:
            if c in scopes:
                return f"transports.{transport}[{c!r}]", scopes[c]
        if "" in scopes:
            return f"transports.{transport}['']", scopes[""]
        return "default", self.default


def _check_scope(transport: str, scope: str, where: str) -> None:
    if scope == "":
        return
    if transport in DOCKER_TRANSPORTS:
        if scope.startswith("*"):
            if not _WILDCARD_RE.match(scope):
                raise PolicyError(f"{where}: invalid wildcard scope (expected *.domain)")
            return
        host, sep, _ = scope.partition("/")
        if not sep and ("." in host or ":" in host or host == "localhost"):
            return
        try:
            parse_docker(scope, original=scope)
        except UsageError as e:
            raise PolicyError(f"{where}: invalid scope: {e}") from None
        if not sep or ("." not in host and ":" not in host and host != "localhost"):
            raise PolicyError(f"{where}: expected a scope with an explicit registry host")
    elif transport in PATH_TRANSPORTS and not scope.startswith("/"):
        raise PolicyError(f"{where}: expected an absolute path scope")


def docker_scope_candidates(ref: DockerReference) -> list[str]:
    """Scopes that could name ``ref``, most specific first: the full reference, the repository,
    each parent namespace, the host, then ``*.`` wildcards of the host's parent domains."""
    out = [canonical(ref)]
    name = ref.name
    while True:
        out.append(name)
        cut = name.rfind("/")
        if cut < 0:
            break
        name = name[:cut]
    host = "" if ref.registry.startswith("[") else ref.registry.split(":")[0]
    while "." in host:
        host = host.partition(".")[2]
        out.append("*." + host)
    return _dedupe(out)


def path_scope_candidates(path: str, tag: str | None) -> list[str]:
    """Scopes for a path transport (``oci:/dir:tag``): ``/dir:tag``, ``/dir``, then parents."""
    p = str(Path(path).resolve())
    out = [f"{p}:{tag}"] if tag else []
    cur = Path(p)
    out.append(str(cur))
    for parent in cur.parents:
        out.append(str(parent))
    return _dedupe(out)


def _dedupe(items: list[str]) -> list[str]:
    seen: set[str] = set()
    return [x for x in items if not (x in seen or seen.add(x))]


# ---------------------------------------------------------------- helpers


_FIELDS = Fields(PolicyError)


def _str(d: dict, key: str, where: str) -> str:
    return _FIELDS.string(d, key, where, nonempty=True)


def _fields(doc: object, where: str, *, required: set[str], optional: set[str] | None) -> dict:
    return _FIELDS.check(doc, where, required=required, optional=optional)


def iter_requirements(policy: Policy) -> Iterator[Requirement]:
    """Every requirement in the policy (to preload keys)."""
    yield from policy.default
    for scopes in policy.transports.values():
        for reqs in scopes.values():
            yield from reqs
