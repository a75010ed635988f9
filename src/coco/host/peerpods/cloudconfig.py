"""The userdata a pod VM receives: a ``#cloud-config`` document with ``write_files`` only.

Upstream's shape, so an upstream pod VM image (cloud-init or process-user-data) reads it too.
The files (``coco process-user-data`` writes only these, under ``/run/peerpod``):

* ``apf.json``: the forwarder's config (pod name and namespace, its TLS key and certificate, the
  client CA, the TLS minimum version);
* ``auth.json``: registry credentials, skipped past 12 KiB as upstream does;
* ``initdata``: the initdata TOML, gzip + base64 (the pod annotation's form).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import yaml

PEERPOD_DIR = "/run/peerpod"
APF_JSON = f"{PEERPOD_DIR}/apf.json"
AUTH_JSON = f"{PEERPOD_DIR}/auth.json"
INITDATA = f"{PEERPOD_DIR}/initdata"
AUTHFILE_LIMIT = 12288


class _Literal(str):
    pass


def _literal(dumper: yaml.SafeDumper, value: _Literal) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, _literal)


def cloud_config(files: Mapping[str, str]) -> str:
    """``#cloud-config`` text writing each path -> content (text) with mode 0644."""
    entries = [
        {"path": path, "permissions": "0644", "content": _Literal(content)}
        for path, content in files.items()
    ]
    body = yaml.dump({"write_files": entries}, Dumper=_Dumper, sort_keys=False, width=1 << 20)
    return "#cloud-config\n" + body


def apf_config(
    pod_name: str,
    pod_namespace: str,
    *,
    server_key: bytes | None,
    server_cert: bytes | None,
    client_ca: bytes | None,
    tls_min_version: str = "",
) -> str:
    """The forwarder's ``apf.json`` (upstream keys; no pod-network: no tunnel is built here)."""
    doc: dict[str, object] = {"pod-namespace": pod_namespace, "pod-name": pod_name}
    if server_key is not None and server_cert is not None and client_ca is not None:
        doc["tls-server-key"] = server_key.decode()
        doc["tls-server-cert"] = server_cert.decode()
        doc["tls-client-ca"] = client_ca.decode()
    if tls_min_version:
        doc["tls-min-version"] = tls_min_version
    return json.dumps(doc, indent=1)
