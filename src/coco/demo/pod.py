"""Steps 3 to 5 of the demo: the pod, what happens inside it, and three refusals.

The pod is a Kubernetes Pod YAML. ``coco policy generate`` adds its agent policy for a guest pull
(the host never reads the encrypted layer) and puts it in the pod's initdata, together with the
guest's ``aa.toml`` and ``cdh.toml`` (where the KBS is, where the signature policy lives, that the
registry is plain HTTP): one annotation, ``io.katacontainers.config.hypervisor.cc_init_data``,
whose digest the guest's evidence carries and the KBS's resource policy requires. The node's
settings tell the generator where this containerd keeps its bundles and where ``coco pod run``
writes the pod's logs, since both differ from a default node. ``coco pod run`` then drives
containerd through the CRI as a kubelet would.

A pod VM (coco-qemu) reaches this host as 10.0.2.2: its ``cdh.toml`` maps the registry there
under the image's own name, which the agent policy and the signature policy see; and its vTPM
evidence carries the initdata as PCR 8 extended once with the digest, which is what the resource
policy asks for (:func:`init_data_claim`).
"""

from __future__ import annotations

import base64
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from coco.demo.owner import Containerd, Kbs
from coco.demo.session import DemoError, Session
from coco.demo.workload import (
    COSIGN_KEY_PATH,
    IMAGE_KEY,
    POLICY_PATH,
    SCRIPT_NAME,
    SECRET_PATH,
    Workload,
)

INITDATA_ANNOTATION = "io.katacontainers.config.hypervisor.cc_init_data"
UUID_RE = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"

# The attestation policy stays coco's default; the resource policy releases the four resources
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
	pods_initdata
	tee_ok
}}

{pods_initdata}

tee_ok if not ae.sample

tee_ok if {{
	ae.sample
	{allow_sample}
}}

