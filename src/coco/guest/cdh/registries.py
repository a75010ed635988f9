"""The registry configuration of a CDH pull (registries.conf v2 subset, as image-rs reads it).

::

    unqualified-search-registries = ["docker.io", "example1.com"]
    [[registry]]
    prefix = "example.com/foo"      # what references it applies to (default: its location)
    location = "internal/bar"       # where to pull from instead
    insecure = false                # plain HTTP / unverified TLS
    blocked = false                 # refuse every pull it matches
    [[registry.mirror]]
    location = "example-mirror-0.local/mirror-for-foo"
    insecure = false

:meth:`RegistryConfig.candidates` turns an image reference into the ordered places to try: for a
short Docker Hub name one per unqualified-search registry; then for each, the mirrors of the most
specific matching rule first, then its ``location`` (or the original), each with the name it
stands for (``logical``: the reference asked for, or its unqualified-search expansion), which the
signature policy is held against. Blocked rules drop their places; when nothing is left the pull
is refused.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coco.errors import UsageError
from coco.guest.cdh.errors import CdhConfigError, CdhError
from coco.oci.reference import DockerReference, parse_docker

_TOP = {"unqualified-search-registries", "registry"}
_REGISTRY = {"prefix", "location", "insecure", "blocked", "mirror"}
_MIRROR = {"location", "insecure"}


@dataclass(frozen=True, slots=True)
class Place:
    """One place to pull from: the reference to fetch and whether TLS is verified."""

    reference: DockerReference
    insecure: bool = False
    logical: DockerReference | None = None  # the name asked for (what the policy sees)


@dataclass(frozen=True, slots=True)
class _Mirror:
    location: str
    insecure: bool


@dataclass(frozen=True, slots=True)
class _Rule:
    prefix: str
    location: str
    insecure: bool
    blocked: bool
    mirrors: tuple[_Mirror, ...]


def _fields(doc: Any, keys: set[str], where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise CdhConfigError(f"{where}: expected a table, found {type(doc).__name__}")
    unknown = sorted(set(doc) - keys)
    if unknown:
        raise CdhConfigError(
            f"{where}: unknown key {unknown[0]!r} (expected one of {', '.join(sorted(keys))})"
        )
    return doc


def _bool(d: Mapping[str, Any], key: str, where: str) -> bool:
    v = d.get(key, False)
    if not isinstance(v, bool):
        raise CdhConfigError(f"{where}.{key}: expected true or false, found {v!r}")
    return v


def _str(d: Mapping[str, Any], key: str, where: str) -> str:
    v = d.get(key, "")
    if not isinstance(v, str):
        raise CdhConfigError(f"{where}.{key}: expected a string, found {v!r}")
    return v


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """A parsed registry configuration."""

    search: tuple[str, ...]
    rules: tuple[_Rule, ...]

    @classmethod
    def parse(cls, doc: Any, where: str) -> RegistryConfig:
        d = _fields(doc, _TOP, where)
        search = d.get("unqualified-search-registries", ["docker.io"])
        if not isinstance(search, list) or not all(isinstance(s, str) and s for s in search):
            raise CdhConfigError(
                f"{where}: unqualified-search-registries: expected an array of registry names"
            )
        regs = d.get("registry", [])
        if not isinstance(regs, list):
            raise CdhConfigError(f"{where}: registry: expected an array of tables ([[registry]])")
        rules = []
        for i, r in enumerate(regs):
            rw = f"{where}: registry[{i}]"
            rd = _fields(r, _REGISTRY, rw)
            prefix, location = _str(rd, "prefix", rw), _str(rd, "location", rw)
            if not prefix and not location:
                raise CdhConfigError(f"{rw}: expected a prefix or a location, found neither")
            mirrors_doc = rd.get("mirror", [])
            if not isinstance(mirrors_doc, list):
                raise CdhConfigError(f"{rw}.mirror: expected an array of tables")
            mirrors = []
            for j, m in enumerate(mirrors_doc):
                mw = f"{rw}.mirror[{j}]"
                md = _fields(m, _MIRROR, mw)
                loc = _str(md, "location", mw)
                if not loc:
                    raise CdhConfigError(f"{mw}.location: expected a registry location")
                mirrors.append(_Mirror(loc, _bool(md, "insecure", mw)))
            rules.append(
                _Rule(
                    prefix or location,
                    location or prefix,
                    _bool(rd, "insecure", rw),
                    _bool(rd, "blocked", rw),
                    tuple(mirrors),
                )
            )
        return cls(tuple(search), tuple(rules))

    @classmethod
    def from_toml(cls, data: bytes, where: str) -> RegistryConfig:
        try:
            doc = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise CdhConfigError(
                f"{where}: expected a registries.conf TOML document: {e}"
            ) from None
        return cls.parse(doc, where)

    def _rule_for(self, name: str) -> _Rule | None:
        best = None
        for r in self.rules:
            p = r.prefix
            hit = name == p or name.startswith(p.rstrip("/") + "/")
            if hit and (best is None or len(p) > len(best.prefix)):
                best = r
        return best

    def candidates(self, image: str) -> list[Place]:
        """The places to pull ``image`` from, in order; refuses when every one is blocked."""
        ref = _parse(image)
        bases = [ref]
        if _is_short(image) and ref.registry == "docker.io":
            bases = [
                ref if s == "docker.io" else _replace_name(ref, ref.name, f"{s}/{ref.repository}")
                for s in self.search
            ]
        places: list[Place] = []
        for base in bases:
            rule = self._rule_for(base.name)
            if rule is None:
                places.append(Place(base, logical=base))
                continue
            if rule.blocked:
                continue
            for m in rule.mirrors:
                where = _replace_name(base, rule.prefix, m.location)
                places.append(Place(where, m.insecure, base))
            where = _replace_name(base, rule.prefix, rule.location)
            places.append(Place(where, rule.insecure, base))
        if not places:
            raise CdhError(f"image {image} is blocked by the registry configuration")
        return places


def _parse(image: str) -> DockerReference:
    text = image.removeprefix("docker://")
    try:
        return parse_docker(text, original=image)
    except UsageError as e:
        raise CdhError(f"image {image!r}: {e}") from None


def _is_short(image: str) -> bool:
    first, sep, _ = image.removeprefix("docker://").partition("/")
    return not sep or not ("." in first or ":" in first or first == "localhost")


def _replace_name(ref: DockerReference, prefix: str, location: str) -> DockerReference:
    name = location.rstrip("/") + ref.name[len(prefix.rstrip("/")) :]
    tail = f"@{ref.digest}" if ref.digest else f":{ref.tag}" if ref.tag else ""
    try:
        return parse_docker(name + tail, original=name + tail)
    except UsageError as e:
        raise CdhError(
            f"registry configuration maps {ref.name} to an invalid reference: {e}"
        ) from None
