"""Registry credentials: ``USER[:PASS]`` flags and ``auth.json`` / Docker ``config.json`` files.

Lookup follows containers-auth.json(5): the files are ``$REGISTRY_AUTH_FILE`` (alone), else
``${XDG_RUNTIME_DIR}/containers/auth.json``, ``${XDG_CONFIG_HOME:-~/.config}/containers/auth.json``
and ``~/.docker/config.json``, the first that knows the registry wins. In a file, a
``credHelpers`` entry for the registry comes first, then ``auths`` (the most specific key wins:
``host/ns/repo``, then each parent path, then ``host``; keys may also be URLs such as
``https://host/v1/``), then the ``credsStore`` default helper. A helper is the program
``docker-credential-NAME``, run as containers/image runs it: ``get`` with the registry on stdin,
``{"Username": ..., "Secret": ...}`` on stdout.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from pathlib import Path

import coco.log
from coco import jsonio
from coco.errors import AuthError, UsageError
from coco.record import record

log = coco.log.get(__name__)  # logging loads only if a record needs it


@record
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


def default_authfiles(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The auth files that exist, in lookup order (see the module docstring), in ``environ``
    (by default this process's environment). ``$REGISTRY_AUTH_FILE`` is the only one when set."""
    e = os.environ if environ is None else environ
    env = e.get("REGISTRY_AUTH_FILE")
    if env:
        return [Path(env)]
    home = Path(e["HOME"]) if e.get("HOME") else Path.home()
    config = Path(e["XDG_CONFIG_HOME"]) if e.get("XDG_CONFIG_HOME") else home / ".config"
    runtime = e.get("XDG_RUNTIME_DIR")
    candidates = [
        *([Path(runtime) / "containers" / "auth.json"] if runtime else []),
        config / "containers" / "auth.json",
        home / ".docker" / "config.json",
    ]
    return [p for p in candidates if p.is_file()]


def find_credentials(
    registry: str,
    repository: str,
    authfile: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Credentials | None:
    """The credentials for ``registry/repository``: from ``authfile`` (which must exist) when
    given, else from the first default auth file (of ``environ``) that knows the registry."""
    if authfile is not None:
        return AuthFile.load(authfile).lookup(registry, repository)
    for path in default_authfiles(environ):
        found = AuthFile.load(path, required=False).lookup(registry, repository)
        if found is not None:
            return found
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

    def __init__(
        self,
        path: Path,
        entries: dict[str, Credentials],
        helpers: dict[str, str] | None = None,
        store: str | None = None,
    ) -> None:
        self.path = path
        self._entries = entries
        self._helpers = helpers or {}  # credHelpers: registry host -> helper name
        self._store = store  # credsStore: the helper for every other registry

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
        helpers = obj.get("credHelpers") or {}
        if not isinstance(helpers, dict) or not all(
            isinstance(v, str) and v for v in helpers.values()
        ):
            raise AuthError(f"authfile {p}: credHelpers: expected an object of helper names")
        store = obj.get("credsStore") or None
        if store is not None and not isinstance(store, str):
            raise AuthError(f"authfile {p}: credsStore: expected a helper name")
        return cls(p, entries, {_normalize_key(k): v for k, v in helpers.items()}, store)

    def lookup(self, registry: str, repository: str) -> Credentials | None:
        """The credentials for ``registry/repository``: its credential helper, the most specific
        ``auths`` key, or the default helper (see the module docstring)."""
        host = _normalize_key(registry)
        helper = self._helpers.get(host)
        if helper is not None:
            return _from_helper(helper, registry, self.path)
        parts = f"{host}/{repository}".split("/")
        for n in range(len(parts), 0, -1):
            hit = self._entries.get("/".join(parts[:n]))
            if hit is not None:
                return hit
        if self._store is not None:
            return _from_helper(self._store, registry, self.path)
        return None


def _from_helper(name: str, registry: str, authfile: Path) -> Credentials | None:
    """``docker-credential-NAME get`` for ``registry``; None when it has no credentials."""
    import shutil
    import subprocess

    program = f"docker-credential-{name}"
    where = f"authfile {authfile}: credential helper {program} for {registry}"
    exe = shutil.which(program)
    if exe is None:
        raise AuthError(f"{where}: expected the program on PATH, found none")
    try:
        r = subprocess.run(
            [exe, "get"], input=registry.encode(), capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AuthError(f"{where}: cannot run it: {e}") from None
    if r.returncode != 0:
        said = " ".join((r.stdout or r.stderr).decode("utf-8", "replace").split())[:200]
        if "credentials not found" in said.lower():
            return None
        raise AuthError(f"{where}: exit status {r.returncode}: {said}")
    doc = jsonio.loads(r.stdout, what=where, error=AuthError)
    user, secret = (doc.get(k) if isinstance(doc, dict) else None for k in ("Username", "Secret"))
    if not isinstance(user, str) or not isinstance(secret, str):
        raise AuthError(f'{where}: expected {{"Username": ..., "Secret": ...}} on stdout')
    if user == "<token>":
        raise AuthError(f"{where}: identity tokens are not supported")
    return Credentials(user, secret)
