"""Layer encryption compatible with containers/ocicrypt (what skopeo and image-rs use).

- :mod:`.cipher`: the ``AES_256_CTR_HMAC_SHA256`` layer stream cipher.
- :mod:`.keywrap`: wrapping a layer's key for recipients (``jwe``, ``pkcs7``, ``provider.NAME``).
- :mod:`.config`: skopeo-style key strings and ``ocicrypt_config.json``.
- :mod:`.images`: the encrypt / decrypt layer transforms plugged into ``coco image copy``.
"""

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
