"""cdh.toml: the Confidential Data Hub's configuration, in upstream's shape, read strictly.

::

    socket = "unix:///run/confidential-containers/cdh.sock"
    skip_sealed_secret_verification = false
    [aa]
    aa_socket = "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock"
    [kbc]
    name = "cc_kbc"                 # or "offline_fs_kbc"
    url = "http://127.0.0.1:8080"
    kbs_cert = "-----BEGIN CERTIFICATE-----..."
    [[credentials]]
    path = "/run/confidential-containers/cdh/kbs/kms-credential/x.json"
    resource_uri = "kbs:///default/credential/x"
    [image]
    image_security_policy_uri = "kbs:///default/security-policy/test"
    ...

A key this module does not know is refused with its name and the file (a misspelt key would
otherwise silently turn a check off). ``.json`` files hold the same document as JSON.

Without a file (:func:`load_config` with ``path=None``) the KBC comes from ``AA_KBC_PARAMS``
(``<kbc>::<url>``), else ``agent.aa_kbc_params=`` on the kernel command line, else
``offline_fs_kbc``. In both cases ``CDH_DEFAULT_IMAGE_AUTHENTICATED_REGISTRY_CREDENTIALS``
overrides the registry credentials URI, ``cdh.kbs_resources=<uri>::<path>,...`` on the kernel
command line adds credentials, and, when no ``[image]`` section is given, ``agent.https_proxy``,
``agent.http_proxy``, ``agent.no_proxy``, ``agent.image_registry_auth`` and (with
``agent.enable_signature_verification=true``) ``agent.image_policy_file`` fill it.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from coco.guest.cdh.errors import CdhConfigError

DEFAULT_SOCKET = "unix:///run/confidential-containers/cdh.sock"
DEFAULT_AA_SOCKET = "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock"
CDH_BASE_DIR = "/run/confidential-containers/cdh"
CREDENTIALS_DIR = CDH_BASE_DIR + "/kbs"
DEFAULT_WORK_DIR = "/run/kata-containers/image"
KBC_NAMES = ("cc_kbc", "offline_fs_kbc")
ENV_KBC_PARAMS = "AA_KBC_PARAMS"
ENV_REGISTRY_CREDENTIALS = "CDH_DEFAULT_IMAGE_AUTHENTICATED_REGISTRY_CREDENTIALS"
KERNEL_CMDLINE = "/proc/cmdline"


@dataclass(frozen=True, slots=True)
class KbcConfig:
    """``[kbc]``: which KBS client fetches resources, and where its KBS is."""

    name: str
    url: str = ""
    kbs_cert: str | None = None


@dataclass(frozen=True, slots=True)
class Credential:
    """One ``[[credentials]]`` entry: a resource written to ``path`` when the hub starts."""

    path: str
    resource_uri: str


@dataclass(frozen=True, slots=True)
class PullProxy:
    """``[image.image_pull_proxy]``."""

    https_proxy: str | None = None
    http_proxy: str | None = None
    no_proxy: str | None = None


@dataclass(frozen=True, slots=True)
class ImageSettings:
    """``[image]`` (image-rs's ImageConfig): where a pull's policy, credentials and keys come from."""

    work_dir: str = DEFAULT_WORK_DIR
    max_concurrent_layer_downloads_per_image: int = 3
    image_security_policy_uri: str | None = None
    image_security_policy: str | None = None
    sigstore_config_uri: str | None = None
    sigstore_config: str | None = None
    authenticated_registry_credentials_uri: str | None = None
    registry_configuration_uri: str | None = None
    registry_config: Mapping[str, Any] | None = None
    image_pull_proxy: PullProxy | None = None
    extra_root_certificates: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CdhConfig:
    """A whole cdh.toml; ``source`` says where it came from (for error messages)."""

    kbc: KbcConfig
    socket: str = DEFAULT_SOCKET
    skip_sealed_secret_verification: bool = False
    aa_socket: str = DEFAULT_AA_SOCKET
    credentials: tuple[Credential, ...] = ()
    image: ImageSettings = field(default_factory=ImageSettings)
    log_level: str | None = None
    source: str = "defaults"


# --- the strict reader ----------------------------------------------------------------------

_TOP = {"socket", "skip_sealed_secret_verification", "aa", "kbc", "credentials", "image", "log"}
_IMAGE = {
    "work_dir",
    "max_concurrent_layer_downloads_per_image",
    "image_security_policy_uri",
    "image_security_policy",
    "sigstore_config_uri",
    "sigstore_config",
    "authenticated_registry_credentials_uri",
    "registry_configuration_uri",
    "registry_config",
    "image_pull_proxy",
    "extra_root_certificates",
}


class _Table:
    """One table of the document: typed getters, and a check that no unknown key is left."""

    def __init__(self, doc: Any, where: str, name: str, keys: set[str]) -> None:
        if not isinstance(doc, dict):
            raise CdhConfigError(
                f"{where}: {name or 'the document'}: expected a table, found {_kind(doc)}"
            )
        self.doc, self.where, self.name = doc, where, name
        unknown = sorted(set(doc) - keys)
        if unknown:
            raise CdhConfigError(
                f"{where}: unknown key {self._key(unknown[0])!r} (expected one of "
                f"{', '.join(sorted(keys))})"
            )

    def _key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def str(self, key: str, default: str | None = None) -> str | None:
        v = self.doc.get(key, default)
        if v is not None and not isinstance(v, str):
            raise CdhConfigError(
                f"{self.where}: {self._key(key)}: expected a string, found {_kind(v)}"
            )
        return v

    def bool(self, key: str, default: bool) -> bool:
        v = self.doc.get(key, default)
        if not isinstance(v, bool):
            raise CdhConfigError(
                f"{self.where}: {self._key(key)}: expected true or false, found {_kind(v)}"
            )
        return v

    def table(self, key: str, keys: set[str]) -> _Table | None:
        v = self.doc.get(key)
        return None if v is None else _Table(v, self.where, self._key(key), keys)


def _kind(v: object) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(v), type(v).__name__
    )


def parse_config(doc: Any, where: str) -> CdhConfig:
    """A cdh.toml document (already decoded from TOML or JSON) as a :class:`CdhConfig`."""
    top = _Table(doc, where, "", _TOP)
    kbc_t = top.table("kbc", {"name", "url", "kbs_cert"})
    if kbc_t is None:
        raise CdhConfigError(f"{where}: expected a [kbc] section with a name, found none")
    name = kbc_t.str("name")
    if not name:
        raise CdhConfigError(
            f"{where}: kbc.name: expected one of {', '.join(KBC_NAMES)}, found none"
        )
    kbc = KbcConfig(
        _kbc_name(name, f"{where}: kbc.name"), kbc_t.str("url", "") or "", kbc_t.str("kbs_cert")
    )
    aa_t = top.table("aa", {"aa_socket"})
    log_t = top.table("log", {"level"})
    creds_doc = top.doc.get("credentials", [])
    if not isinstance(creds_doc, list):
        raise CdhConfigError(f"{where}: credentials: expected an array of tables ([[credentials]])")
    creds = []
    for i, c in enumerate(creds_doc):
        t = _Table(c, where, f"credentials[{i}]", {"path", "resource_uri"})
        path, uri = t.str("path"), t.str("resource_uri")
        if not path or not uri:
            raise CdhConfigError(f"{where}: credentials[{i}]: expected both path and resource_uri")
        creds.append(_credential(path, uri, f"{where}: credentials[{i}]"))
    image_t = top.table("image", _IMAGE)
    return CdhConfig(
        kbc=kbc,
        socket=top.str("socket", DEFAULT_SOCKET) or DEFAULT_SOCKET,
        skip_sealed_secret_verification=top.bool("skip_sealed_secret_verification", False),
        aa_socket=(aa_t.str("aa_socket", DEFAULT_AA_SOCKET) if aa_t else None) or DEFAULT_AA_SOCKET,
        credentials=tuple(creds),
        image=_image(image_t) if image_t is not None else _NO_IMAGE,
        log_level=log_t.str("level") if log_t else None,
        source=where,
    )


_NO_IMAGE = ImageSettings()  # marks "no [image] section": the kernel command line may fill it


def _kbc_name(name: str, where: str) -> str:
    if name not in KBC_NAMES:
        raise CdhConfigError(f"{where}: expected one of {', '.join(KBC_NAMES)}, found {name!r}")
    return name


def _credential(path: str, uri: str, where: str) -> Credential:
    p = PurePosixPath(path)
    base = PurePosixPath(CREDENTIALS_DIR)
    if not p.is_absolute() or ".." in p.parts or base not in p.parents:
        raise CdhConfigError(
            f"{where}: path must be a file under {CREDENTIALS_DIR}, found {path!r}"
        )
    return Credential(path, uri)


def _image(t: _Table) -> ImageSettings:
    jobs = t.doc.get("max_concurrent_layer_downloads_per_image", 3)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise CdhConfigError(
            f"{t.where}: image.max_concurrent_layer_downloads_per_image: expected a positive "
            f"integer, found {jobs!r}"
        )
    proxy_t = t.table("image_pull_proxy", {"https_proxy", "http_proxy", "no_proxy"})
    proxy = None
    if proxy_t is not None:
        proxy = PullProxy(
            proxy_t.str("https_proxy"), proxy_t.str("http_proxy"), proxy_t.str("no_proxy")
        )
    certs = t.doc.get("extra_root_certificates", [])
    if not isinstance(certs, list) or not all(isinstance(c, str) for c in certs):
        raise CdhConfigError(
            f"{t.where}: image.extra_root_certificates: expected an array of PEM strings"
        )
    if certs:
        raise CdhConfigError(
            f"{t.where}: image.extra_root_certificates: not supported yet (found {len(certs)} "
            "certificate(s)); the registry client verifies against the system's CA store"
        )
    reg = t.doc.get("registry_config")
    if reg is not None:
        from coco.guest.cdh.registries import RegistryConfig  # checks the shape now

        RegistryConfig.parse(reg, f"{t.where}: image.registry_config")
    return ImageSettings(
        work_dir=t.str("work_dir", DEFAULT_WORK_DIR) or DEFAULT_WORK_DIR,
        max_concurrent_layer_downloads_per_image=jobs,
        image_security_policy_uri=t.str("image_security_policy_uri"),
        image_security_policy=t.str("image_security_policy"),
        sigstore_config_uri=t.str("sigstore_config_uri"),
        sigstore_config=t.str("sigstore_config"),
        authenticated_registry_credentials_uri=t.str("authenticated_registry_credentials_uri"),
        registry_configuration_uri=t.str("registry_configuration_uri"),
        registry_config=reg,
        image_pull_proxy=proxy,
    )


# --- files, environment and the kernel command line ------------------------------------------


def read_config_file(path: str | os.PathLike[str]) -> CdhConfig:
    """Read a cdh.toml (or ``.json``) file."""
    p = Path(path)
    where = str(p)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise CdhConfigError(f"{where}: config file not found") from None
    except OSError as e:
        raise CdhConfigError(f"{where}: cannot read the config file: {e.strerror}") from None
    if p.suffix == ".json":
        from coco.jsonio import loads

        doc = loads(raw, what=where, error=CdhConfigError)
    else:
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise CdhConfigError(
                f"{where}: expected UTF-8 TOML, found bytes that are not UTF-8"
            ) from None
        except tomllib.TOMLDecodeError as e:
            raise CdhConfigError(f"{where}: expected TOML: {e}") from None
    return parse_config(doc, where)


def kernel_params(cmdline_path: str | os.PathLike[str] = KERNEL_CMDLINE) -> dict[str, str]:
    """``key=value`` words of the kernel command line (a missing file: none)."""
    try:
        text = Path(cmdline_path).read_text(errors="replace")
    except OSError:
        return {}
    out: dict[str, str] = {}
    for word in text.split():
        if word == "--":
            break
        key, sep, value = word.partition("=")
        if sep:
            out[key] = value
    return out


def parse_kbc_params(text: str, where: str) -> KbcConfig:
    """``<kbc_name>::<kbs_uri>`` (``aa_kbc_params``)."""
    parts = text.split("::")
    if len(parts) != 2 or not parts[0]:
        raise CdhConfigError(f"{where}: expected <kbc_name>::<kbs_uri>, found {text!r}")
    return KbcConfig(_kbc_name(parts[0], where), parts[1])


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cmdline_path: str | os.PathLike[str] = KERNEL_CMDLINE,
) -> CdhConfig:
    """The hub's configuration: ``path`` (cdh.toml), else the environment and kernel command line."""
    env = os.environ if environ is None else environ
    params = kernel_params(cmdline_path)
    if path is not None:
        cfg = read_config_file(path)
    elif env.get(ENV_KBC_PARAMS):
        cfg = CdhConfig(
            parse_kbc_params(env[ENV_KBC_PARAMS], ENV_KBC_PARAMS), source=ENV_KBC_PARAMS
        )
    elif "agent.aa_kbc_params" in params:
        where = f"{cmdline_path}: agent.aa_kbc_params"
        cfg = CdhConfig(
            parse_kbc_params(params["agent.aa_kbc_params"], where), source=str(cmdline_path)
        )
    else:
        cfg = CdhConfig(KbcConfig("offline_fs_kbc", ""), source="defaults")
    image = cfg.image
    if path is None or image is _NO_IMAGE:
        image = _image_from_kernel(params)
    override = env.get(ENV_REGISTRY_CREDENTIALS)
    if override:
        image = replace(image, authenticated_registry_credentials_uri=override)
    creds = list(cfg.credentials)
    extra = params.get("cdh.kbs_resources")
    if extra:
        where = f"{cmdline_path}: cdh.kbs_resources"
        for item in extra.split(","):
            uri, sep, dest = item.partition("::")
            if not sep or not uri or not dest:
                raise CdhConfigError(f"{where}: expected <uri>::<path>[,...], found {item!r}")
            creds.append(_credential(dest, uri, where))
    return replace(cfg, image=image, credentials=tuple(creds))


def _image_from_kernel(params: Mapping[str, str]) -> ImageSettings:
    proxy = None
    if any(f"agent.{k}" in params for k in ("https_proxy", "http_proxy", "no_proxy")):
        proxy = PullProxy(
            params.get("agent.https_proxy"),
            params.get("agent.http_proxy"),
            params.get("agent.no_proxy"),
        )
    policy = None
    if params.get("agent.enable_signature_verification", "").lower() == "true":
        policy = params.get("agent.image_policy_file")
    return ImageSettings(
        image_security_policy_uri=policy,
        authenticated_registry_credentials_uri=params.get("agent.image_registry_auth"),
        image_pull_proxy=proxy,
    )


def ocicrypt_config_json(socket: str) -> bytes:
    """What the hub writes as ``OCICRYPT_KEYPROVIDER_CONFIG``: its own socket as the
    ``attestation-agent`` key provider (upstream's shape)."""
    doc = {"key-providers": {"attestation-agent": {"ttrpc": socket}}}
    return json.dumps(doc, separators=(",", ":")).encode()
