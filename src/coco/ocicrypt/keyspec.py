"""``--decryption-key`` strings read as files, without loading a key: the part of key handling
that a warm pull needs.

A value is ``KEYFILE``, ``KEYFILE:PASSWORD``, ``KEYFILE:pass=…``, ``KEYFILE:file=…``,
``KEYFILE:fd=N`` or ``provider:NAME[:VALUE]`` (skopeo's forms; :mod:`coco.ocicrypt.config` turns
them into keys). :func:`key_files_digest` names the exact key material a pull was given, so a
layer store can remember that these very bytes once unwrapped a layer's key and need not load
``cryptography`` and repeat the RSA operation to know it again (see
:meth:`coco.image.store.LayerStore.proven`). Standard library only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from coco.errors import OcicryptError

__all__ = ["ANN_PREFIX", "KeyConfigError", "key_files_digest", "read_key_file", "split_key"]

ANN_PREFIX = "org.opencontainers.image.enc."
"""Every annotation an encrypted layer's descriptor carries for ocicrypt (wrapped keys,
``pubopts``) starts with this."""


class KeyConfigError(OcicryptError):
    """A key string, key file or ocicrypt config that cannot be used."""


def read_key_file(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise KeyConfigError(f"{flag} {path}: file not found") from None
    except OSError as e:
        raise KeyConfigError(f"{flag} {path}: cannot read: {e.strerror}") from None


def split_key(value: str) -> tuple[str, str | None]:
    """``(path, password spec or None)`` of a key-file value: a value naming an existing file is
    all path (a path may hold ``:``), else the password spec follows the first ``:``."""
    if os.path.exists(value):
        return value, None
    path, sep, spec = value.partition(":")
    return path, (spec if sep else None)


def password(spec: str, where: str) -> bytes:
    """The password a spec gives: ``pass=…``, ``file=PATH`` (its first line), ``fd=N`` (the
    first line read from it), or the spec itself."""
    if spec.startswith("pass="):
        return spec[5:].encode()
    if spec.startswith("file="):
        return read_key_file(spec[5:], where).split(b"\n", 1)[0].rstrip(b"\r")
    if spec.startswith("fd="):
        try:
            fd = int(spec[3:])
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read().split(b"\n", 1)[0].rstrip(b"\r")
        except (ValueError, OSError) as e:
            raise KeyConfigError(f"{where}: cannot read the password from {spec!r}: {e}") from None
    return spec.encode()


def key_files_digest(values: Sequence[str]) -> bytes | None:
    """A digest of the key material ``values`` give: every key file's bytes and password, in
    any order. None when it cannot stand for them: no values, a key provider (its answer is not
    in any file) or a password read from a descriptor (reading it would use it up).

    An unreadable file also gives None: the pull then loads the keys, which reports it.
    """
    parts = []
    for value in values:
        if value.startswith("provider:"):
            return None
        path, spec = split_key(value)
        if spec is not None and spec.startswith("fd="):
            return None
        try:
            data = read_key_file(path, "--decryption-key")
            pw = None if spec is None else password(spec, f"--decryption-key {path}")
        except KeyConfigError:
            return None
        h = hashlib.sha256(len(data).to_bytes(8, "big") + data)
        h.update(b"\0" if pw is None else b"\1" + pw)
        parts.append(h.digest())
    if not parts:
        return None
    return hashlib.sha256(b"coco decryption key files v1\0" + b"".join(sorted(parts))).digest()
