"""aa.toml, upstream's Attestation Agent configuration (TOML, or JSON when the name ends .json).

```toml
[token_configs.kbs]
url = "http://127.0.0.1:8080"
cert = "-----BEGIN CERTIFICATE----- ..."      # optional: the KBS's certificate or CA, as PEM text
tee_key_algorithm = "ECDH-ES+A256KW-P256"     # or ECDH-ES+A256KW-P521, RSA-OAEP-256

[eventlog_config]
eventlog_algorithm = "sha384"   # accepted; the digest is the measured register's own algorithm
init_pcr = 17
enable_eventlog = false

[log]
level = "info"
```
Without a file, :meth:`AaConfig.from_kernel_cmdline` takes the KBS URL from ``aa_kbc_params``
(``$AA_KBC_PARAMS``, then ``agent.aa_kbc_params=`` on the kernel command line) when it names
``cc_kbc``, as upstream does. Unknown sections and keys are refused (a typo would otherwise be
silently ignored).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coco import jsonio
from coco.errors import CocoError
from coco.guest.kbc import (
    CC_KBC,
    KERNEL_CMDLINE,
    TEE_KEY_ALGORITHMS,
    aa_kbc_params,
    parse_kbc_params,
)

DEFAULT_PCR = 17
EVENTLOG_ALGORITHMS = ("sha256", "sha384", "sha512", "sm3")


class AaError(CocoError):
    """Attestation Agent: configuration, evidence, tokens, runtime measurements."""


class AaConfigError(AaError):
    """An aa.toml that is not what upstream's shape allows."""


@dataclass(frozen=True)
class KbsTokenConfig:
    url: str
    cert: str | None = None
    tee_key_algorithm: str = "ECDH-ES+A256KW-P256"

    @property
    def key_algorithm(self) -> str:
        """The name :class:`coco.protocol.client.KbsClient` uses for the TEE key algorithm."""
        return TEE_KEY_ALGORITHMS[self.tee_key_algorithm]


@dataclass(frozen=True)
class EventlogConfig:
    init_pcr: int = DEFAULT_PCR
    enable_eventlog: bool = False
    eventlog_algorithm: str = "sha384"


@dataclass(frozen=True)
class AaConfig:
    kbs: KbsTokenConfig | None = None
    coco_as_url: str | None = None
    eventlog: EventlogConfig = field(default_factory=EventlogConfig)
    log_level: str | None = None

    @classmethod
    def load(cls, path: Path | str) -> AaConfig:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise AaConfigError(f"{path}: cannot read the AA config: {e.strerror}") from None
        if path.suffix == ".json":
            doc = jsonio.loads(raw, what=str(path), error=AaConfigError)
        else:
            try:
                doc = tomllib.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
                raise AaConfigError(f"{path}: expected TOML: {e}") from None
        return cls.parse(doc, str(path))

    @classmethod
    def parse(cls, doc: Any, where: str = "aa.toml") -> AaConfig:
        top = _table(doc, where, {"token_configs", "eventlog_config", "log"})
        tokens = _table(
            top.get("token_configs", {}), f"{where}: [token_configs]", {"kbs", "coco_as"}
        )
        kbs = None
        if "kbs" in tokens:
            w = f"{where}: [token_configs.kbs]"
            t = _table(tokens["kbs"], w, {"url", "cert", "tee_key_algorithm"})
            url = _str(t, "url", w, required=True)
            assert url is not None
            try:
                parse_kbc_params(f"{CC_KBC}::{url}", f"{w} url")
            except CocoError as e:
                raise AaConfigError(str(e)) from None
            alg = _str(t, "tee_key_algorithm", w) or "ECDH-ES+A256KW-P256"
            if alg not in TEE_KEY_ALGORITHMS:
                raise AaConfigError(
                    f"{w} tee_key_algorithm: expected one of {', '.join(TEE_KEY_ALGORITHMS)}, "
                    f"found {alg!r}"
                )
            kbs = KbsTokenConfig(url, _str(t, "cert", w), alg)
        coco_as = None
        if "coco_as" in tokens:
            w = f"{where}: [token_configs.coco_as]"
            coco_as = _str(_table(tokens["coco_as"], w, {"url"}), "url", w, required=True)
        w = f"{where}: [eventlog_config]"
        ev = _table(
            top.get("eventlog_config", {}), w, {"eventlog_algorithm", "init_pcr", "enable_eventlog"}
        )
        pcr = ev.get("init_pcr", DEFAULT_PCR)
        if isinstance(pcr, bool) or not isinstance(pcr, int) or not 0 <= pcr < 24:
            raise AaConfigError(f"{w} init_pcr: expected a PCR number 0-23, found {pcr!r}")
        enable = ev.get("enable_eventlog", False)
        if not isinstance(enable, bool):
            raise AaConfigError(f"{w} enable_eventlog: expected true or false, found {enable!r}")
        alg = _str(ev, "eventlog_algorithm", w) or "sha384"
        if alg not in EVENTLOG_ALGORITHMS:
            raise AaConfigError(
                f"{w} eventlog_algorithm: expected one of {', '.join(EVENTLOG_ALGORITHMS)}, "
                f"found {alg!r}"
            )
        log = _table(top.get("log", {}), f"{where}: [log]", {"level"})
        return cls(
            kbs, coco_as, EventlogConfig(pcr, enable, alg), _str(log, "level", f"{where}: [log]")
        )

    @classmethod
    def from_kernel_cmdline(
        cls, environ: Mapping[str, str] | None = None, cmdline: Path = KERNEL_CMDLINE
    ) -> AaConfig:
        """Upstream's default without a file: the KBS of ``aa_kbc_params`` if it is ``cc_kbc``."""
        params = aa_kbc_params(environ, cmdline)
        if params is None:
            return cls()
        try:
            name, url = parse_kbc_params(params)
        except CocoError as e:
            raise AaConfigError(str(e)) from None
        return cls(KbsTokenConfig(url) if name == CC_KBC else None)


def _table(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise AaConfigError(f"{where}: expected a table, found {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise AaConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}: expected only {', '.join(sorted(allowed))}"
        )
    return value


def _str(table: dict[str, Any], key: str, where: str, required: bool = False) -> str | None:
    value = table.get(key)
    if value is None:
        if required:
            raise AaConfigError(f"{where}: missing {key!r}")
        return None
    if not isinstance(value, str):
        raise AaConfigError(f"{where} {key}: expected a string, found {type(value).__name__}")
    return value