deny_reason := "the evidence carries no initdata" if {{
	not ae.init_data
}} else := "the evidence does not carry the pod's initdata digest" if {{
	not pods_initdata
}} else := "the attestation policy does not trust the evidence" if {{
	input.submods.cpu0["ear.status"] == "contraindicated"
}}
"""


GUEST_HOST = "10.0.2.2"  # this host as a pod VM sees it (QEMU's user networking)


@dataclass
class Pod:
    yaml: Path
    name: str
    initdata: Path
    digest_b64: str
    log_root: Path
    evidence_init_data: str  # what the evidence's init_data claim must be (see init_data_claim)


def init_data_claim(digest_b64: str, runtime_class: str) -> str:
    """The ``init_data`` claim of the guest's evidence for an initdata digest: the digest itself
    for the sample evidence of coco-local; for a vTPM (coco-qemu), PCR 8 after the guest extended
    it once with the digest (fitted to 32 bytes), which the KBS's TPM verifier checked against
    the initdata the guest presented."""
    if runtime_class == "coco-local":
        return digest_b64
    from coco.tee.tpm.quote import init_data_pcr

    return init_data_pcr(base64.b64decode(digest_b64)).hex()


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


def base_initdata(kbs_url: str, registry: str, guest_registry: str | None = None) -> str:
    """The guest's configuration: ``aa.toml`` and ``cdh.toml`` (the generator adds the policy).

    ``guest_registry``: where the guest reaches ``registry`` when that is another address (a pod
    VM reaches this host's 127.0.0.1 at 10.0.2.2): the CDH pulls from there, while the image keeps
    its name for the agent policy and the signature policy."""
    aa = f'[token_configs.kbs]\nurl = "{kbs_url}"\n\n[eventlog_config]\nenable_eventlog = false\n'
    where = (
        f'prefix = "{registry}"\nlocation = "{guest_registry}"'
        if guest_registry
        else (f'location = "{registry}"')
    )
    cdh = (
        f'[kbc]\nname = "cc_kbc"\nurl = "{kbs_url}"\n\n[image]\n'
        f'image_security_policy_uri = "kbs:///{POLICY_PATH}"\n\n'
        f"[[image.registry_config.registry]]\n{where}\ninsecure = true\n"
    )
    return (
        'version = "0.1.0"\nalgorithm = "sha384"\n\n[data]\n'
        f'"aa.toml" = {json.dumps(aa)}\n"cdh.toml" = {json.dumps(cdh)}\n'
    )


def node_settings(ctrd: Containerd, pause: str, log_root: Path) -> dict[str, object]:
    """genpolicy settings for this node: its pause image, bundle directory and pod log root."""
    bundles = f"{ctrd.state}/io.containerd.runtime.v2.task/k8s.io/$(bundle-id)"
    logs = f"^{re.escape(str(log_root))}/$(sandbox-namespace)_$(sandbox-name)_{UUID_RE}$"
    return {
        "cluster_config": {"pause_container_image": pause},
        "pause_container": {"Annotations": {
            "io.katacontainers.pkg.oci.bundle_path": bundles,
            "io.kubernetes.cri.sandbox-log-directory": logs,
        }},
        "other_container": {"Annotations": {"io.katacontainers.pkg.oci.bundle_path": bundles}},
    }  # fmt: skip


def prepare(
    session: Session, ctrd: Containerd, w: Workload, runtime_class: str, kbs: Kbs, registry: str,
    name: str = "pod", extra_settings: dict[str, object] | None = None,
) -> Pod:  # fmt: skip
    """Write the pod (``name``.yaml), generate its policy into its initdata; return it.
    ``extra_settings``: merged over the node's genpolicy settings."""
    d = session.work / "pod"
    d.mkdir(exist_ok=True)
    log_root = d / "logs"
    settings = d / f"{name}-genpolicy-settings.json"
    node = node_settings(ctrd, w.pause, log_root)
    for key, value in (extra_settings or {}).items():
        node[key] = {**node.get(key, {}), **value}  # type: ignore[dict-item]
    settings.write_text(json.dumps(node, indent=2))
    base = d / f"{name}-initdata-base.toml"
    if runtime_class == "coco-local":  # the guest's processes are on this host
        base.write_text(base_initdata(kbs.url, registry))
    else:
        port = registry.rsplit(":", 1)[1]
        base.write_text(
            base_initdata(f"http://{GUEST_HOST}:{kbs.port}", registry, f"{GUEST_HOST}:{port}")
        )
    path = d / f"{name}.yaml"
    path.write_text(pod_yaml("coco-demo", w.image, runtime_class, [f"/app/{SCRIPT_NAME}"]))
    session.say(f"the pod as its owner wrote it ({path}):")
    session.show(path.read_text())
    session.say(
        "the guest's configuration (aa.toml: where the KBS is; cdh.toml: the KBS again, the "
        "signature policy to enforce, that the registry is plain HTTP"
        + ("" if runtime_class == "coco-local" else
           f", and that the pod VM reaches it at {GUEST_HOST}, under the image's own name")
        + ") goes into its initdata:"
    )  # fmt: skip
    for name, text in tomllib.loads(base.read_text())["data"].items():
        session.say(f"  {name}:")
        session.show(text)
    initdata = d / f"{name}-initdata.toml"
    session.run(
        ["coco", "policy", "generate", str(path), "--settings", str(settings),
         "--initdata", str(base), "--initdata-out", str(initdata), "--allow-logs",
         "--src-tls-verify=false", "--raw-out", str(d / f"{name}-policy.rego")],
        what="generating the agent policy",
    )  # fmt: skip
    policy = (d / f"{name}-policy.rego").read_text()
    session.say(
        f"agent policy: {len(policy)} bytes of Rego, added to the initdata as policy.rego and the "
        f"pod annotated with {INITDATA_ANNOTATION}; the guest holds every request of the host "
        "against it (--allow-logs: the container's output may leave the guest, so you see it)"
    )
    digest = _digest(session, initdata)
    session.say(f"initdata digest (sha384), which the evidence must carry: {digest}")
    digest_b64 = base64.b64encode(bytes.fromhex(digest)).decode()
    claim = init_data_claim(digest_b64, runtime_class)
    if runtime_class != "coco-local":
        session.say(f"the guest's vTPM carries it in PCR 8, extended once with it at boot: {claim}")
    return Pod(path, "coco-demo", initdata, digest_b64, log_root, claim)


def _digest(session: Session, initdata: Path) -> str:
    out = session.run(["coco", "initdata", "digest", str(initdata), "--format", "json"])
    return json.loads(out.stdout)["digest"]


def _annotate(session: Session, pod: Path, initdata: Path) -> None:
    import yaml

    encoded = session.run(["coco", "initdata", "encode", str(initdata)], show=False).stdout.strip()
    doc = yaml.safe_load(pod.read_text())
    doc["metadata"].setdefault("annotations", {})[INITDATA_ANNOTATION] = encoded
    pod.write_text(yaml.safe_dump(doc, sort_keys=False))


def upload_resource_policy(
    session: Session, kbs: Kbs, pod: Pod, allow_sample: bool, also: tuple[Pod, ...] = ()
) -> None:
    """The resource policy releasing the pod's resources to evidence carrying its initdata (or
    that of a pod in ``also``: the same pod with another agent policy)."""
    claims = [p.evidence_init_data for p in (pod, *also)]
    text = RESOURCE_POLICY.format(
        secret=SECRET_PATH, key=IMAGE_KEY.removeprefix("kbs:///"), cosign=COSIGN_KEY_PATH,
        policy=POLICY_PATH, allow_sample="true" if allow_sample else "false",
        pods_initdata="\n".join(f'pods_initdata if ae.init_data == "{c}"' for c in claims),
    )  # fmt: skip
    path = session.work / "kbs" / "resource-policy.rego"
    path.write_text(text)
    session.say("the resource policy: release only to trusted evidence carrying this initdata:")
    session.show(text)
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
    session: Session, ctrd: Containerd, p: Pod, path: Path, *, timeout: float = 900
) -> tuple[int, str, str]:
    d = session.work / "pod"
    proc = session.run(
        ["coco", "pod", "run", str(path), "--runtime-endpoint", ctrd.endpoint,
         "--log-root", str(p.log_root), "--state-dir", str(d / "state"), "--tls-verify=false",
         "--guest-pull", "never"],
        check=False, timeout=timeout, what="coco pod run",
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def altered(session: Session, pod: Pod, name: str, command: list[str] | None = None) -> Path:
    """A copy of the pod in ``name``.yaml (with, if given, another command), keeping the pod's
    name (the policy binds it) and its initdata annotation (hence the policy)."""
    import yaml

    doc = yaml.safe_load(pod.yaml.read_text())
    if command is not None:
        doc["spec"]["containers"][0]["command"] = command
    path = pod.yaml.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def with_initdata(session: Session, pod: Pod, name: str, initdata: str) -> Path:
    """A copy of the pod whose initdata annotation carries ``initdata`` instead."""
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


def cause(line: str) -> str:
    """The reason in a ``coco pod run`` error line, without the CRI's wrapping of it: what the
    agent, the CDH or the KBS said (long hex ids cut to 12 digits)."""
    why = line.rsplit("failed to create shim task: ", 1)[-1].removesuffix(": unknown")
    return re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1…", why)
