"""Key wrappers: how a layer's private options (its key, nonce and digest) reach its recipients.

Each scheme has its own module and its own annotation,
``org.opencontainers.image.enc.keys.<scheme>``: :mod:`.jwe` (RSA / EC public keys),
:mod:`.pkcs7` (X.509 certificates) and :mod:`.keyprovider` (``provider.<name>``, an external
program or gRPC service). Every ``unwrap`` raises :class:`KeyUnwrapError` when none of the keys
it was given opens the envelope, so the caller can try the next scheme.
"""

from coco.errors import DecryptionError


class KeyUnwrapError(DecryptionError):
    """None of the given keys could open a wrapped layer key."""
