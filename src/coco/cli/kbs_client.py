"""``coco kbs-client``: the admin side (``config ...``) and the guest side (``get-resource``)."""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from coco.cli._args import Commands, Parser, dispatch, parse_command, path, shown
from coco.errors import UsageError

DESCRIPTION = "Talk to a KBS: configure it, or attest and fetch a resource."
_EXISTING = path(exists=True, dir_okay=False, as_path=False)


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``coco kbs-client [--url ...] (config [--admin-token-file F] CMD | get-resource) ...``"""
    group.add_argument(
        "--url", required=True, metavar="TEXT", help="KBS base URL, e.g. http://127.0.0.1:8080"
    )
    group.add_argument(
        "--cert-file", type=_EXISTING, metavar="FILE", help="CA certificate (PEM) of an HTTPS KBS."
    )
    group.add_argument(
        "--admin-token-file",
        type=_EXISTING,
        metavar="FILE",
        help="File holding the admin bearer JWT (also accepted after 'config').",
    )
    opts, name, rest = dispatch(group, argv, _COMMANDS)
    obj: dict[str, Any] = {
        "url": opts.url,
        "verify": opts.cert_file or True,
        "token_file": opts.admin_token_file,
    }
    if name == "config":
        config = Parser(f"{group.prog} config", _CONFIG_DESCRIPTION)
        config.add_argument(
            "--admin-token-file",
            type=_EXISTING,
            metavar="FILE",
            help="File holding the admin bearer JWT.",
        )
        copts, cname, crest = dispatch(config, rest, _CONFIG_COMMANDS)
        func, values = parse_command(config, cname, crest, _CONFIG_COMMANDS)
        obj["token"] = _token(copts.admin_token_file or obj["token_file"])
    else:
        func, values = parse_command(group, name, rest, _COMMANDS)
    values["obj"] = obj
    return func, values


_CONFIG_DESCRIPTION = "Admin calls (need an admin token unless the KBS is InsecureAllowAll)."


def _token(admin_token_file: str | None) -> str | None:
    path = admin_token_file or os.path.expanduser("~/.trustee/admin-token")
    if admin_token_file or os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return None


def _admin(obj: dict[str, Any]):  # type: ignore[no-untyped-def]
    from coco.trustee.admin_client import AdminClient

    return AdminClient(obj["url"], obj.get("token"), verify=obj["verify"])


def _build_set_resource(p: Parser) -> None:
    p.add_argument("--path", required=True, metavar="TEXT", help="repository/type/tag")
    p.add_argument("--resource-file", required=True, type=_EXISTING, metavar="FILE")
    p.set_defaults(func=set_resource)


def set_resource(obj: dict[str, Any], path: str, resource_file: str) -> None:
    with open(resource_file, "rb") as f:
        data = f.read()
    with _admin(obj) as c:
        c.set_resource(path, data)
    print(f"Set resource {path} ({len(data)} bytes)", file=sys.stderr)


def _build_delete_resource(p: Parser) -> None:
    p.add_argument("--path", required=True, metavar="TEXT", help="repository/type/tag")
    p.set_defaults(func=delete_resource)


def delete_resource(obj: dict[str, Any], path: str) -> None:
    with _admin(obj) as c:
        c.delete_resource(path)


def _build_set_resource_policy(p: Parser) -> None:
    p.add_argument("--policy-file", required=True, type=_EXISTING, metavar="FILE")
    p.set_defaults(func=set_resource_policy)


def set_resource_policy(obj: dict[str, Any], policy_file: str) -> None:
    with open(policy_file, encoding="utf-8") as f:
        text = f.read()
    with _admin(obj) as c:
        c.set_resource_policy(text)


def _build_set_attestation_policy(p: Parser) -> None:
    p.add_argument("--policy-file", required=True, type=_EXISTING, metavar="FILE")
    p.add_argument(
        "--id",
        dest="policy_id",
        default="default_cpu",
        metavar="TEXT",
        help="[default: default_cpu]",
    )
    p.add_argument(
        "--type",
        dest="policy_type",
        default="rego",
        choices=["rego"],
        metavar="[rego]",
        help="[default: rego]",
    )
    p.set_defaults(func=set_attestation_policy)


def set_attestation_policy(
    obj: dict[str, Any], policy_file: str, policy_id: str, policy_type: str
) -> None:
    with open(policy_file, encoding="utf-8") as f:
        text = f.read()
    with _admin(obj) as c:
        c.set_attestation_policy(text, policy_id)


def _build_set_sample_reference_value(p: Parser) -> None:
    p.description = """Register reference value NAME = VALUE (VALUE is JSON, e.g. '["1"]')."""
    p.add_argument("name", metavar="NAME")
    p.add_argument("value", metavar="VALUE")
    p.set_defaults(func=set_sample_reference_value)


def set_sample_reference_value(obj: dict[str, Any], name: str, value: str) -> None:
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise UsageError(f"reference value {name}: VALUE must be JSON: {e}") from None
    with _admin(obj) as c:
        c.register_reference_values({name: parsed})


def _build_get_reference_value(p: Parser) -> None:
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=get_reference_value)


def get_reference_value(obj: dict[str, Any], name: str) -> None:
    with _admin(obj) as c:
        print(json.dumps(c.get_reference_value(name)))


def _build_get_resource(p: Parser) -> None:
    p.description = "Attest with the named attester and print the resource, base64-encoded."
    p.add_argument("--path", required=True, metavar="TEXT", help="repository/type/tag")
    p.add_argument(
        "--tee",
        default="sample",
        metavar="TEXT",
        help=shown("Attester to use (sample is INSECURE; tpm needs a TPM).", "sample"),
    )
    algorithms = ["ec-p256", "ec-p521", "rsa-oaep-256", "rsa1_5"]
    p.add_argument(
        "--tee-key-algorithm",
        default="ec-p256",
        choices=algorithms,
        metavar="[" + "|".join(algorithms) + "]",
        help="[default: ec-p256]",
    )
    p.add_argument(
        "--init-data",
        dest="init_data_file",
        type=_EXISTING,
        metavar="FILE",
        help="Init-data TOML to send along.",
    )
    p.set_defaults(func=get_resource)


def get_resource(obj: dict[str, Any], path: str, tee: str, tee_key_algorithm: str,
                 init_data_file: str | None) -> None:  # fmt: skip
    from coco.protocol.client import KbsClient, parse_resource_path
    from coco.tee import get_attester

    parse_resource_path(path)
    attester = get_attester(tee)
    init = None
    if init_data_file:
        with open(init_data_file, encoding="utf-8") as f:
            init = f.read()
    with KbsClient(obj["url"], attester, key_algorithm=tee_key_algorithm,
                   init_data_toml=init, verify=obj["verify"]) as client:  # fmt: skip
        data = client.get_resource(path)
    print(base64.b64encode(data).decode())


_COMMANDS: Commands = {
    "config": ("Admin calls (need an admin token unless the KBS is InsecureAllowAll).", None),  # type: ignore[dict-item]
    "get-resource": (
        "Attest with the named attester and print the resource, base64-encoded.",
        _build_get_resource,
    ),
}
_CONFIG_COMMANDS: Commands = {
    "delete-resource": ("Delete the resource at --path.", _build_delete_resource),
    "get-reference-value": ("Print the reference value NAME as JSON.", _build_get_reference_value),
    "set-attestation-policy": ("Set an attestation policy (rego).", _build_set_attestation_policy),
    "set-resource": ("Store a resource at --path.", _build_set_resource),
    "set-resource-policy": ("Set the resource policy (rego).", _build_set_resource_policy),
    "set-sample-reference-value": (
        "Register reference value NAME = VALUE (JSON).",
        _build_set_sample_reference_value,
    ),
}
