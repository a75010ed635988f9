"""A ``cmd`` key provider that wraps like upstream's coco_keyprovider (spec §9.2), for skopeo.

``provider:attestation-agent:keypath=<file>::keyid=<kbs uri>::algorithm=A256GCM``: the KEK is read
from ``keypath`` (32 bytes), the private options are AES-256-GCM encrypted under it with a random
12-byte iv, and the answer's annotation is the AnnotationPacket JSON as a JSON array of byte values.
Written from the spec, without coco's code, so the hub's unwrap is checked against it.
"""

from __future__ import annotations

import base64
import json
import os
import sys

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def main() -> None:
    req = json.loads(sys.stdin.buffer.read())
    if req["op"] != "keywrap":
        raise SystemExit("only keywrap")
    param = base64.b64decode(
        req["keywrapparams"]["ec"]["Parameters"]["attestation-agent"][0]
    ).decode()
    opts = dict(kv.split("=", 1) for kv in param.split("::"))
    with open(opts["keypath"], "rb") as f:
        kek = f.read()
    optsdata = base64.b64decode(req["keywrapparams"]["optsdata"])
    iv = os.urandom(12)
    packet = {
        "kid": opts["keyid"],
        "wrapped_data": base64.b64encode(AESGCM(kek).encrypt(iv, optsdata, None)).decode(),
        "iv": base64.b64encode(iv).decode(),
        "wrap_type": "A256GCM",
    }
    ann = json.dumps(packet, separators=(",", ":")).encode()
    sys.stdout.write(json.dumps({"keywrapresults": {"annotation": list(ann)}}))


if __name__ == "__main__":
    main()
