"""OCI image-spec and distribution-spec: models, image layouts, registry client and copying.

Public entry points: :class:`~coco.oci.models.Descriptor`, :class:`~coco.oci.models.Manifest`,
:class:`~coco.oci.models.Index`, :class:`~coco.oci.models.ImageConfig`,
:class:`~coco.oci.layout.OciLayout`, :func:`~coco.oci.reference.parse_reference` and
:func:`~coco.oci.copy.copy_image`.
"""
