"""``PullImage`` of the Confidential Data Hub: the landed pull pipeline, configured as ``[image]`` says.

For every pull, what ``[image]`` names is fetched through the hub's KBS client (``kbs://``) or
read from a file (``file://``), so a change in the KBS takes effect at the next pull:

- ``image_security_policy_uri`` / ``image_security_policy``: a containers policy.json checked
  before any layer is fetched; its ``kbs://`` key paths are fetched the same way. None: no check.
- ``sigstore_config_uri`` / ``sigstore_config``: the registries.d YAML (lookaside locations).
- ``authenticated_registry_credentials_uri``: an auth.json. None: anonymous pulls (the guest's
  own files are never consulted).
- ``registry_config`` / ``registry_configuration_uri``: mirrors, remapped locations, blocked and
  insecure registries (:mod:`coco.guest.cdh.registries`); places are tried in order while the
  registry cannot be reached or lacks the image, any other failure ends the pull. The image
  keeps the name it was asked for: the signature policy's scopes and signed identities are
  matched against it, not against the mirror or location it is read from (as containers/image
  does, whose registries.conf calls it the logical name).

Encrypted layers wrapped for the ``attestation-agent`` key provider are opened in this process by
the hub's own UnWrapKey (:attr:`ImagePuller.unwrap`), the KEK coming through the KBS client: no
round trip through a socket. A pull that fails for any reason leaves no bundle.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.errors import RegistryError
from coco.guest.cdh.config import ImageSettings
from coco.guest.cdh.errors import CdhError
from coco.guest.cdh.registries import RegistryConfig
from coco.guest.cdh.resource import ResourceGetter, fetch

log = logging.getLogger(__name__)

PROVIDER = "attestation-agent"
Unwrap = Callable[[str, bytes], bytes]
"""The hub's keyprovider entry: (method, request JSON) -> answer JSON."""


class ImagePuller:
    """Pulls images into ``<work_dir>/store`` and assembles bundles, as ``settings`` configures."""

    def __init__(
        self,
        settings: ImageSettings,
        getter: ResourceGetter | None,
        unwrap: Unwrap,
        *,
        flatten: bool = False,
    ) -> None:
        self.settings = settings
        self.getter = getter
        self.unwrap = unwrap
        self.flatten = flatten
        self.work_dir = Path(settings.work_dir)
        self._store: Any = None
        self._lock = threading.Lock()

    def _layer_store(self) -> Any:
        with self._lock:
            if self._store is None:
                from coco.image.store import LayerStore

                self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._store = LayerStore(self.work_dir / "store")
            return self._store

    def _text(self, uri: str | None, inline: str | None, what: str) -> tuple[bytes, str] | None:
        if uri:
            return fetch(self.getter, uri, what), uri
        if inline is not None:
            return inline.encode(), f"{what} (inline in [image])"
        return None

    def _policy(self, tmp: Path) -> Any:
        s = self.settings
        got = self._text(
            s.image_security_policy_uri, s.image_security_policy, "image security policy"
        )
        if got is None:
            return None
        from coco.image.signature import PolicyContext, PullPolicy, RegistriesD
        from coco.image.signature.policy import Policy

        data, where = got
        policy = Policy.from_bytes(data, where=where)
        ctx = PolicyContext(policy, key_loader=lambda uri: fetch(self.getter, uri, "policy key"))
        registries_d = None
        sig = self._text(s.sigstore_config_uri, s.sigstore_config, "sigstore config")
        if sig is not None:
            d = tmp / "registries.d"
            d.mkdir()
            (d / "sigstore-config.yaml").write_bytes(sig[0])
            registries_d = RegistriesD.load(d)
        return PullPolicy(ctx, registries_d)

    def _registries(self) -> RegistryConfig | None:
        s = self.settings
        if s.registry_config is not None:
            return RegistryConfig.parse(s.registry_config, "[image] registry_config")
        if s.registry_configuration_uri:
            uri = s.registry_configuration_uri
            return RegistryConfig.from_toml(fetch(self.getter, uri, "registry configuration"), uri)
        return None

    def _authfile(self, tmp: Path) -> Path:
        path = tmp / "auth.json"
        uri = self.settings.authenticated_registry_credentials_uri
        data = fetch(self.getter, uri, "registry credentials") if uri else b'{"auths":{}}'
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    def _decryption(self) -> Any:
        from coco.ocicrypt import DecryptConfig
        from coco.ocicrypt.keywrap.keyprovider import KeyProvider

        kp = KeyProvider(PROVIDER, handler=self.unwrap)
        return DecryptConfig(
            providers={PROVIDER: (b"Enabled",)},
            keyproviders={PROVIDER: kp},
            given=(f"provider:{PROVIDER} (the hub's UnWrapKey, keys from the KBS)",),
        )

    def pull(
        self,
        image_url: str,
        bundle_path: str | os.PathLike[str],
        *,
        cancel: threading.Event | None = None,
    ) -> str:
        """Pull ``image_url`` and assemble ``bundle_path``; return the manifest digest."""
        from coco.image.pull import PullOptions, pull_image
        from coco.oci.transport import Access

        if not isinstance(image_url, str) or not image_url:
            raise CdhError("PullImage: expected an image reference, found an empty one")
        bundle = Path(bundle_path)
        if not bundle.is_absolute():
            raise CdhError(
                f"PullImage: expected an absolute bundle path, found {str(bundle_path)!r}"
            )
        reg = self._registries()
        if reg is None:
            reg = RegistryConfig(("docker.io",), ())
        places = reg.candidates(image_url)
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = self._layer_store()
        with tempfile.TemporaryDirectory(prefix="pull-", dir=self.work_dir) as t:
            tmp = Path(t)
            policy = self._policy(tmp)
            authfile = self._authfile(tmp)
            failures: list[str] = []
            for place in places:
                options = PullOptions(
                    access=Access(authfile=authfile, tls_verify=not place.insecure),
                    decryption=self._decryption,
                    policy=None if policy is None else _AsAskedFor(policy, place.logical),
                    jobs=self.settings.max_concurrent_layer_downloads_per_image,
                    flatten=self.flatten,
                )
                try:
                    result = pull_image(place.reference, bundle, store, options, cancel=cancel)
                except RegistryError as e:  # not there or not reachable: the next place
                    failures.append(f"{place.reference}: {e}")
                    continue
                log.info(
                    "pulled %s from %s: %s", image_url, place.reference, result.manifest_digest
                )
                return result.manifest_digest
        if len(failures) == 1:
            raise CdhError(f"PullImage {image_url}: {failures[0]}")
        raise CdhError(
            f"PullImage {image_url}: failed from all {len(failures)} mirror/mapping locations or "
            "the original location: " + "; ".join(failures)
        )


class _AsAskedFor:
    """The signature policy held against the name the image was asked for, wherever a mirror or
    remapped location (:class:`~coco.guest.cdh.registries.Place`) has it read from."""

    def __init__(self, policy: Any, logical: Any) -> None:
        self.policy, self.logical = policy, logical

    def check(self, source: Any, manifest_raw: bytes, manifest_digest: str) -> None:
        self.policy.check(source, manifest_raw, manifest_digest, logical=self.logical)


__all__ = ["ImagePuller"]
