"""Steps 3 to 5 of the demo: the pod, what happens inside it, and three refusals.

The pod is a Kubernetes Pod YAML; ``coco policy generate`` adds its agent policy (the layer's
verity root comes from the owner's layers cache: the encrypted layer cannot be read here); the
demo then writes the pod's initdata (the guest's ``aa.toml`` and ``cdh.toml``: where the KBS is,
where the signature policy lives, that the registry is plain HTTP; and the agent policy), whose
digest the resource policy requires of the evidence. ``coco pod run`` drives containerd through
the CRI as a kubelet would.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from coco.demo.owner import Containerd, Kbs
from coco.demo.session import DemoError, Session
from coco.demo.workload import COSIGN_KEY_PATH, IMAGE_KEY, POLICY_PATH, SECRET_PATH, Workload

POLICY_ANNOTATION = "io.katacontainers.config.agent.policy"
INITDATA_ANNOTATION = "io.katacontainers.config.hypervisor.cc_init_data"

# The attestation policy stays coco's default; the resource policy releases the three resources
# only to a token that policy did not mark contraindicated and whose evidence carries the pod's
# initdata digest. `allow_sample` is written in only for the INSECURE coco-local sandbox.
RESOURCE_POLICY = """\
package policy

import rego.v1

default allow := false

ae := input.submods.cpu0["ear.veraison.annotated-evidence"]

released := {{"{secret}", "{key}", "{cosign}", "{policy}"}}

allow if {{
	data.plugin == "resource"
	concat("/", data["resource-path"]) in released
	input.submods.cpu0["ear.status"] != "contraindicated"
	ae.init_data == "{digest}"
	tee_ok
}}

tee_ok if not ae.sample

tee_ok if {{
	ae.sample
	{allow_sample}
}}

