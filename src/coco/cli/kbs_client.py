"""``coco kbs-client``: the admin side (``config ...``) and the guest side (``get-resource``)."""

from __future__ import annotations

import base64
import json
import os

import click

from coco.errors import UsageError


@click.group("kbs-client")
@click.option("--url", required=True, help="KBS base URL, e.g. http://127.0.0.1:8080")
@click.option(
    "--cert-file",
    type=click.Path(exists=True, dir_okay=False),
    help="CA certificate (PEM) of an HTTPS KBS.",
)
@click.option(
    "--admin-token-file",
    type=click.Path(exists=True, dir_okay=False),
    help="File holding the admin bearer JWT (also accepted after 'config').",
)
@click.pass_context
def kbs_client(
    ctx: click.Context, url: str, cert_file: str | None, admin_token_file: str | None
) -> None:
    """Talk to a KBS: configure it, or attest and fetch a resource."""
    ctx.obj = {"url": url, "verify": cert_file or True, "token_file": admin_token_file}


@kbs_client.group("config")
@click.option(
    "--admin-token-file",
    type=click.Path(exists=True, dir_okay=False),
    help="File holding the admin bearer JWT.",
)
@click.pass_context
def config(ctx: click.Context, admin_token_file: str | None) -> None:
    """Admin calls (need an admin token unless the KBS is InsecureAllowAll)."""
    token = None
    admin_token_file = admin_token_file or ctx.obj.get("token_file")
    path = admin_token_file or os.path.expanduser("~/.trustee/admin-token")
    if admin_token_file or os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    ctx.obj["token"] = token


def _admin(ctx: click.Context):  # type: ignore[no-untyped-def]
    from coco.trustee.admin_client import AdminClient

    return AdminClient(ctx.obj["url"], ctx.obj.get("token"), verify=ctx.obj["verify"])


@config.command("set-resource")
@click.option("--path", required=True, help="repository/type/tag")
@click.option("--resource-file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.pass_context
def set_resource(ctx: click.Context, path: str, resource_file: str) -> None:
    with open(resource_file, "rb") as f:
        data = f.read()
    with _admin(ctx) as c:
        c.set_resource(path, data)
    click.echo(f"Set resource {path} ({len(data)} bytes)", err=True)


@config.command("delete-resource")
@click.option("--path", required=True, help="repository/type/tag")
@click.pass_context
def delete_resource(ctx: click.Context, path: str) -> None:
    with _admin(ctx) as c:
        c.delete_resource(path)


@config.command("set-resource-policy")
@click.option("--policy-file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.pass_context
def set_resource_policy(ctx: click.Context, policy_file: str) -> None:
    with open(policy_file, encoding="utf-8") as f:
        text = f.read()
    with _admin(ctx) as c:
        c.set_resource_policy(text)


@config.command("set-attestation-policy")
@click.option("--policy-file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--id", "policy_id", default="default_cpu", show_default=True)
@click.option(
    "--type", "policy_type", default="rego", show_default=True, type=click.Choice(["rego"])
)
@click.pass_context
def set_attestation_policy(
    ctx: click.Context, policy_file: str, policy_id: str, policy_type: str
) -> None:
    with open(policy_file, encoding="utf-8") as f:
        text = f.read()
    with _admin(ctx) as c:
        c.set_attestation_policy(text, policy_id)


@config.command("set-sample-reference-value")
@click.argument("name")
@click.argument("value")
@click.pass_context
def set_sample_reference_value(ctx: click.Context, name: str, value: str) -> None:
    """Register reference value NAME = VALUE (VALUE is JSON, e.g. '["1"]')."""
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise UsageError(f"reference value {name}: VALUE must be JSON: {e}") from None
    with _admin(ctx) as c:
        c.register_reference_values({name: parsed})


@config.command("get-reference-value")
@click.argument("name")
@click.pass_context
def get_reference_value(ctx: click.Context, name: str) -> None:
    with _admin(ctx) as c:
        click.echo(json.dumps(c.get_reference_value(name)))


@kbs_client.command("get-resource")
@click.option("--path", required=True, help="repository/type/tag")
@click.option(
    "--tee",
    default="sample",
    show_default=True,
    help="Attester to use (sample is INSECURE; tpm needs a TPM).",
)
@click.option(
    "--tee-key-algorithm",
    default="ec-p256",
    show_default=True,
    type=click.Choice(["ec-p256", "ec-p521", "rsa-oaep-256", "rsa1_5"]),
)
@click.option(
    "--init-data",
    "init_data_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Init-data TOML to send along.",
)
@click.pass_context
def get_resource(ctx: click.Context, path: str, tee: str, tee_key_algorithm: str,
                 init_data_file: str | None) -> None:  # fmt: skip
    """Attest with the named attester and print the resource, base64-encoded."""
    from coco.protocol.client import KbsClient, parse_resource_path
    from coco.tee import get_attester

    parse_resource_path(path)
    attester = get_attester(tee)
    init = None
    if init_data_file:
        with open(init_data_file, encoding="utf-8") as f:
            init = f.read()
    with KbsClient(ctx.obj["url"], attester, key_algorithm=tee_key_algorithm,
                   init_data_toml=init, verify=ctx.obj["verify"]) as client:  # fmt: skip
        data = client.get_resource(path)
    click.echo(base64.b64encode(data).decode())
