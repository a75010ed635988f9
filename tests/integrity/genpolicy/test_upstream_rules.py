"""Our generated policy_data read by upstream's own rules (azl1 rules.rego from the vector pod).

The rules text comes from the policy annotation of ../shared/vectors/genpolicy/pod-one-container.yaml
(upstream-generated); only its rules part is used, with our policy_data after it. That upstream
rules accept our data for the matching request, and refuse altered ones, shows our data speaks
the upstream structure.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path

import pytest
import yaml

from coco.integrity.agent_policy import AgentPolicy, policy_text
from coco.integrity.genpolicy import generate
from tests.integrity.genpolicy.helpers import Images, create_container_request, opts, pod, policy_of

VECTOR = Path("/work/shared/vectors/genpolicy/pod-one-container.yaml")


@pytest.fixture(scope="module")
def upstream_rules() -> str:
    doc = yaml.safe_load(VECTOR.read_text())
    text = base64.b64decode(doc["metadata"]["annotations"]["io.katacontainers.config.agent.policy"])
    return text.decode().split("\npolicy_data := ", 1)[0]


def test_upstream_rules_accept_our_policy_data(images: Images, upstream_rules: str) -> None:
    res = generate(pod(images.app, args=["--port", "8080"]), "pod.yaml", opts(images))
    _, data = policy_of(res.yaml)
    pol = AgentPolicy(policy_text(upstream_rules, data), "upstream rules + our data")
    for i in (0, 1):
        assert pol.evaluate("CreateContainerRequest", create_container_request(data, i)).allowed, i
    req = create_container_request(data, 1)
    bad = copy.deepcopy(req)
    h = bad["storages"][1]["options"][3]
    bad["storages"][1]["options"][3] = h[:-1] + ("0" if h[-1] != "0" else "1")
    assert not pol.evaluate("CreateContainerRequest", bad).allowed
    bad = copy.deepcopy(req)
    bad["OCI"]["Process"]["Args"][-1] = "9090"
    assert not pol.evaluate("CreateContainerRequest", bad).allowed
    bad = copy.deepcopy(req)
    bad["OCI"]["Annotations"]["io.kubernetes.cri.sandbox-namespace"] = "kube-system"
    assert not pol.evaluate("CreateContainerRequest", bad).allowed
    assert not pol.evaluate("ExecProcessRequest", {"process": {"Args": ["sh"]}}).allowed
