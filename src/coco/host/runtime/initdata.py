"""The initdata a pod's sandbox starts with: how its policy reaches the guest.

From the pod's annotations: ``io.katacontainers.config.hypervisor.cc_init_data`` (base64 gzip
TOML, as ``coco initdata`` writes it) is taken as it is; ``io.katacontainers.config.agent.policy``
(base64 Rego, as ``coco policy generate`` writes it) becomes the document's ``policy.rego``. With
both, the policies must agree (a document that has a different one is refused: the guest would
measure one and enforce the other). Neither: no initdata, and the agent runs with its default.
"""

from __future__ import annotations

import base64
import binascii
import json

from coco.errors import InitdataError
from coco.host.runtime import ShimError
from coco.host.runtime.spec import POLICY_ANNOTATION
from coco.integrity import initdata as idata


def policy_text(annotations: dict[str, str]) -> str | None:
    value = annotations.get(POLICY_ANNOTATION)
    if value is None:
        return None
    try:
        return base64.b64decode("".join(value.split()), validate=True).decode("utf-8")
    except (binascii.Error, ValueError) as e:
        raise ShimError(
            f"annotation {POLICY_ANNOTATION}: expected the policy as standard base64, "
            f"found {value[:40]!r}: {e}"
        ) from None


def document(policy: str, algorithm: str = "sha384") -> bytes:
    """An initdata TOML holding ``policy.rego`` (a TOML basic string: JSON escapes are valid)."""
    return (
        f'version = "{idata.VERSION}"\nalgorithm = "{algorithm}"\n\n[data]\n'
        f'"policy.rego" = {json.dumps(policy, ensure_ascii=False)}\n'
    ).encode()


def from_annotations(annotations: dict[str, str]) -> bytes | None:
    """The initdata TOML for a pod, or None when it carries neither annotation."""
    policy = policy_text(annotations)
    packed = annotations.get(idata.ANNOTATION) or annotations.get(idata.ANNOTATION_LEGACY)
    if packed is None:
        return None if policy is None else document(policy)
    try:
        doc = idata.decode(packed, f"annotation {idata.ANNOTATION}")
    except InitdataError as e:
        raise ShimError(str(e)) from None
    if policy is not None and doc.data.get("policy.rego", policy) != policy:
        raise ShimError(
            f"annotations {POLICY_ANNOTATION} and {idata.ANNOTATION}: expected one policy, "
            "found two different ones"
        )
    if policy is not None and "policy.rego" not in doc.data:
        raise ShimError(
            f"annotation {idata.ANNOTATION}: the initdata has no policy.rego but the pod has "
            f"{POLICY_ANNOTATION}: put the policy into the initdata (its digest must cover it)"
        )
    return doc.raw
