"""``coco kbs-client``: the admin side (``config ...``, ``admin-token``) and the guest side
(``attest``, ``get-resource``), with upstream kbs-client's command lines."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from coco.cli._args import Commands, Parser, dispatch, int_range, parse_command, path, shown
from coco.errors import UsageError

DESCRIPTION = "Talk to a KBS: configure it, or attest and fetch a resource."
DEFAULT_URL = "http://127.0.0.1:8080"
_EXISTING = path(exists=True, dir_okay=False, as_path=False)
_TEE_KEY_ALGORITHMS = ["ec-p256", "ec-p521", "rsa-oaep-256", "rsa1_5"]
# set-resource-policy's built-in policies (upstream kbs-client's samples), by flag
_BUILTIN_POLICIES = {
    "allow_all": "allow_all.rego",
    "deny_all": "deny_all.rego",
    "affirming": "affirming.rego",
    "default": "default_resource.rego",
}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``coco kbs-client [--url ...] (config [--admin-token-file F] CMD | attest | get-resource
    | admin-token) ...``"""
    group.add_argument(
        "--url", default=DEFAULT_URL, metavar="TEXT", help=shown("KBS base URL.", DEFAULT_URL)
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
        config.epilog = "Without --admin-token-file, ~/.trustee/admin-token is sent when it exists."
        config.add_argument(
            "--admin-token-file",
            type=_EXISTING,
            metavar="FILE",
            help="File holding the admin bearer JWT.",
        )
        copts, cname, crest = dispatch(config, rest, _CONFIG_COMMANDS)
        func, values = parse_command(config, cname, crest, _CONFIG_COMMANDS)
        obj["token_file"] = copts.admin_token_file or obj["token_file"]
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

    return AdminClient(obj["url"], _token(obj["token_file"]), verify=obj["verify"])


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
    p.description = (
        "Set the resource policy: a Rego file, or one of the built-in policies (--allow-all "
        "releases every resource, even to the INSECURE sample TEE; --deny-all none; --affirming "
        "only to tokens whose every submodule is affirming; --default the KBS's own default)."
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--policy-file", type=_EXISTING, metavar="FILE", help="A Rego policy.")
    for flag in _BUILTIN_POLICIES:
        which.add_argument(
            "--" + flag.replace("_", "-"),
            dest="builtin",
            action="store_const",
            const=flag,
            help=f"The built-in {flag.replace('_', '-')} policy.",
        )
    p.set_defaults(func=set_resource_policy, builtin=None)


def set_resource_policy(obj: dict[str, Any], policy_file: str | None, builtin: str | None) -> None:
    if builtin is not None:
        import importlib.resources

        policies = importlib.resources.files("coco.trustee.attestation") / "policies"
        text = (policies / _BUILTIN_POLICIES[builtin]).read_text()
    else:
        with open(policy_file or "", encoding="utf-8") as f:
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
    p.add_argument("name", metavar="NAME", nargs="?", help="The reference value's id.")
    p.add_argument("--id", dest="rv_id", metavar="TEXT", help="The same, as upstream spells it.")
    p.set_defaults(func=get_reference_value)


def get_reference_value(obj: dict[str, Any], name: str | None, rv_id: str | None) -> None:
    if (name is None) == (rv_id is None):
        raise UsageError("get-reference-value: give the id once: --id ID (or NAME)")
    with _admin(obj) as c:
        print(json.dumps(c.get_reference_value(rv_id or name or "")))


def _add_guest_options(p: Parser) -> None:
    p.add_argument(
        "--tee",
        default="sample",
        metavar="TEXT",
        help=shown("Attester to use (sample is INSECURE; tpm needs a TPM).", "sample"),
    )
    p.add_argument(
        "--tee-key-file",
        type=path(dir_okay=False, as_path=False),
        metavar="FILE",
        help="PEM private key of the TEE key pair (EC P-256/P-521 or RSA): used if it exists, "
        "else made and written there (0600), so a later get-resource --attestation-token can "
        "decrypt with it. Default: a fresh key, forgotten on exit.",
    )
    p.add_argument(
        "--tee-key-algorithm",
        default="ec-p256",
        choices=_TEE_KEY_ALGORITHMS,
        metavar="[" + "|".join(_TEE_KEY_ALGORITHMS) + "]",
        help="Algorithm of a fresh TEE key. [default: ec-p256]",
    )
    p.add_argument(
        "--init-data",
        dest="init_data_file",
        type=_EXISTING,
        metavar="FILE",
        help="Init-data TOML to send along.",
    )


def _build_attest(p: Parser) -> None:
    p.description = "Attest with the named attester and print the attestation token (a JWT)."
    _add_guest_options(p)
    p.set_defaults(func=attest)


def _build_get_resource(p: Parser) -> None:
    p.description = (
        "Attest with the named attester (or present --attestation-token with the --tee-key-file "
        "it was issued for) and print the resource, base64-encoded."
    )
    p.add_argument("--path", required=True, metavar="TEXT", help="repository/type/tag")
    _add_guest_options(p)
    p.add_argument(
        "--attestation-token",
        dest="token_file",
        type=_EXISTING,
        metavar="FILE",
        help="A token from `attest` (needs the same --tee-key-file): no attestation is done.",
    )
    p.set_defaults(func=get_resource)


def _client(obj: dict[str, Any], tee: str, tee_key_file: str | None, tee_key_algorithm: str,
            init_data_file: str | None, token: str | None = None):  # type: ignore[no-untyped-def]  # fmt: skip
    from coco.protocol.client import KbsClient, TeeKey

    key = None
    if tee_key_file and os.path.exists(tee_key_file):
        with open(tee_key_file, "rb") as f:
            key = TeeKey.from_pem(f.read(), f"--tee-key-file {tee_key_file}")
    elif tee_key_file:
        key = TeeKey.generate(tee_key_algorithm)
        fd = os.open(tee_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.to_pem())
    elif token is not None:
        raise UsageError("--attestation-token needs the --tee-key-file the token was issued for")
    attester = None
    if token is None:
        from coco.tee import get_attester

        attester = get_attester(tee)
    init = None
    if init_data_file:
        with open(init_data_file, encoding="utf-8") as f:
            init = f.read()
    return KbsClient(obj["url"], attester, key_algorithm=tee_key_algorithm, init_data_toml=init,
                     verify=obj["verify"], key=key, token=token)  # fmt: skip


def attest(obj: dict[str, Any], tee: str, tee_key_file: str | None, tee_key_algorithm: str,
           init_data_file: str | None) -> None:  # fmt: skip
    made = bool(tee_key_file) and not os.path.exists(tee_key_file or "")
    try:
        with _client(obj, tee, tee_key_file, tee_key_algorithm, init_data_file) as client:
            token = client.attest()
    except BaseException:
        if made and tee_key_file:  # a failed attestation leaves no key file behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tee_key_file)
        raise
    print(token)


def get_resource(obj: dict[str, Any], path: str, tee: str, tee_key_file: str | None,
                 tee_key_algorithm: str, init_data_file: str | None,
                 token_file: str | None) -> None:  # fmt: skip
    from coco.protocol.resource_uri import ResourceUri

    ResourceUri.from_path(path, "--path")
    token = None
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
    with _client(obj, tee, tee_key_file, tee_key_algorithm, init_data_file, token) as client:
        data = client.get_resource(path)
    print(base64.b64encode(data).decode())


def _build_admin_token(p: Parser) -> None:
    p.description = (
        "Print an admin JWT signed with --key (Ed25519, EC P-256 or RSA PEM), for a KBS whose "
        "admin API trusts the matching public key (coco kbs serve --admin-public-key PUB, or "
        "an identity provider of [admin.authentication.bearer_jwt]). Save it as "
        "~/.trustee/admin-token or pass it with --admin-token-file."
    )
    p.add_argument(
        "--key", required=True, type=_EXISTING, metavar="FILE", help="Private key (PEM)."
    )
    p.add_argument(
        "--role", default="admin", metavar="TEXT", help=shown("The role claim.", "admin")
    )
    p.add_argument("--issuer", metavar="TEXT", help="The iss claim (when the KBS checks one).")
    p.add_argument("--audience", metavar="TEXT", help="The aud claim (when the KBS checks one).")
    p.add_argument(
        "--hours",
        type=int_range(1),
        default=2,
        metavar="INTEGER",
        help=shown("Hours until it expires.", 2),
    )
    p.set_defaults(func=admin_token)


def admin_token(obj: dict[str, Any], key: str, role: str, issuer: str | None,
                audience: str | None, hours: int) -> None:  # fmt: skip
    from coco.protocol.admin import admin_token as sign
    from coco.protocol.admin import load_admin_key

    with open(key, "rb") as f:
        private = load_admin_key(f.read(), f"--key {key}")
    print(sign(private, role=role, ttl=3600 * hours, issuer=issuer, audience=audience))


_COMMANDS: Commands = {
    "config": ("Admin calls (need an admin token unless the KBS is InsecureAllowAll).", None),  # type: ignore[dict-item]
    "admin-token": ("Print an admin JWT signed with --key.", _build_admin_token),
    "attest": ("Attest and print the attestation token.", _build_attest),
    "get-resource": (
        "Attest (or present --attestation-token) and print the resource, base64-encoded.",
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
