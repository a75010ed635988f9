"""The ``local`` KMS provider: AES-256-GCM under key files in a directory (tests, offline use).

Not a KMS: the keys are plain files (32 raw bytes each, named by key id) in the directory the hub
was given (``KmsContext.local_key_dir``; a secret cannot choose another one). ``encrypt`` returns
the ciphertext (with its tag) and the annotations ``{"iv": "<std-b64 12 bytes>"}`` that
``decrypt`` needs back.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from pathlib import Path
from typing import Any

from coco.guest.cdh import wrap
from coco.guest.cdh.errors import KmsError
from coco.guest.cdh.kms import Annotations, KmsContext, Provider, ProviderSettings

log = logging.getLogger(__name__)

_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class LocalKeyFiles:
    """Encrypter and Decrypter over ``<dir>/<key_id>``."""

    def __init__(self, settings: ProviderSettings, ctx: KmsContext) -> None:
        if settings:
            raise KmsError(
                f"KMS provider 'local': expected no provider_settings, found {sorted(settings)}"
            )
        self.dir = Path(ctx.local_key_dir)

    def _key(self, key_id: str) -> bytes:
        if not isinstance(key_id, str) or not _KEY_ID.match(key_id) or key_id in (".", ".."):
            raise KmsError(
                f"KMS provider 'local': expected a key id of letters, digits, '.', '_' or '-', "
                f"found {key_id!r}"
            )
        path = self.dir / key_id
        try:
            key = path.read_bytes()
        except OSError as e:
            raise KmsError(
                f"KMS provider 'local': key {key_id!r}: cannot read {path}: {e.strerror}"
            ) from None
        if len(key) != wrap.KEY_SIZE:
            raise KmsError(
                f"KMS provider 'local': key file {path}: expected {wrap.KEY_SIZE} bytes, found {len(key)}"
            )
        return key

    def encrypt(self, data: bytes, key_id: str) -> tuple[bytes, dict[str, Any]]:
        ct, iv = wrap.encrypt(self._key(key_id), data, "A256GCM")
        return ct, {"iv": base64.b64encode(iv).decode()}

    def decrypt(self, ciphertext: bytes, key_id: str, annotations: Annotations) -> bytes:
        where = f"KMS provider 'local': key {key_id!r}"
        iv_text = annotations.get("iv") if isinstance(annotations, dict) else None
        if not isinstance(iv_text, str):
            raise KmsError(
                f'{where}: expected annotations {{"iv": "<base64>"}}, found {annotations!r}'
            )
        try:
            iv = base64.b64decode(iv_text, validate=True)
        except (binascii.Error, ValueError):
            raise KmsError(f"{where}: annotations.iv is not base64") from None
        return wrap.decrypt(self._key(key_id), ciphertext, iv, "A256GCM", where=where, err=KmsError)


def create_key(directory: str | os.PathLike[str], key_id: str) -> Path:
    """Write a new random key file ``<directory>/<key_id>`` (mode 0600); refuse to overwrite."""
    if not _KEY_ID.match(key_id) or key_id in (".", ".."):
        raise KmsError(f"local key id: expected letters, digits, '.', '_' or '-', found {key_id!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / key_id
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KmsError(f"local key {path}: already exists, not overwritten") from None
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(wrap.KEY_SIZE))
    return path


PROVIDER = Provider("local", decrypter=LocalKeyFiles, encrypter=LocalKeyFiles)
