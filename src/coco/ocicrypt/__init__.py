"""Layer encryption compatible with containers/ocicrypt (what skopeo and image-rs use).

- :mod:`.cipher`: the ``AES_256_CTR_HMAC_SHA256`` layer stream cipher.
- :mod:`.keywrap`: wrapping a layer's key for recipients (``jwe``, ``pkcs7``, ``provider.NAME``).
- :mod:`.keyspec`: ``--decryption-key`` strings as files (no key loaded, no ``cryptography``).
- :mod:`.config`: skopeo-style key strings and ``ocicrypt_config.json``.
- :mod:`.images`: the encrypt / decrypt layer transforms plugged into ``coco image copy``.

The names below load their modules (and ``cryptography``) on first use, so that
:mod:`.keyspec` alone stays light.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from coco.ocicrypt.config import DecryptConfig, EncryptConfig, decrypt_config, encrypt_config
    from coco.ocicrypt.images import DecryptLayers, EncryptLayers

__all__ = [
    "DecryptConfig",
    "DecryptLayers",
    "EncryptConfig",
    "EncryptLayers",
    "decrypt_config",
    "encrypt_config",
]

_HOME = {
    "DecryptConfig": "config",
    "EncryptConfig": "config",
    "decrypt_config": "config",
    "encrypt_config": "config",
    "DecryptLayers": "images",
    "EncryptLayers": "images",
}


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'coco.ocicrypt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"coco.ocicrypt.{home}"), name)
    globals()[name] = value
    return value
