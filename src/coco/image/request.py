"""The options of one image pull, as one model: built by ``coco image pull`` and by the pull
service from its wire request, turned into :class:`coco.image.pull.PullOptions` in one place.

On the wire (``coco image pull --service``) it is a JSON object with exactly these fields, every
path absolute (the service has its own working directory) and ``env`` the caller's variables that
locate its auth files. Standard library only at load time: the service's client stays light (no
dataclasses: they load :mod:`inspect`).
"""

from __future__ import annotations

import os

from coco.errors import PullError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from coco.image.pull import PullOptions

_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))
#: field -> (accepted JSON types, default)
FIELDS: dict[str, tuple[Any, Any]] = {
    "ref": (str, None),
    "bundle": (str, None),
    "store": (str, None),
    "creds": (_OPT_STR, None),
    "authfile": (_OPT_STR, None),
    "tls_verify": (bool, True),
    "cert_dir": (_OPT_STR, None),
    "retry_times": (int, 0),
    "decryption_keys": (list, ()),
    "policy": (_OPT_STR, None),
    "registries_d": (_OPT_STR, None),
    "jobs": (int, 3),
    "flatten": (bool, False),
    "os": (_OPT_STR, None),
    "arch": (_OPT_STR, None),
    "variant": (_OPT_STR, None),
    "max_layer_size": (_OPT_INT, None),
    "max_files": (_OPT_INT, None),
    "env": (dict, None),
}
_PATHS = ("bundle", "store", "authfile", "cert_dir", "policy", "registries_d")
_REQUIRED = ("ref", "bundle", "store")


class PullRequest:
    """What to pull where, and how (the flags of ``coco image pull``; see :data:`FIELDS`)."""

    __slots__ = tuple(FIELDS)

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise PullError(f"pull request: unknown field {unknown[0]!r}")
        for name, (_, default) in FIELDS.items():
            if name not in values and name in _REQUIRED:
                raise PullError(f"pull request: field {name!r} is missing")
            value = values.get(name, default)
            if name == "decryption_keys":
                value = tuple(value)
            elif name == "env":
                value = dict(value or {})
            setattr(self, name, value)

    def __repr__(self) -> str:  # the credentials stay out of logs
        return f"PullRequest(ref={self.ref!r}, bundle={self.bundle!r})"

    # -- the wire ------------------------------------------------------------------------------
    def for_service(self) -> dict[str, Any]:
        """The wire object: paths absolute, key files too, and the caller's auth-file variables."""
        from coco.oci import AUTHFILE_ENV  # not coco.oci.auth: the client stays light

        out = {name: getattr(self, name) for name in FIELDS}
        for name in _PATHS:
            if out[name] is not None:
                out[name] = os.path.abspath(out[name])
        out["decryption_keys"] = [_absolute_key(k) for k in self.decryption_keys]
        out["env"] = {k: os.environ[k] for k in AUTHFILE_ENV if k in os.environ}
        return out

    @classmethod
    def from_service(cls, obj: Any) -> PullRequest:
        """The request a client sent, checked field by field (unknown, missing or mistyped
        fields are refused; paths must be absolute)."""
        where = "image service"
        if not isinstance(obj, dict):
            raise PullError(f"{where}: expected a JSON object, found {type(obj).__name__}")
        extra = sorted(set(obj) - set(FIELDS))
        if extra:
            raise PullError(f"{where}: unknown request field {extra[0]!r}")
        for name, (kind, _) in FIELDS.items():
            if name not in obj:
                raise PullError(f"{where}: request field {name!r} is missing")
            v = obj[name]
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise PullError(f"{where}: request field {name!r} has the wrong type")
        for name in _PATHS:
            if obj[name] is not None and not os.path.isabs(obj[name]):
                raise PullError(f"{where}: {name} must be an absolute path, found {obj[name]!r}")
        if not all(isinstance(k, str) for k in obj["decryption_keys"]):
            raise PullError(f"{where}: decryption_keys must be strings")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in obj["env"].items()):
            raise PullError(f"{where}: env must map names to strings")
        return cls(**obj)

    # -- the pull ------------------------------------------------------------------------------
    def options(self) -> PullOptions:
        """The PullOptions of this request (keys are read only when a layer is encrypted)."""
        from pathlib import Path

        from coco.image.pull import PullOptions, load_policy
        from coco.oci.auth import find_credentials, parse_creds
        from coco.oci.reference import DockerReference, parse_reference
        from coco.oci.transport import Access

        keys = self.decryption_keys

        def decryption() -> Any:
            from coco.ocicrypt import decrypt_config

            return decrypt_config(keys)

        limits = None
        if self.max_layer_size is not None or self.max_files is not None:
            from coco.image.unpack import UnpackLimits

            given = {"max_layer_size": self.max_layer_size, "max_files": self.max_files}
            limits = UnpackLimits(**{k: v for k, v in given.items() if v is not None})
        creds = parse_creds(self.creds, "--creds") if self.creds is not None else None
        authfile = Path(self.authfile) if self.authfile else None
        if creds is None and authfile is None and self.env:  # a service: the caller's files
            ref = parse_reference(self.ref)
            if isinstance(ref, DockerReference):
                creds = find_credentials(ref.registry, ref.repository, environ=self.env)
        policy = None
        if self.policy is not None:
            regd = Path(self.registries_d) if self.registries_d else None
            policy = load_policy(Path(self.policy), regd)
        return PullOptions(
            access=Access(
                creds,
                authfile,
                self.tls_verify,
                Path(self.cert_dir) if self.cert_dir else None,
                self.retry_times,
            ),
            decryption=decryption if keys else None,
            decryption_keys=tuple(keys),
            policy=policy,
            jobs=self.jobs,
            flatten=self.flatten,
            os=self.os,
            arch=self.arch,
            variant=self.variant,
            limits=limits,
        )


def _absolute_key(k: str) -> str:
    if k.startswith("provider:"):
        return k
    path, sep, rest = k.partition(":")  # FILE[:PASSWORD]
    return os.path.abspath(path) + sep + rest
