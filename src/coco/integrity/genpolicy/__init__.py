"""genpolicy: generate the Kata agent policy of Kubernetes workloads.

For every Pod (or pod template of a Deployment, ReplicaSet, StatefulSet, DaemonSet, Job or
CronJob) in the input YAML, the images' configs are read through :mod:`coco.oci` and
``policy_data`` is assembled (see :mod:`.policy` for the two layer modes: guest pull, the default,
and tardev, where every layer's dm-verity root is computed, cached by diff_id). The policy text is
our ``rules.rego`` followed by ``policy_data := {...}``. It goes into the pod (template) as
upstream kata does today: an initdata document (a base one, e.g. with the guest's ``aa.toml`` and
``cdh.toml``, plus ``policy.rego``) in ``io.katacontainers.config.hypervisor.cc_init_data``
(base64 of gzip), and/or as base64 in the older ``io.katacontainers.config.agent.policy``.

Public API: :func:`generate` (YAML text in, YAML text out) and :class:`Options`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from coco.errors import CocoError, GenpolicyError, InitdataError
from coco.integrity import initdata as idata
from coco.integrity.agent_policy import default_rules, policy_text
from coco.integrity.genpolicy.images import ImageInfo, LayersCache, image_info
from coco.integrity.genpolicy.k8s import (
    POLICY_ANNOTATION,
    Inputs,
    load_documents,
    read_inputs,
    workloads,
)
from coco.integrity.genpolicy.policy import GUEST_PULL, LAYER_MODES, TARDEV, policy_data
from coco.integrity.genpolicy.settings import load_settings
from coco.oci.transport import Access

__all__ = [
    "ANNOTATIONS",
    "GUEST_PULL",
    "INITDATA_ANNOTATION",
    "LAYER_MODES",
    "POLICY_ANNOTATION",
    "TARDEV",
    "Options",
    "Result",
    "generate",
    "initdata_document",
    "policy_from_annotation",
]

INITDATA_ANNOTATION = idata.ANNOTATION
ANNOTATIONS = ("initdata", "policy", "both")
"""Where the policy goes: the initdata annotation (upstream kata today), the older policy
annotation (base64 Rego, read by the AKS runtime), or both (coco's shim requires them to agree)."""

log = logging.getLogger(__name__)


@dataclass
class Options:
    """How to generate: settings and rules files, registry access, explicit relaxations."""

    settings: str | Path | None = None
    rules: str | Path | None = None
    layers_cache: str | Path | None = None
    access: Access = field(default_factory=Access)
    config_files: tuple[str | Path, ...] = ()
    allow_exec: tuple[str, ...] = ()
    allow_logs: bool = False
    layers: str = GUEST_PULL
    annotation: str = "initdata"
    initdata: str | Path | None = None  # base initdata TOML; policy.rego is added to it


@dataclass
class Result:
    """The rewritten YAML and, per workload, its policy text and data."""

    yaml: str
    policies: list[tuple[str, str, dict[str, Any]]]  # (where, policy text, policy_data)
    layers_downloaded: int = 0
    initdata: list[bytes] = field(default_factory=list)  # per workload, the TOML document


def _read(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise GenpolicyError(f"{what} {path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError:
        raise GenpolicyError(f"{what} {path}: expected UTF-8 text") from None


def _toml_string(s: str) -> str:
    # a TOML basic string: JSON's escapes are TOML's, but DEL must be escaped too
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def initdata_document(policy: str, base: bytes | None = None, where: str = "initdata") -> bytes:
    """The initdata TOML carrying ``policy`` as ``policy.rego``: the ``base`` document's version,
    algorithm and files (its own policy.rego replaced), or a sha384 document with the policy."""
    algorithm, files = "sha384", {}
    if base is not None:
        try:
            doc = idata.Initdata.parse(base, where)
        except InitdataError as e:
            raise GenpolicyError(str(e)) from None
        algorithm, files = doc.algorithm, dict(doc.data)
    files.pop("policy.rego", None)
    files["policy.rego"] = policy
    lines = [f'version = "{idata.VERSION}"', f'algorithm = "{algorithm}"', "", "[data]"]
    lines += [f"{_toml_string(k)} = {_toml_string(v)}" for k, v in files.items()]
    raw = ("\n".join(lines) + "\n").encode()
    idata.Initdata.parse(raw, "generated initdata")  # ours must read back
    return raw


def generate(text: str, where: str, options: Options | None = None) -> Result:
    """Add the policy annotation(s) to every workload of the YAML ``text`` (named ``where``)."""
    options = options or Options()
    if options.layers not in LAYER_MODES:
        raise GenpolicyError(
            f"layers: expected one of {', '.join(LAYER_MODES)}, found {options.layers!r}"
        )
    if options.annotation not in ANNOTATIONS:
        raise GenpolicyError(
            f"annotation: expected one of {', '.join(ANNOTATIONS)}, found {options.annotation!r}"
        )
    base = None
    if options.initdata is not None:
        try:
            base = Path(options.initdata).read_bytes()
        except OSError as e:
            raise GenpolicyError(
                f"initdata {options.initdata}: cannot read it: {e.strerror}"
            ) from None
        initdata_document("", base, f"initdata {options.initdata}")  # refused before any pull
    settings = load_settings(options.settings)
    rules = _read(options.rules, "rules") if options.rules else default_rules()
    docs = load_documents(text, where)
    inputs = Inputs()
    read_inputs(docs, where, inputs)
    for cf in options.config_files:
        read_inputs(load_documents(_read(cf, "config file"), str(cf)), str(cf), inputs)
    found = workloads(docs, where)
    if not found:
        raise GenpolicyError(
            f"{where}: no workload (Pod, Deployment, ...) to generate a policy for"
        )
    cache = LayersCache(options.layers_cache)
    images: dict[str, ImageInfo] = {}
    downloaded = 0

    verity = options.layers == TARDEV

    def fetch(name: str) -> None:
        nonlocal downloaded
        if name not in images:
            log.info("pulling %s", name)
            images[name] = image_info(name, options.access, cache, verity=verity)
            downloaded += images[name].downloaded

    policies = []
    documents = []
    try:
        for w in found:
            pause = settings["cluster_config"]["pause_container_image"]
            try:
                fetch(pause)
            except CocoError as e:
                raise GenpolicyError(
                    f"{e} (the pause image, cluster_config.pause_container_image of the "
                    f"settings {options.settings or '(built in)'}: --settings can name another)"
                ) from None
            for key in ("initContainers", "containers"):
                for c in w.spec.get(key) or []:
                    fetch(c["image"])
            data = policy_data(
                w,
                settings,
                images,
                inputs,
                allow_exec=options.allow_exec,
                allow_logs=options.allow_logs,
                layers=options.layers,
            )
            ptext = policy_text(rules, data)
            raw = initdata_document(ptext, base, f"initdata {options.initdata}")
            for key in (POLICY_ANNOTATION, INITDATA_ANNOTATION, idata.ANNOTATION_LEGACY):
                w.annotations.pop(key, None)  # a stale one would contradict the new policy
            if options.annotation in ("initdata", "both"):
                w.annotations[INITDATA_ANNOTATION] = idata.encode(raw)
            if options.annotation in ("policy", "both"):
                w.annotations[POLICY_ANNOTATION] = base64.b64encode(ptext.encode()).decode()
            policies.append((w.where, ptext, data))
            documents.append(raw)
    finally:
        cache.save()
    out = io.StringIO()
    yaml.safe_dump_all(docs, out, sort_keys=False, explicit_start=True, width=1 << 30)
    return Result(out.getvalue(), policies, downloaded, documents)


def _annotated_policy(anno: dict[str, Any], where: str) -> str | None:
    if POLICY_ANNOTATION in anno:
        try:
            return base64.b64decode(str(anno[POLICY_ANNOTATION]), validate=True).decode()
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise GenpolicyError(
                f"{where}: annotation {POLICY_ANNOTATION}: expected base64 of UTF-8 Rego text"
            ) from None
    for key in (INITDATA_ANNOTATION, idata.ANNOTATION_LEGACY):
        if key in anno:
            try:
                doc = idata.decode(str(anno[key]), f"{where}: annotation {key}")
            except InitdataError as e:
                raise GenpolicyError(str(e)) from None
            if "policy.rego" not in doc.data:
                raise GenpolicyError(f"{where}: annotation {key}: the initdata has no policy.rego")
            return doc.data["policy.rego"]
    return None


def policy_from_annotation(text: str, where: str) -> str:
    """The policy text carried by the first document of YAML ``text`` that has a policy
    annotation: the legacy one, else the initdata's ``policy.rego``."""
    docs = load_documents(text, where)
    for doc in docs:
        stack = [doc]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                anno = node.get("annotations")
                if isinstance(anno, dict):
                    found = _annotated_policy(anno, where)
                    if found is not None:
                        return found
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    raise GenpolicyError(
        f"{where}: no {INITDATA_ANNOTATION} or {POLICY_ANNOTATION} annotation found"
    )
