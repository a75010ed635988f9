"""The layer-encryption options of ``coco image copy`` (same flags as skopeo).

``--encryption-key jwe:PUBKEY|pkcs7:CERT|provider:NAME[:VALUE]`` (repeatable) with optional
``--encrypt-layer N`` (repeatable; negative counts from the end; default: every layer), or
``--decryption-key KEYFILE[:PASSWORD]|CERTFILE|provider:NAME[:VALUE]`` (repeatable).
"""

from __future__ import annotations

from typing import Any

from coco.cli._args import Parser, Usage, integer
from coco.oci.copy import LayerTransform
from coco.ocicrypt import DecryptLayers, EncryptLayers, decrypt_config, encrypt_config


def transform(values: dict[str, Any]) -> LayerTransform | None:
    """The layer transform the parsed copy options (by dest) ask for, or None."""
    enc = tuple(values.get("encryption_key") or ())
    layers = tuple(values.get("encrypt_layer") or ())
    dec = tuple(values.get("decryption_key") or ())
    if enc and dec:
        raise Usage("--encryption-key and --decryption-key cannot be combined")
    if layers and not enc:
        raise Usage("--encrypt-layer needs --encryption-key")
    image = str(values.get("src") or "image")
    if enc:
        return EncryptLayers(encrypt_config(enc), layers or None, image=image)
    if dec:
        return DecryptLayers(decrypt_config(dec), image=image)
    return None


def add_arguments(p: Parser) -> None:
    """Add the encryption options to ``coco image copy``."""
    p.add_argument(
        "--encryption-key",
        action="append",
        metavar="PROTOCOL:KEY",
        help="Encrypt layers to this recipient: jwe:PUBKEY, pkcs7:CERT or provider:NAME[:VALUE] "
        "(repeatable).",
    )
    p.add_argument(
        "--encrypt-layer",
        action="append",
        type=integer,
        metavar="N",
        help="Encrypt only layer N (0-based, negative from the end; repeatable; default: all).",
    )
    p.add_argument(
        "--decryption-key",
        action="append",
        metavar="KEY[:PASSWORD]",
        help="Decrypt layers with this private key, certificate or provider:NAME[:VALUE] "
        "(repeatable).",
    )
