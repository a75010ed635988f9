"""The Confidential Data Hub's errors: one family under :class:`coco.errors.CocoError`."""

from __future__ import annotations

from coco.errors import CocoError


class CdhError(CocoError):
    """Confidential Data Hub: resources, sealed secrets, KMS, layer keys, secure mounts, pulls."""


class CdhConfigError(CdhError):
    """A cdh.toml (or the kernel command line standing in for it) that is not usable."""


class ResourceError(CdhError):
    """A resource that could not be fetched (the getter's refusal, a bad URI, a missing file)."""


class SecretError(CdhError):
    """A sealed secret that is malformed, does not verify or cannot be unsealed."""


class KmsError(CdhError):
    """A KMS provider that is unknown, not built in, or failed to decrypt or fetch."""


class UnwrapKeyError(CdhError):
    """A keyprovider UnWrapKey request or AnnotationPacket that cannot be honoured."""


class SecureMountError(CdhError):
    """A SecureMount request with bad arguments, or a device that could not be prepared."""
