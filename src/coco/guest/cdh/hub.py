"""The Confidential Data Hub: one object behind the five services of upstream's CDH.

:class:`Hub` holds the configuration and the KBS client (any :class:`ResourceGetter`) and answers:

- :meth:`Hub.get_resource` (``GetResource``): the bytes of ``kbs:///repo/type/tag``;
- :meth:`Hub.unseal_secret` (``UnsealSecret``): the plaintext of a ``sealed.`` secret;
- :meth:`Hub.keyprovider` (``UnWrapKey``): a layer key from its AnnotationPacket;
- :meth:`Hub.pull_image` (``PullImage``): an image into a bundle, returning its manifest digest;
- :meth:`Hub.secure_mount` (``SecureMount``): an encrypted block device, mounted.

:meth:`Hub.provision_credentials` writes the ``[[credentials]]`` resources to their paths, as the
hub does when it starts. The servers (ttRPC) and the command line are thin layers over this.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from coco.guest.cdh import annotation_packet
from coco.guest.cdh.config import CdhConfig
from coco.guest.cdh.errors import CdhError, ResourceError, UnwrapKeyError
from coco.guest.cdh.image import ImagePuller
from coco.guest.cdh.kms import LOCAL_KEY_DIR, KmsContext
from coco.guest.cdh.resource import ResourceGetter
from coco.guest.cdh.secret import SEALED_SECRET_DIR, UnsealContext, unseal
from coco.guest.cdh.secure_mount import DM_CONTROL, SecureMounter
from coco.protocol.resource_uri import ResourceUri

log = logging.getLogger(__name__)


class Hub:
    """The hub's logic, independent of how it is reached."""

    def __init__(
        self,
        config: CdhConfig,
        getter: ResourceGetter | None,
        *,
        sealed_secret_dir: str = SEALED_SECRET_DIR,
        local_key_dir: str = LOCAL_KEY_DIR,
        dm_control: str = DM_CONTROL,
        flatten: bool = False,
    ) -> None:
        self.config = config
        self.getter = getter
        self.kms = KmsContext(getter, local_key_dir)
        if config.skip_sealed_secret_verification:
            log.warning(
                "%s: skip_sealed_secret_verification = true: sealed secrets are NOT verified "
                "(insecure)",
                config.source,
            )
        self.unseal_context = UnsealContext(
            getter, self.kms, sealed_secret_dir, config.skip_sealed_secret_verification
        )
        self.images = ImagePuller(config.image, getter, self.keyprovider, flatten=flatten)
        self.mounter = SecureMounter(self._mount_key, dm_control=dm_control)

    # --- the services ---------------------------------------------------------------------------

    def get_resource(self, uri: str) -> bytes:
        """``GetResource``: the resource named by ``uri`` (the KBS address in it is ignored)."""
        parsed = ResourceUri.parse(uri, "GetResource")
        if self.getter is None:
            raise ResourceError(f"GetResource {uri}: no KBS client is configured")
        return self.getter.get_resource(f"kbs:///{parsed.resource_path}")

    def unseal_secret(self, secret: bytes | str) -> bytes:
        """``UnsealSecret``."""
        return unseal(secret, self.unseal_context)

    def _kek(self, kid: str) -> bytes:
        return self.get_resource(kid)

    def unwrap_key(self, request: bytes) -> bytes:
        """``UnWrapKey``: a keyprovider ``keyunwrap`` request (JSON) to its answer (JSON)."""
        return annotation_packet.unwrap_key(request, self._kek, self.kms)

    def keyprovider(self, method: str, request: bytes) -> bytes:
        """The keyprovider service in process (``WrapKey`` is not the guest's business)."""
        if method == "UnWrapKey":
            return self.unwrap_key(request)
        raise UnwrapKeyError(f"keyprovider {method}: not supported by the Confidential Data Hub")

    def pull_image(
        self,
        image_url: str,
        bundle_path: str | os.PathLike[str],
        cancel: threading.Event | None = None,
    ) -> str:
        """``PullImage``: returns the manifest digest (``cancel`` set: the pull stops, undone)."""
        return self.images.pull(image_url, bundle_path, cancel=cancel)

    def secure_mount(
        self,
        volume_type: str,
        options: Mapping[str, str],
        flags: Sequence[str],
        mount_point: str,
    ) -> None:
        """``SecureMount``."""
        self.mounter.mount(volume_type, options, flags, mount_point)

    def _mount_key(self, key: str) -> bytes:
        if key.startswith("sealed."):
            return self.unseal_secret(key)
        if key.startswith("file://"):
            path = Path(key[len("file://") :])
            try:
                return path.read_bytes()
            except OSError as e:
                raise CdhError(f"SecureMount key {key}: cannot read: {e.strerror}") from None
        return self.get_resource(key)

    # --- start-up -------------------------------------------------------------------------------

    def provision_credentials(self) -> list[Path]:
        """Fetch every ``[[credentials]]`` resource and write it (mode 0600) to its path."""
        written = []
        for c in self.config.credentials:
            data = self.get_resource(c.resource_uri)
            path = Path(c.path)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{path.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            written.append(path)
        return written
