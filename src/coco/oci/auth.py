"""Registry credentials: ``USER[:PASS]`` flags and ``auth.json`` / Docker ``config.json`` files.

Lookup follows containers-auth.json(5): the most specific key wins (``host/ns/repo``, then each
parent path, then ``host``); keys may also be written as URLs (``https://host/v1/``). Credential
helpers are not supported and are ignored.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from coco import jsonio
from coco.errors import AuthError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never print the password
        return f"Credentials(username={self.username!r}, password=***)"

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def parse_creds(text: str, flag: str = "--creds") -> Credentials:
    """``USER[:PASS]`` as skopeo takes it (an absent password is empty)."""
    user, _, password = text.partition(":")
    if not user:
        raise UsageError(f"{flag}: expected USER[:PASS], the user name is empty")
    return Credentials(user, password)


AUTHFILE_ENV = ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "HOME")
"""The environment variables :func:`default_authfile` looks at."""


def default_authfile(environ: Mapping[str, str] | None = None) -> Path | None:
    """$REGISTRY_AUTH_FILE, else ${XDG_RUNTIME_DIR}/containers/auth.json, else ~/.docker/config.json
    (in ``environ``, by default this process's environment)."""
    e = os.environ if environ is None else environ
    env = e.get("REGISTRY_AUTH_FILE")
    if env:
        return Path(env)
    xdg = e.get("XDG_RUNTIME_DIR")
    if xdg and (Path(xdg) / "containers" / "auth.json").exists():
        return Path(xdg) / "containers" / "auth.json"
    home = e.get("HOME")
    docker = (Path(home) if home else Path.home()) / ".docker" / "config.json"
    if docker.exists():
        return docker
    return None


def _normalize_key(key: str) -> str:
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            key = key.split("/", 1)[0]  # URL forms carry a path like /v1/: only the host counts
            break
    if key in ("index.docker.io", "registry-1.docker.io"):
        key = "docker.io"
    return key.rstrip("/")


class AuthFile:
    """A parsed auth.json / config.json."""

    def __init__(self, path: Path, entries: dict[str, Credentials]) -> None:
        self.path = path
        self._entries = entries

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, required: bool = True) -> AuthFile:
        p = Path(path)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            if required:
                raise AuthError(f"authfile {p}: not found") from None
            return cls(p, {})
        except OSError as e:
            raise AuthError(f"authfile {p}: cannot read: {e.strerror}") from None
        obj = jsonio.loads(raw, what=f"authfile {p}", error=AuthError)
        if not isinstance(obj, dict):
            raise AuthError(f"authfile {p}: expected a JSON object")
        auths = obj.get("auths", {})
        if not isinstance(auths, dict):
            raise AuthError(f"authfile {p}: 'auths' must be an object")
        entries: dict[str, Credentials] = {}
        for key, val in auths.items():
            if not isinstance(val, dict):
                raise AuthError(f"authfile {p}: auths[{key!r}] must be an object")
            enc = val.get("auth")
            if not enc:
                continue  # identity tokens and helper-only entries are not supported
            if not isinstance(enc, str):
                raise AuthError(f"authfile {p}: auths[{key!r}].auth must be a base64 string")
            try:
                dec = base64.b64decode(enc, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise AuthError(
                    f"authfile {p}: auths[{key!r}].auth: expected base64 of 'user:password'"
                ) from None
            user, sep, password = dec.partition(":")
            if not sep:
                raise AuthError(
                    f"authfile {p}: auths[{key!r}].auth: expected 'user:password', no ':' found"
                )
            entries[_normalize_key(key)] = Credentials(user, password.rstrip("\n"))
        if obj.get("credHelpers") or obj.get("credsStore"):
            log.debug("authfile %s: credential helpers are not supported, ignored", p)
        return cls(p, entries)

    def lookup(self, registry: str, repository: str) -> Credentials | None:
        """The credentials for ``registry/repository`` (most specific key first)."""
        parts = f"{_normalize_key(registry)}/{repository}".split("/")
        for n in range(len(parts), 0, -1):
            hit = self._entries.get("/".join(parts[:n]))
            if hit is not None:
                return hit
        return None
