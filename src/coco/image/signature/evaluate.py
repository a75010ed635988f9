"""Evaluating a signature policy for one image, before any layer is fetched.

    ctx = PolicyContext.from_file("policy.json")
    fetch = signature_fetcher(ref, digest, registries_d=RegistriesD.load(d))
    verdict = ctx.evaluate(ref, digest, fetch)
    verdict.raise_if_refused()   # PolicyRefusedError naming the requirement that failed

The requirements of the most specific matching scope must all hold. ``fetch_signatures`` is called
at most once, and only if a requirement needs signatures; it returns :class:`Signatures` (GPG
signed messages and cosign signatures) from wherever the caller's transport keeps them.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from coco.errors import PolicyRefusedError, SignatureError, UsageError
from coco.image.signature import sigstore as cosign
from coco.image.signature.policy import (
    ExactReference,
    ExactRepository,
    InsecureAcceptAnything,
    KeyLoader,
    Policy,
    Reject,
    Requirement,
    SignedBy,
    SigstoreSigned,
    canonical,
    docker_scope_candidates,
    parse_identity,
    path_scope_candidates,
)
from coco.image.signature.registries_d import RegistriesD, read_lookaside
from coco.image.signature.simple_signing import ATOMIC_TYPE, GpgKeyring, Payload
from coco.oci.reference import DockerReference, LayoutReference, parse_reference

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Signatures:
    """Signatures found for one manifest: GPG simple-signing blobs and cosign signatures."""

    simple: Sequence[bytes] = ()
    sigstore: Sequence[cosign.SigstoreSignature] = ()


FetchSignatures = Callable[[], Signatures]
FetchAttachment = Callable[[str], "tuple[bytes, Callable[[str, int], bytes]] | None"]
"""Given a tag (``sha256-HEX.sig``), the manifest bytes and a blob reader, or None if absent."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome: accepted, or refused with the reason naming the failed requirement."""

    accepted: bool
    reason: str
    scope: str
    notes: tuple[str, ...] = field(default=())

    def raise_if_refused(self) -> None:
        if not self.accepted:
            raise PolicyRefusedError(self.reason)


class PolicyContext:
    """A parsed policy ready to evaluate images (keys are read when first needed)."""

    def __init__(self, policy: Policy, *, key_loader: KeyLoader | None = None) -> None:
        self.policy = policy
        self._key_loader = key_loader
        self._keyrings: dict[bytes, GpgKeyring] = {}
        self._finalizer = weakref.finalize(self, _close_all, self._keyrings)

    def close(self) -> None:
        """Remove the temporary GPG keyrings (also done when the context is collected)."""
        self._finalizer()

    def __enter__(self) -> PolicyContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _keyring(self, keys: list[bytes], where: str) -> GpgKeyring:
        """One imported keyring per distinct key set, reused across evaluations."""
        h = hashlib.sha256()
        for k in keys:
            h.update(hashlib.sha256(k).digest())
        ident = h.digest()
        ring = self._keyrings.get(ident)
        if ring is None:
            ring = self._keyrings[ident] = GpgKeyring(keys, where)
        return ring

    @classmethod
    def from_file(cls, path: str, *, key_loader: KeyLoader | None = None) -> PolicyContext:
        return cls(Policy.from_file(path), key_loader=key_loader)

    def evaluate(
        self,
        image_ref: str | DockerReference | LayoutReference,
        manifest_digest: str,
        fetch_signatures: FetchSignatures,
        *,
        list_digest: str | None = None,
        transport: str | None = None,
    ) -> Verdict:
        """Check ``image_ref`` (whose manifest has ``manifest_digest``; ``list_digest`` if it
        was chosen from an index) against the policy."""
        ref = parse_reference(image_ref) if isinstance(image_ref, str) else image_ref
        if isinstance(ref, DockerReference):
            transport = transport or "docker"
            if not ref.tag and not ref.digest:
                ref = DockerReference(ref.registry, ref.repository, "latest", None)
            candidates = docker_scope_candidates(ref)
            docker_ref: DockerReference | None = ref
        else:
            transport = transport or "oci"
            candidates = path_scope_candidates(ref.path, ref.tag)
            docker_ref = None
        scope, reqs = self.policy.requirements_for(transport, candidates)
        digests = {manifest_digest} | ({list_digest} if list_digest else set())
        cache: list[Signatures] = []

        def signatures() -> Signatures:
            if not cache:
                cache.append(fetch_signatures())
            return cache[0]

        notes: list[str] = []
        for i, req in enumerate(reqs):
            where = f"{image_ref}: policy {scope}[{i}] ({req.type})"
            ok, why = self._check(req, docker_ref, digests, signatures, where)
            if not ok:
                return Verdict(False, f"{where}: {why}", scope, tuple(notes))
            notes.append(f"{scope}[{i}] ({req.type}): {why}")
        return Verdict(True, "; ".join(notes) or "no requirements", scope, tuple(notes))

    def _check(
        self,
        req: Requirement,
        ref: DockerReference | None,
        digests: set[str],
        signatures: FetchSignatures,
        where: str,
    ) -> tuple[bool, str]:
        if isinstance(req, InsecureAcceptAnything):
            log.warning("%s: accepting without any signature check (insecureAcceptAnything)", where)
            return True, "accepted without checks"
        if isinstance(req, Reject):
            return False, "the policy rejects this image"
        if isinstance(req, SignedBy | SigstoreSigned):
            try:
                keys = req.keys.load(where, self._key_loader)
            except SignatureError as e:
                return False, str(e)
            if isinstance(req, SignedBy):
                found = list(signatures().simple)
                kind = "GPG simple-signing"
            else:
                found = list(signatures().sigstore)
                kind = "sigstore"
            if not found:
                return False, f"a {kind} signature was required, but no signature exists"
            try:
                if isinstance(req, SignedBy):
                    return self._check_gpg(req, ref, digests, keys, found, where)
                return self._check_sigstore(req, ref, digests, keys, found, where)
            except SignatureError as e:
                return False, str(e)
        raise AssertionError(req)  # pragma: no cover

    def _check_gpg(self, req, ref, digests, keys, found, where) -> tuple[bool, str]:
        problems: list[str] = []
        ring = self._keyring(keys, f"{where}: keys")
        for n, blob in enumerate(found, 1):
            sw = f"signature {n}"
            try:
                payload_bytes, fpr = ring.verify(blob, sw)
                payload = Payload.parse(payload_bytes, expected_type=ATOMIC_TYPE, where=sw)
                _check_claims(payload, req, ref, digests, sw)
            except SignatureError as e:
                problems.append(str(e))
                continue
            return True, f"signature {n} by {fpr} for {payload.docker_reference}"
        return False, "no signature verified: " + "; ".join(problems)

    def _check_sigstore(self, req, ref, digests, keys, found, where) -> tuple[bool, str]:
        pubs = [cosign.load_public_key(k, f"{where}: key") for k in keys]
        problems: list[str] = []
        for n, sig in enumerate(found, 1):
            sw = f"signature {n}"
            try:
                payload = cosign.verify_signature(sig, pubs, sw)
                _check_claims(payload, req, ref, digests, sw)
            except SignatureError as e:
                problems.append(str(e))
                continue
            return True, f"sigstore signature {n} for {payload.docker_reference}"
        return False, "no signature verified: " + "; ".join(problems)


