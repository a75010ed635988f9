"""genpolicy: generate the Kata agent policy of Kubernetes workloads.

For every Pod (or pod template of a Deployment, ReplicaSet, StatefulSet, DaemonSet, Job or
CronJob) in the input YAML, the images are pulled through :mod:`coco.oci`, every layer's tardev
dm-verity root is computed (cached by diff_id), and ``policy_data`` is assembled. The policy text
is our ``rules.rego`` followed by ``policy_data := {...}``; its base64 goes into the
``io.katacontainers.config.agent.policy`` annotation of the pod (template).

Public API: :func:`generate` (YAML text in, YAML text out) and :class:`Options`.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from coco.errors import GenpolicyError
from coco.integrity.agent_policy import default_rules, policy_text
from coco.integrity.genpolicy.images import ImageInfo, LayersCache, image_info
from coco.integrity.genpolicy.k8s import (
    POLICY_ANNOTATION,
    Inputs,
    load_documents,
    read_inputs,
    workloads,
)
from coco.integrity.genpolicy.policy import policy_data
from coco.integrity.genpolicy.settings import load_settings
from coco.oci.transport import Access

__all__ = ["POLICY_ANNOTATION", "Options", "Result", "generate", "policy_from_annotation"]

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


@dataclass
class Result:
    """The rewritten YAML and, per workload, its policy text and data."""

    yaml: str
    policies: list[tuple[str, str, dict[str, Any]]]  # (where, policy text, policy_data)
    layers_downloaded: int = 0


def _read(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise GenpolicyError(f"{what} {path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError:
        raise GenpolicyError(f"{what} {path}: expected UTF-8 text") from None


def generate(text: str, where: str, options: Options | None = None) -> Result:
    """Add the policy annotation to every workload of the YAML ``text`` (named ``where``)."""
    options = options or Options()
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

    def fetch(name: str) -> None:
        nonlocal downloaded
        if name not in images:
            log.info("pulling %s", name)
            images[name] = image_info(name, options.access, cache)
            downloaded += images[name].downloaded

    policies = []
    try:
        for w in found:
            fetch(settings["cluster_config"]["pause_container_image"])
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
            )
            ptext = policy_text(rules, data)
            w.annotations[POLICY_ANNOTATION] = base64.b64encode(ptext.encode()).decode()
            policies.append((w.where, ptext, data))
    finally:
        cache.save()
    out = io.StringIO()
    yaml.safe_dump_all(docs, out, sort_keys=False, explicit_start=True, width=1 << 30)
    return Result(out.getvalue(), policies, downloaded)


def policy_from_annotation(text: str, where: str) -> str:
    """The policy text carried by the first document of YAML ``text`` that has the annotation."""
    docs = load_documents(text, where)
    for doc in docs:
        stack = [doc]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                anno = node.get("annotations")
                if isinstance(anno, dict) and POLICY_ANNOTATION in anno:
                    try:
                        return base64.b64decode(
                            str(anno[POLICY_ANNOTATION]), validate=True
                        ).decode()
                    except (ValueError, UnicodeDecodeError):
                        raise GenpolicyError(
                            f"{where}: annotation {POLICY_ANNOTATION}: expected base64 of UTF-8 Rego text"
                        ) from None
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    raise GenpolicyError(f"{where}: no {POLICY_ANNOTATION} annotation found")
