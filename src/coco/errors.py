"""The exception hierarchy: one root, one family per package.

Every error that reaches a user carries a message that says where it happened, what was expected and
what was found. The CLI prints ``str(error)`` on one line and exits 1.
"""


class CocoError(Exception):
    """Root of every error this package raises on purpose."""


class UsageError(CocoError):
    """The caller asked for something that cannot be done as asked (bad flag value, bad reference).

    The one usage error: ``status`` is the exit code the CLI gives it, 1 by default, 2 for a
    command line that does not parse (argparse's code; :func:`coco.cli._args.Usage` makes those).
    """

    def __init__(self, message: str = "", *, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class MissingExtraError(CocoError):
    """A feature whose Python package comes with an extra that is not installed."""

    def __init__(self, module: str, extra: str, what: str) -> None:
        super().__init__(
            f"{what} needs the Python package {module}, which is not installed: "
            f"pip install 'confidential-containers[{extra}]'"
        )
        self.module, self.extra = module, extra


class RegoError(CocoError):
    """A Rego policy that does not compile, an unusable input, or a failed evaluation (coco.rego)."""


class OciError(CocoError):
    """OCI image formats, layouts and transports."""


class ManifestError(OciError):
    """A manifest, index or config that is not what the image spec allows."""


class DigestMismatchError(OciError):
    """Content whose digest or size is not the one its descriptor promised."""


class RegistryError(OciError):
    """A registry answered with an error, or could not be reached."""


class AuthError(RegistryError):
    """Credentials were missing, malformed or refused."""


class OcicryptError(CocoError):
    """Layer encryption and key wrapping."""


class DecryptionError(OcicryptError):
    """A layer could not be decrypted: no usable key, wrong key, or tampered data."""


class IntegrityError(CocoError):
    """dm-verity, tardev, policies, initdata."""


class VerityError(IntegrityError):
    """dm-verity parameters, hash trees and superblocks that are not what was asked or expected."""


class VerityMismatchError(VerityError):
    """A data or hash block whose hash is not the one the tree above it (or the root) records."""


class TarIndexError(IntegrityError):
    """A tar archive that cannot be indexed (truncated, bad checksum, malformed header)."""


class InitdataError(IntegrityError):
    """An initdata document (TOML, digest, annotation) that is not what the spec allows."""


class AgentPolicyError(IntegrityError):
    """An agent policy or a request to evaluate against it is unusable."""


class GenpolicyError(IntegrityError):
    """genpolicy input (Kubernetes YAML, settings, images) is unusable."""


class AttestationError(CocoError):
    """Evidence that could not be produced or did not verify."""


class KbsError(CocoError):
    """Key Broker Service protocol errors (client and server side)."""


class ImageError(CocoError):
    """Image pull, layer store, unpack and bundles."""


class UnpackError(ImageError):
    """A layer tar that was refused (hostile or malformed entry, limit exceeded)."""


class LayerStoreError(ImageError):
    """The layer store: bad diff_id, missing layer, index problems."""


class BundleError(ImageError):
    """A bundle (rootfs + config.json) that could not be assembled or removed."""


class PullError(ImageError):
    """``coco image pull``: a layer whose bytes did not check out, or a refused image."""


class SignatureError(ImageError):
    """Image signatures: policy.json, registries.d, simple signing and sigstore formats."""


class PolicyError(SignatureError):
    """A policy.json (or registries.d file) that is not what the format allows."""


class PolicyRefusedError(SignatureError):
    """An image that the signature policy refused; the message names the requirement."""


class HostError(CocoError):
    """The host side: pod VMs, the container runtime, peer pods."""


class PodVmError(HostError):
    """A pod VM image that could not be built, or a pod VM that did not boot."""
