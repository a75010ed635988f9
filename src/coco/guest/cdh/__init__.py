"""The Confidential Data Hub (CDH): resources, sealed secrets, layer keys, image pulls and secure
mounts for the workloads of an attested guest, every secret coming through the KBS client.

- :mod:`.hub`: :class:`~coco.guest.cdh.hub.Hub`, the five services in one object;
- :mod:`.config`: cdh.toml in upstream's shape (and the kernel command line fallback);
- :mod:`.secret`: ``sealed.`` secrets (ES256-signed envelope and vault payloads), and sealing;
- :mod:`.kms`: the KMS plugin interface and its built-in providers (``kbs``, ``local``);
- :mod:`.annotation_packet`: the CoCo AnnotationPacket and the keyprovider UnWrapKey;
- :mod:`.image`: PullImage through :mod:`coco.image.pull`, configured by ``[image]``;
- :mod:`.registries`: mirrors, remapped and blocked registries of a pull;
- :mod:`.secure_mount`: the SecureMount ``block-device`` type (LUKS2 through cryptsetup);
- :mod:`.resource`: the :class:`~coco.guest.cdh.resource.ResourceGetter` interface.
"""
