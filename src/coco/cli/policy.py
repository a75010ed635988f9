"""``coco policy``: generate Kata agent policies for Kubernetes YAML and evaluate requests."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.cli._args import Commands, Parser, Usage, boolean, path, run_group, shown
from coco.errors import AgentPolicyError, GenpolicyError
from coco.jsonio import decode_text, loads

DESCRIPTION = "Agent policies: generate them from pod YAML, evaluate agent requests against them."
_FILE = path(dir_okay=False, as_path=False)
_UPSTREAM_CACHE = "layers-cache.json"  # upstream genpolicy's -u: in the working directory


def _stdin_or_file(text: str) -> str:
    return text if text == "-" else _FILE(text)


_stdin_or_file.__name__ = "file"


def _build_generate(p: Parser) -> None:
    p.description = (
        "Add the agent policy to every workload in YAML_FILE.\n\n"
        "The policy binds each container to its image: by default (--layers guest-pull, as "
        "upstream kata today) the guest pulls the image itself and the policy checks the "
        "image_guest_pull storage's reference against the pod's image (its digest too where the "
        "pod pins one); --layers tardev is the older AKS path, where the host hands the guest "
        "each layer and the policy holds every layer's dm-verity root (computed here). The "
        "policy goes into the initdata annotation io.katacontainers.config.hypervisor."
        'cc_init_data (base64 of gzip of the initdata TOML, policy in data."policy.rego"; '
        "--initdata adds it to your own document), or with --annotation policy|both into the "
        "older io.katacontainers.config.agent.policy (base64 Rego).\n\n"
        "--settings describes the node (upstream's genpolicy-settings.json shape, merged over "
        "coco's defaults): e.g. guest_pull.oci_version for the containerd in use, or the "
        "io.katacontainers.pkg.oci.bundle_path and io.kubernetes.cri.sandbox-log-directory "
        "annotations of pause_container/other_container when containerd's state directory or "
        "the pod log root is not the default."
    )
    p.add_argument(
        "yaml_file", metavar="YAML_FILE", nargs="?", type=_stdin_or_file, help="'-': stdin."
    )
    p.add_argument(
        "-y",
        "--yaml-file",
        dest="yaml_flag",
        type=_stdin_or_file,
        metavar="FILE",
        help="The same as YAML_FILE (upstream genpolicy's flag). Neither: stdin to stdout.",
    )
    p.add_argument(
        "--layers",
        choices=("guest-pull", "tardev"),
        default="guest-pull",
        help=shown("How containers get their image.", "guest-pull"),
    )
    p.add_argument(
        "--annotation",
        choices=("initdata", "policy", "both"),
        default="initdata",
        help=shown("Which annotation carries the policy.", "initdata"),
    )
    p.add_argument(
        "--initdata",
        "--initdata-path",  # upstream genpolicy's name
        type=_FILE,
        metavar="FILE",
        help="Base initdata TOML (e.g. aa.toml, cdh.toml); policy.rego is added to it.",
    )
    p.add_argument(
        "--initdata-out",
        metavar="FILE",
        help="Also write the initdata TOML here (its digest is what the TEE measures).",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="TEXT",
        help="Write the annotated YAML here ('-': stdout). Default: in place.",
    )
    p.add_argument(
        "--layers-cache",
        "--layers-cache-file-path",
        dest="layers_cache",
        type=_FILE,
        metavar="FILE",
        help="Layer cache JSON (by diff_id); made when missing.",
    )
    p.add_argument(
        "-u",
        "--use-cached-files",
        action="store_true",
        help=f"Use the layer cache {_UPSTREAM_CACHE} (as upstream; --layers-cache names another).",
    )
    p.add_argument(
        "-j",
        "--settings",
        "--json-settings-path",
        dest="settings",
        type=_FILE,
        metavar="FILE",
        help="genpolicy settings JSON.",
    )
    p.add_argument(
        "-p",
        "--rules",
        "--rego-rules-path",
        dest="rules",
        type=_FILE,
        metavar="FILE",
        help="Rego rules (default: coco's own).",
    )
    p.add_argument(
        "-c",
        "--config-file",
        "--config-map-file",
        action="append",
        default=[],
        type=_FILE,
        metavar="FILE",
        help="More YAML with ConfigMaps/Secrets.",
    )
    p.add_argument(
        "--src-tls-verify",
        type=boolean,
        nargs="?",
        const=True,
        default=True,
        metavar="[=BOOL]",
        help=shown("Verify registry TLS.", True),
    )
    p.add_argument("--authfile", type=_FILE, metavar="FILE", help="containers auth.json.")
    p.add_argument(
        "--allow-exec",
        action="append",
        default=[],
        metavar="CMD",
        help="Allow ExecProcessRequest for this command line.",
    )
    p.add_argument(
        "--allow-logs", action="store_true", help="Allow ReadStreamRequest (container logs)."
    )
    p.add_argument(
        "--raw-out",
        nargs="?",
        const="-",
        metavar="FILE",
        help="Also write the policy text here (alone or '-': stdout).",
    )
    p.add_argument(
        "-r", dest="raw_out", action="store_const", const="-", help="Print the policy text."
    )
    p.add_argument(
        "-b", "--base64-out", action="store_true", help="Print the policy text in base64."
    )
    p.set_defaults(func=generate_cmd)


def generate_cmd(
    yaml_file: str | None,
    yaml_flag: str | None,
    use_cached_files: bool,
    base64_out: bool,
    output: str | None,
    layers_cache: str | None,
    settings: str | None,
    rules: str | None,
    config_file: list[str],
    src_tls_verify: bool,
    authfile: str | None,
    allow_exec: list[str],
    allow_logs: bool,
    raw_out: str | None,
    layers: str,
    annotation: str,
    initdata: str | None,
    initdata_out: str | None,
) -> None:
    from coco.integrity import genpolicy
    from coco.oci.transport import Access

    if not src_tls_verify:
        print(
            "coco: warning: --src-tls-verify=false: registry TLS is not verified", file=sys.stderr
        )
    if yaml_file is not None and yaml_flag is not None:
        raise Usage("give the YAML once: YAML_FILE or -y/--yaml-file")
    yaml_file = yaml_file or yaml_flag or "-"
    if yaml_file == "-":
        raw, where = sys.stdin.buffer.read(), "<stdin>"
        output = output or "-"
    else:
        where = yaml_file
        try:
            raw = Path(yaml_file).read_bytes()
        except OSError as e:
            raise GenpolicyError(f"{yaml_file}: cannot read it: {e.strerror}") from None
    text = decode_text(raw, what=where, error=GenpolicyError)
    if use_cached_files and layers_cache is None:
        layers_cache = _UPSTREAM_CACHE
    opts = genpolicy.Options(
        settings=settings,
        rules=rules,
        layers_cache=layers_cache,
        access=Access(authfile=Path(authfile) if authfile else None, tls_verify=src_tls_verify),
        config_files=tuple(config_file),
        allow_exec=tuple(allow_exec),
        allow_logs=allow_logs,
        layers=layers,
        annotation=annotation,
        initdata=initdata,
    )
    result = genpolicy.generate(text, where, opts)
    policy = result.policies[0][1]
    if raw_out == "-":
        sys.stdout.write(policy)
    elif raw_out:
        _write(raw_out, policy)
    if base64_out:
        import base64

        print(base64.b64encode(policy.encode()).decode())
    if initdata_out:
        _write(initdata_out, result.initdata[0].decode())
    if output == "-":
        sys.stdout.write(result.yaml)
    else:
        _write(output or yaml_file, result.yaml)


def _write(path: str, text: str) -> None:
    p = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent if str(p.parent) else ".")
    except OSError as e:
        raise GenpolicyError(f"{path}: cannot write it: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _build_evaluate(p: Parser) -> None:
    p.description = (
        "Evaluate agent request REQUEST_NAME (body in REQUEST_JSON) the way the agent does.\n\n"
        "Prints 'allowed' (exit 0) or 'denied: ...' naming the rule and field (exit 1)."
    )
    p.add_argument(
        "--policy",
        dest="policy_file",
        type=_FILE,
        metavar="FILE",
        help="Rego policy text, or YAML with the policy annotation.",
    )
    p.add_argument(
        "--policy-data",
        type=_FILE,
        metavar="FILE",
        help="policy_data JSON (evaluated with coco's rules).",
    )
    p.add_argument(
        "--rules",
        type=_FILE,
        metavar="FILE",
        help="Rules for --policy-data (default: coco's own).",
    )
    p.add_argument(
        "--all", dest="show_all", action="store_true", help="On denial, list every failed check."
    )
    p.add_argument("request_name", metavar="REQUEST_NAME")
    p.add_argument("request_json", metavar="REQUEST_JSON", type=_FILE)
    p.set_defaults(func=evaluate_cmd)


def evaluate_cmd(
    policy_file: str | None,
    policy_data: str | None,
    rules: str | None,
    show_all: bool,
    request_name: str,
    request_json: str,
) -> None:
    from coco.integrity.agent_policy import AgentPolicy, policy_text

    if (policy_file is None) == (policy_data is None):
        raise Usage("give exactly one of --policy and --policy-data")
    body = _load_json(request_json, "request")
    if policy_data is not None:
        data = _load_json(policy_data, "policy_data")
        if not isinstance(data, dict):
            raise AgentPolicyError(f"policy_data {policy_data}: expected a JSON object")
        if rules is None:
            pol = AgentPolicy.from_data(data)
        else:  # errors in the rules name the rules file
            pol = AgentPolicy(policy_text(_read_text(rules, "rules"), data), f"rules {rules}")
    else:
        assert policy_file is not None
        text = _read_text(policy_file, "policy")
        if "package agent_policy" not in text:
            from coco.integrity.genpolicy import policy_from_annotation

            text = policy_from_annotation(text, policy_file)
        pol = AgentPolicy(text, policy_file)
    decision = pol.evaluate(request_name, body)
    print(decision.message())
    if show_all:
        for v in decision.violations[1:]:
            print(f"  also: {v}")
    if not decision.allowed:
        sys.exit(1)


def _read_bytes(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise AgentPolicyError(f"{what} {path}: cannot read it: {e.strerror}") from None


def _read_text(path: str, what: str) -> str:
    return decode_text(_read_bytes(path, what), what=f"{what} {path}", error=AgentPolicyError)


def _load_json(path: str, what: str) -> object:
    return loads(_read_bytes(path, what), what=f"{what} {path}", error=AgentPolicyError)


COMMANDS: Commands = {
    "evaluate": ("Evaluate an agent request against a policy.", _build_evaluate),
    "generate": ("Add the agent policy to the workloads in YAML.", _build_generate),
}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, COMMANDS)
