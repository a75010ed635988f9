"""Image signature policy: containers ``policy.json``, ``registries.d`` lookaside, GPG simple
signing (through the real ``gpg``) and cosign-format (sigstore) signatures with a P-256 key.

Verifying (before any layer is fetched)::

    ctx = PolicyContext.from_file(policy_path)
    fetch = signature_fetcher(ref, digest, registries_d=RegistriesD.load(dir),
                              fetch_attachment=my_registry_reader)
    ctx.evaluate(ref, digest, fetch).raise_if_refused()

Signing (the caller's transport stores the bytes): :func:`sign_simple` + :func:`write_lookaside`
for GPG; :func:`sign_sigstore` gives the ``sha256-HEX.sig`` manifest and its blobs to push.
"""

from coco.image.signature.evaluate import (
    FetchAttachment,
    FetchSignatures,
    PolicyContext,
    Signatures,
    Verdict,
    signature_fetcher,
)
from coco.image.signature.policy import Policy
from coco.image.signature.pull_policy import PullPolicy, pull_policy
from coco.image.signature.registries_d import RegistriesD, read_lookaside, write_lookaside
from coco.image.signature.sigstore import (
    SignatureManifest,
    SigstoreSignature,
    attachment_tag,
    parse_attachment,
    sign_sigstore,
)
from coco.image.signature.simple_signing import Payload, sign_simple

__all__ = [
    "FetchAttachment",
    "FetchSignatures",
    "Payload",
    "Policy",
    "PolicyContext",
    "PullPolicy",
    "RegistriesD",
    "SignatureManifest",
    "Signatures",
    "SigstoreSignature",
    "Verdict",
    "attachment_tag",
    "parse_attachment",
    "pull_policy",
    "read_lookaside",
    "sign_sigstore",
    "sign_simple",
    "signature_fetcher",
    "write_lookaside",
]
