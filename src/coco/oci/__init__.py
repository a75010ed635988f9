"""OCI image-spec and distribution-spec: models, image layouts, registry client and copying.

Public entry points: :class:`~coco.oci.models.Descriptor`, :class:`~coco.oci.models.Manifest`,
:class:`~coco.oci.models.Index`, :class:`~coco.oci.models.ImageConfig`,
:class:`~coco.oci.layout.OciLayout`, :func:`~coco.oci.reference.parse_reference` and
:func:`~coco.oci.copy.copy_image`.
"""

AUTHFILE_ENV = ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "HOME")
"""The environment variables that locate registry auth files (read by
:func:`coco.oci.auth.default_authfiles`; a pull service is sent the caller's). Here, in the
package's light ``__init__``, so that a client can name them without loading the auth code."""