deny_reason := "the evidence does not carry the pod's initdata digest" if {{
	ae.init_data != "{digest}"
}} else := "the evidence carries no initdata" if {{
	not ae.init_data
}} else := "the attestation policy does not trust the evidence" if {{
	input.submods.cpu0["ear.status"] == "contraindicated"
}}
"""


@dataclass
class Pod:
    yaml: Path
    name: str
    initdata: Path
    digest_b64: str


def pod_yaml(name: str, image: str, runtime_class: str, command: list[str]) -> str:
    return (
        "apiVersion: v1\nkind: Pod\nmetadata:\n"
        f"  name: {name}\n"
        "spec:\n"
        f"  runtimeClassName: {runtime_class}\n"
        "  terminationGracePeriodSeconds: 1\n"
        "  containers:\n"
        "  - name: app\n"
        f"    image: {image}\n"
        f"    command: {json.dumps(command)}\n"
    )


def initdata_toml(kbs_url: str, registry: str, policy: str, extra: str = "") -> str:
    aa = f'[token_configs.kbs]\nurl = "{kbs_url}"\n\n[eventlog_config]\nenable_eventlog = false\n'
    cdh = (
        f'[kbc]\nname = "cc_kbc"\nurl = "{kbs_url}"\n\n[image]\n'
        f'image_security_policy_uri = "kbs:///{POLICY_PATH}"\n\n'
        f'[[image.registry_config.registry]]\nlocation = "{registry}"\ninsecure = true\n'
    )
    return (
        'version = "0.1.0"\nalgorithm = "sha384"\n\n[data]\n'
        f'"aa.toml" = {json.dumps(aa)}\n"cdh.toml" = {json.dumps(cdh)}\n'
        f'"policy.rego" = {json.dumps(policy)}\n{extra}'
    )


def prepare(
    session: Session, kbs: Kbs, registry: str, w: Workload, runtime_class: str, kbs_url: str
) -> Pod:
    """Write the pod, generate its policy, add its initdata; return it."""
    d = session.work / "pod"
    d.mkdir(exist_ok=True)
    cache = d / "layers-cache.json"
    cache.write_text(
        json.dumps([{"diff_id": w.diff_id, "verity_hash": w.verity_root, "passwd": w.passwd,
                     "group": ""}])
    )  # fmt: skip
    settings = d / "genpolicy-settings.json"
    settings.write_text(json.dumps({"cluster_config": {"pause_container_image": w.pause}}))
    path = d / "pod.yaml"
    path.write_text(pod_yaml("coco-demo", w.image, runtime_class, ["/app/show-secret"]))
    session.say(f"the pod as its owner wrote it ({path}):")
    session._show(path.read_text())
    session.run(
        ["coco", "policy", "generate", str(path), "--layers-cache", str(cache),
         "--settings", str(settings),
         "--src-tls-verify=false", "--raw-out", str(d / "policy.rego")],
        what="generating the agent policy",
    )  # fmt: skip
    policy = (d / "policy.rego").read_text()
    session.say(
        f"agent policy: {len(policy)} bytes of Rego, in the annotation {POLICY_ANNOTATION}; the "
        "guest holds every request of the host against it"
    )
    initdata = d / "initdata.toml"
    initdata.write_text(initdata_toml(kbs_url, registry, policy))
    digest = _digest(session, initdata)
    _annotate(session, path, initdata)
    session.say(f"initdata digest (sha384), which the evidence must carry: {digest}")
    return Pod(path, "coco-demo", initdata, base64.b64encode(bytes.fromhex(digest)).decode())


def _digest(session: Session, initdata: Path) -> str:
    out = session.run(["coco", "initdata", "digest", str(initdata), "--format", "json"])
    return json.loads(out.stdout)["digest"]


def _annotate(session: Session, pod: Path, initdata: Path) -> None:
    import yaml

    encoded = session.run(["coco", "initdata", "encode", str(initdata)], show=False).stdout.strip()
    doc = yaml.safe_load(pod.read_text())
    doc["metadata"].setdefault("annotations", {})[INITDATA_ANNOTATION] = encoded
    pod.write_text(yaml.safe_dump(doc, sort_keys=False))


def upload_resource_policy(session: Session, kbs: Kbs, digest_b64: str, allow_sample: bool) -> None:
    text = RESOURCE_POLICY.format(
        secret=SECRET_PATH, key=IMAGE_KEY.removeprefix("kbs:///"), cosign=COSIGN_KEY_PATH,
        policy=POLICY_PATH, digest=digest_b64, allow_sample="true" if allow_sample else "false",
    )  # fmt: skip
    path = session.work / "kbs" / "resource-policy.rego"
    path.write_text(text)
    session.say("the resource policy: release only to trusted evidence carrying this initdata:")
    session._show(text)
    kbs.config(session, "set-resource-policy", "--policy-file", str(path))


def trust_sample(session: Session, kbs: Kbs) -> None:
    """Reference values for the sample evidence of the INSECURE local sandbox, so that coco's
    default attestation policy grades it (the RVPS holds what a real TEE would be held to)."""
    for name, value in (
        ("launch_digest", '["abcde"]'), ("svn", '["1"]'), ("major_version", "1"),
        ("minimum_minor_version", "0"),
    ):  # fmt: skip
        kbs.config(session, "set-sample-reference-value", name, value)


def pod_run(
    session: Session, ctrd: Containerd, pod: Path, *, timeout: float = 900
) -> tuple[int, str, str]:
    d = session.work / "pod"
    proc = session.run(
        ["coco", "pod", "run", str(pod), "--runtime-endpoint", ctrd.endpoint,
         "--state-dir", str(d / "state")],
        check=False, timeout=timeout, what="coco pod run",
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def altered(session: Session, pod: Pod, name: str, command: list[str] | None = None) -> Path:
    """A copy of the pod under another name (and, if given, another command), keeping the
    policy and initdata annotations it was given."""
    import yaml

    doc = yaml.safe_load(pod.yaml.read_text())
    doc["metadata"]["name"] = name
    if command is not None:
        doc["spec"]["containers"][0]["command"] = command
    path = pod.yaml.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def with_initdata(session: Session, pod: Pod, name: str, initdata: str) -> Path:
    path = altered(session, pod, name)
    other = path.with_suffix(".initdata.toml")
    other.write_text(initdata)
    _annotate(session, path, other)
    return path


def reason(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("coco: error:"):
            return ln
    if not lines:
        raise DemoError("the refusal printed no reason")
    return lines[-1]
