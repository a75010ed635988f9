"""The KMS plugin interface of the Confidential Data Hub, and the registry of built-in providers.

Four roles, as upstream's ``kms`` crate has them: a :class:`Decrypter` opens a data key that a KMS
wrapped (sealed ``envelope`` secrets), an :class:`Encrypter` makes one, a :class:`Getter` fetches a
named secret (sealed ``vault`` secrets), a :class:`Setter` stores one. :func:`new_decryptor`,
:func:`new_encryptor`, :func:`new_getter` and :func:`new_setter` find a provider by name, case
insensitively. Built in:

- ``kbs`` (:mod:`.kbs`): Getter only; the name is a resource URI fetched through the guest's KBS
  client (so only after attestation).
- ``local`` (:mod:`.local`): AES-256-GCM with key files in a local directory, for tests and offline
  use. It is not a KMS: whoever can read the directory has the keys.

Cloud KMSs (``aliyun``, ``aws``, ``ehsm``) are known by name and refused with "not built in"; a
new provider is a module with a :class:`Provider` added to :data:`PROVIDERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from coco.guest.cdh.config import CDH_BASE_DIR
from coco.guest.cdh.errors import KmsError
from coco.guest.cdh.resource import ResourceGetter

ProviderSettings = Mapping[str, Any]
Annotations = Mapping[str, Any]

LOCAL_KEY_DIR = CDH_BASE_DIR + "/kms-credential/local"
CLOUD_PROVIDERS = ("aliyun", "aws", "ehsm")


class Decrypter(Protocol):
    def decrypt(self, ciphertext: bytes, key_id: str, annotations: Annotations) -> bytes: ...


class Encrypter(Protocol):
    def encrypt(self, data: bytes, key_id: str) -> tuple[bytes, dict[str, Any]]: ...


class Getter(Protocol):
    def get_secret(self, name: str, annotations: Annotations) -> bytes: ...


class Setter(Protocol):
    def set_secret(self, content: bytes, name: str) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class KmsContext:
    """What the hub gives every plugin: its KBS client and the local key directory."""

    getter: ResourceGetter | None = None
    local_key_dir: str = LOCAL_KEY_DIR


Factory = Callable[[ProviderSettings, KmsContext], Any]


@dataclass(frozen=True, slots=True)
class Provider:
    """A KMS provider: a factory per role it plays (None: it does not play that role)."""

    name: str
    decrypter: Factory | None = None
    encrypter: Factory | None = None
    getter: Factory | None = None
    setter: Factory | None = None


def _providers() -> dict[str, Provider]:
    from coco.guest.cdh.kms import kbs, local

    return {p.name: p for p in (kbs.PROVIDER, local.PROVIDER)}


PROVIDERS: dict[str, Provider] = {}


def _find(name: str, role: str) -> Factory:
    if not PROVIDERS:
        PROVIDERS.update(_providers())
    key = name.lower() if isinstance(name, str) else name
    p = PROVIDERS.get(key)
    if p is None:
        if key in CLOUD_PROVIDERS:
            raise KmsError(
                f"KMS provider {name!r} is not built in (built in: {', '.join(sorted(PROVIDERS))})"
            )
        raise KmsError(
            f"unknown KMS provider {name!r} (built in: {', '.join(sorted(PROVIDERS))}; "
            f"known but not built in: {', '.join(CLOUD_PROVIDERS)})"
        )
    factory = getattr(p, role)
    if factory is None:
        roles = [r for r in ("decrypter", "encrypter", "getter", "setter") if getattr(p, r)]
        raise KmsError(
            f"KMS provider {p.name!r} cannot act as a {role} (it is a {', '.join(roles)})"
        )
    return factory


def _settings(settings: ProviderSettings | None) -> ProviderSettings:
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise KmsError(
            f"provider_settings: expected a JSON object, found {type(settings).__name__}"
        )
    return settings


def new_decryptor(name: str, settings: ProviderSettings | None, ctx: KmsContext) -> Decrypter:
    return _find(name, "decrypter")(_settings(settings), ctx)  # type: ignore[no-any-return]


def new_encryptor(name: str, settings: ProviderSettings | None, ctx: KmsContext) -> Encrypter:
    return _find(name, "encrypter")(_settings(settings), ctx)  # type: ignore[no-any-return]


def new_getter(name: str, settings: ProviderSettings | None, ctx: KmsContext) -> Getter:
    return _find(name, "getter")(_settings(settings), ctx)  # type: ignore[no-any-return]


def new_setter(name: str, settings: ProviderSettings | None, ctx: KmsContext) -> Setter:
    return _find(name, "setter")(_settings(settings), ctx)  # type: ignore[no-any-return]
