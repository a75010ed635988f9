"""The ``kbs`` KMS provider: a Getter whose secret names are KBS resource URIs."""

from __future__ import annotations

from coco.guest.cdh.errors import KmsError
from coco.guest.cdh.kms import Annotations, KmsContext, Provider, ProviderSettings
from coco.protocol.resource_uri import ResourceUri, ResourceUriError


class KbsGetter:
    """``get_secret(kbs:///repo/type/tag)``: the resource, through the hub's KBS client."""

    def __init__(self, settings: ProviderSettings, ctx: KmsContext) -> None:
        if ctx.getter is None:
            raise KmsError("KMS provider 'kbs': no KBS client is configured")
        self._getter = ctx.getter

    def get_secret(self, name: str, annotations: Annotations) -> bytes:
        try:
            ResourceUri.parse(name, "KMS provider 'kbs': secret name")
        except ResourceUriError as e:
            raise KmsError(str(e)) from None
        return self._getter.get_resource(name)


PROVIDER = Provider("kbs", getter=KbsGetter)
