"""``coco policy``: generate Kata agent policies for Kubernetes YAML and evaluate requests."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import click

from coco.errors import AgentPolicyError, GenpolicyError


@click.group("policy")
def policy() -> None:
    """Agent policies: generate them from pod YAML, evaluate agent requests against them."""


@policy.command("generate")
@click.argument("yaml_file", type=click.Path(dir_okay=False))
@click.option(
    "-o", "--output", help="Write the annotated YAML here ('-': stdout). Default: in place."
)
@click.option(
    "--layers-cache", type=click.Path(dir_okay=False), help="Layer cache JSON (by diff_id)."
)
@click.option("--settings", type=click.Path(dir_okay=False), help="genpolicy settings JSON.")
@click.option("--rules", type=click.Path(dir_okay=False), help="Rego rules (default: coco's own).")
@click.option(
    "--config-file",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="More YAML with ConfigMaps/Secrets.",
)
@click.option(
    "--src-tls-verify", type=bool, default=True, show_default=True, help="Verify registry TLS."
)
@click.option("--authfile", type=click.Path(dir_okay=False), help="containers auth.json.")
@click.option(
    "--allow-exec",
    multiple=True,
    metavar="CMD",
    help="Allow ExecProcessRequest for this command line.",
)
@click.option("--allow-logs", is_flag=True, help="Allow ReadStreamRequest (container logs).")
@click.option("--raw-out", type=click.Path(dir_okay=False), help="Also write the policy text here.")
def generate_cmd(
    yaml_file: str,
    output: str | None,
    layers_cache: str | None,
    settings: str | None,
    rules: str | None,
    config_file: tuple[str, ...],
    src_tls_verify: bool,
    authfile: str | None,
    allow_exec: tuple[str, ...],
    allow_logs: bool,
    raw_out: str | None,
) -> None:
    """Add the agent policy annotation to every workload in YAML_FILE."""
    from coco.integrity import genpolicy
    from coco.oci.transport import Access

    if not src_tls_verify:
        click.echo("coco: warning: --src-tls-verify=false: registry TLS is not verified", err=True)
    try:
        text = Path(yaml_file).read_text(encoding="utf-8")
    except OSError as e:
        raise GenpolicyError(f"{yaml_file}: cannot read it: {e.strerror}") from None
    opts = genpolicy.Options(
        settings=settings,
        rules=rules,
        layers_cache=layers_cache,
        access=Access(authfile=Path(authfile) if authfile else None, tls_verify=src_tls_verify),
        config_files=config_file,
        allow_exec=allow_exec,
        allow_logs=allow_logs,
    )
    result = genpolicy.generate(text, yaml_file, opts)
    if raw_out:
        _write(raw_out, result.policies[0][1])
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


@policy.command("evaluate")
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False),
    help="Rego policy text, or YAML with the policy annotation.",
)
@click.option(
    "--policy-data",
    type=click.Path(dir_okay=False),
    help="policy_data JSON (evaluated with coco's rules).",
)
@click.option(
    "--rules",
    type=click.Path(dir_okay=False),
    help="Rules for --policy-data (default: coco's own).",
)
@click.option("--all", "show_all", is_flag=True, help="On denial, list every failed check.")
@click.argument("request_name")
@click.argument("request_json", type=click.Path(dir_okay=False))
def evaluate_cmd(
    policy_file: str | None,
    policy_data: str | None,
    rules: str | None,
    show_all: bool,
    request_name: str,
    request_json: str,
) -> None:
    """Evaluate agent request REQUEST_NAME (body in REQUEST_JSON) the way the agent does.

    Prints 'allowed' (exit 0) or 'denied: ...' naming the rule and field (exit 1).
    """
    from coco.integrity.agent_policy import AgentPolicy

    if (policy_file is None) == (policy_data is None):
        raise click.UsageError("give exactly one of --policy and --policy-data")
    body = _load_json(request_json, "request")
    if policy_data is not None:
        data = _load_json(policy_data, "policy_data")
        if not isinstance(data, dict):
            raise AgentPolicyError(f"policy_data {policy_data}: expected a JSON object")
        rules_text = _read_text(rules, "rules") if rules else None
        pol = AgentPolicy.from_data(data, rules_text)
    else:
        assert policy_file is not None
        text = _read_text(policy_file, "policy")
        if "package agent_policy" not in text:
            from coco.integrity.genpolicy import policy_from_annotation

            text = policy_from_annotation(text, policy_file)
        pol = AgentPolicy(text, policy_file)
    decision = pol.evaluate(request_name, body)
    click.echo(decision.message())
    if show_all:
        for v in decision.violations[1:]:
            click.echo(f"  also: {v}")
    if not decision.allowed:
        sys.exit(1)


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise AgentPolicyError(f"{what} {path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError:
        raise AgentPolicyError(f"{what} {path}: expected UTF-8 text") from None


def _load_json(path: str, what: str) -> object:
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except ValueError as e:
        raise AgentPolicyError(f"{what} {path}: not valid JSON: {e}") from None
