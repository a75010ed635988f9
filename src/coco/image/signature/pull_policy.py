"""The signature policy as ``coco image pull`` uses it: ``pull_policy(policy.json, registries.d)``
gives an object whose ``check(source, manifest_raw, manifest_digest)`` returns quietly or raises
:class:`~coco.errors.PolicyRefusedError`. The pull calls it before fetching any layer or config.

Signatures come from the registries.d lookaside (``file://``) for GPG simple signing and, for
registry sources, from the ``sha256-HEX.sig`` cosign attachment in the same repository, read
through the source's registry client: always when no registries.d is given, else only where the
matching registries.d entry sets ``use-sigstore-attachments: true`` (as containers/image does).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.errors import PolicyRefusedError, RegistryError
from coco.image.signature.evaluate import PolicyContext, Signatures, signature_fetcher
from coco.image.signature.policy import Policy
from coco.image.signature.registries_d import RegistriesD
from coco.oci.reference import DockerReference

log = logging.getLogger(__name__)


class PullPolicy:
    """A loaded policy.json (+ optional registries.d) checking one manifest per pull."""

    def __init__(self, context: PolicyContext, registries_d: RegistriesD | None) -> None:
        self.context = context
        self.registries_d = registries_d

    def check(
        self,
        source: Any,
        manifest_raw: bytes,
        manifest_digest: str,
        logical: DockerReference | None = None,
    ) -> None:
        """``logical``: the name the image was asked for when ``source`` reads it from a mirror
        or a remapped location (registries.conf): as containers/image does, the policy's scopes,
        the signed identity and the registries.d lookaside go by that name, while the sigstore
        attachment is read where the image is."""
        physical = source.ref
        ref = logical if logical is not None and isinstance(physical, DockerReference) else physical
        where = str(ref)
        alg, _, expected = manifest_digest.partition(":")
        if alg != "sha256" or hashlib.sha256(manifest_raw).hexdigest() != expected:
            raise PolicyRefusedError(
                f"{where}: manifest bytes do not hash to {manifest_digest}; refusing to check "
                "signatures against them"
            )
        if isinstance(ref, DockerReference):
            client = getattr(source, "client", None)
            fetch = signature_fetcher(
                ref,
                manifest_digest,
                registries_d=self.registries_d,
                fetch_attachment=(
                    _attachment_reader(client, physical) if client is not None else None
                ),
            )
        else:

            def fetch() -> Signatures:
                return Signatures()

        verdict = self.context.evaluate(ref, manifest_digest, fetch)
        if not verdict.accepted:
            raise PolicyRefusedError(f"signature policy refused the image: {verdict.reason}")
        log.info("%s: signature policy accepted: %s", where, verdict.reason)


def _attachment_reader(client: Any, ref: DockerReference) -> Callable:
    def read(tag: str):
        what = f"{ref.name}:{tag}"
        try:
            raw, _ctype = client.get_manifest(ref.repository, tag, what)
        except RegistryError as e:
            if "registry answered 404" in str(e):
                return None
            raise

        def get_blob(digest: str, size: int) -> bytes:
            return b"".join(client.open_blob(ref.repository, digest, size, f"{what}: {digest}"))

        return raw, get_blob

    return read


def pull_policy(policy: str | Path, registries_d: str | Path | None = None) -> PullPolicy:
    """Load ``policy`` (containers policy.json) and ``registries_d`` for ``coco image pull``."""
    ctx = PolicyContext(Policy.from_file(policy))
    return PullPolicy(ctx, RegistriesD.load(registries_d) if registries_d is not None else None)
