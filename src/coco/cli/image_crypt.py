"""The layer-encryption options of ``coco image copy`` (same flags as skopeo).

``--encryption-key jwe:PUBKEY|pkcs7:CERT|provider:NAME[:VALUE]`` (repeatable) with optional
``--encrypt-layer N`` (repeatable; negative counts from the end; default: every layer), or
``--decryption-key KEYFILE[:PASSWORD]|CERTFILE|provider:NAME[:VALUE]`` (repeatable).
"""

from __future__ import annotations

from typing import Any

import click

from coco.cli.image import add_copy_transform
from coco.oci.copy import LayerTransform
from coco.ocicrypt import DecryptLayers, EncryptLayers, decrypt_config, encrypt_config


def _factory(values: dict[str, Any]) -> LayerTransform | None:
    enc = tuple(values.get("encryption_key") or ())
    layers = tuple(values.get("encrypt_layer") or ())
    dec = tuple(values.get("decryption_key") or ())
    if enc and dec:
        raise click.UsageError("--encryption-key and --decryption-key cannot be combined")
    if layers and not enc:
        raise click.UsageError("--encrypt-layer needs --encryption-key")
    ctx = click.get_current_context(silent=True)
    image = str(ctx.params.get("src")) if ctx is not None and ctx.params.get("src") else "image"
    if enc:
        return EncryptLayers(encrypt_config(enc), layers or None, image=image)
    if dec:
        return DecryptLayers(decrypt_config(dec), image=image)
    return None


def register() -> None:
    add_copy_transform(
        [
            click.Option(
                ["--encryption-key"],
                multiple=True,
                metavar="PROTOCOL:KEY",
                help="Encrypt layers to this recipient: jwe:PUBKEY, pkcs7:CERT or "
                "provider:NAME[:VALUE] (repeatable).",
            ),
            click.Option(
                ["--encrypt-layer"],
                multiple=True,
                type=int,
                metavar="N",
                help="Encrypt only layer N (0-based, negative from the end; repeatable; "
                "default: all).",
            ),
            click.Option(
                ["--decryption-key"],
                multiple=True,
                metavar="KEY[:PASSWORD]",
                help="Decrypt layers with this private key, certificate or "
                "provider:NAME[:VALUE] (repeatable).",
            ),
        ],
        _factory,
    )


register()