def _close_all(rings: dict[bytes, GpgKeyring]) -> None:
    for ring in rings.values():
        ring.close()
    rings.clear()


def _check_claims(
    payload: Payload,
    req: SignedBy | SigstoreSigned,
    ref: DockerReference | None,
    digests: set[str],
    where: str,
) -> None:
    if payload.manifest_digest not in digests:
        raise SignatureError(
            f"{where}: signed manifest digest {payload.manifest_digest} is not the image's "
            f"{' or '.join(sorted(digests))}"
        )
    signed = parse_identity(payload.docker_reference, f"{where}: docker-reference")
    rule = req.signed_identity
    if ref is None and not isinstance(rule, ExactReference | ExactRepository):
        raise SignatureError(
            f"{where}: identity rule {rule.type} needs a docker reference; this image has none"
        )
    if not rule.matches(ref, signed):  # type: ignore[arg-type]
        raise SignatureError(
            f"{where}: signed identity {canonical(signed)} does not match "
            f"{canonical(ref) if ref else 'the image'} under {rule.type}"
        )


def signature_fetcher(
    ref: DockerReference,
    manifest_digest: str,
    *,
    registries_d: RegistriesD | None = None,
    fetch_attachment: FetchAttachment | None = None,
) -> FetchSignatures:
    """A :data:`FetchSignatures` reading the lookaside (``file://``) that registries.d names for
    ``ref`` and, if that entry says ``use-sigstore-attachments``, the ``.sig`` attachment through
    ``fetch_attachment`` (the caller's registry client)."""

    def fetch() -> Signatures:
        entry = registries_d.entry_for(ref) if registries_d else None
        simple: list[bytes] = []
        if entry is not None and entry.lookaside:
            simple = read_lookaside(entry.lookaside, ref, manifest_digest)
        sig: list[cosign.SigstoreSignature] = []
        if fetch_attachment is not None and (entry is None or entry.use_sigstore_attachments):
            tag = cosign.attachment_tag(manifest_digest)
            got = fetch_attachment(tag)
            if got is not None:
                manifest, get_blob = got
                sig = cosign.parse_attachment(manifest, get_blob, f"{ref.name}:{tag}")
        return Signatures(simple, sig)

    return fetch


def parse_image(text: str) -> DockerReference | LayoutReference:
    """``docker://…`` or ``oci:…`` for callers that take a string."""
    try:
        return parse_reference(text)
    except UsageError as e:
        raise SignatureError(str(e)) from None
