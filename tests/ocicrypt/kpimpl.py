"""A test key provider: wraps the private options with AES-GCM under sha256(parameter).

Run as a program (``python kpimpl.py NAME``) it speaks the ``cmd`` protocol on stdin/stdout;
:func:`handle` is also served over gRPC by the tests. Unwrap answers use the JSON byte-array form
(as ocicrypt-rs and CDH do), wrap answers base64 (as Go does), so both encodings are exercised.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def handle(name: str, request: bytes) -> bytes:
    req = json.loads(request)
    if req["op"] == "keywrap":
        param = base64.b64decode(req["keywrapparams"]["ec"]["Parameters"][name][0])
        opts = base64.b64decode(req["keywrapparams"]["optsdata"])
        nonce = os.urandom(12)
        wrapped = AESGCM(hashlib.sha256(param).digest()).encrypt(nonce, opts, None)
        ann = json.dumps(
            {"n": base64.b64encode(nonce).decode(), "w": base64.b64encode(wrapped).decode()}
        ).encode()
        return json.dumps(
            {"keywrapresults": {"annotation": base64.b64encode(ann).decode()}}
        ).encode()
    if req["op"] == "keyunwrap":
        param = base64.b64decode(req["keyunwrapparams"]["dc"]["Parameters"][name][0])
        ann = json.loads(base64.b64decode(req["keyunwrapparams"]["annotation"]))
        opts = AESGCM(hashlib.sha256(param).digest()).decrypt(
            base64.b64decode(ann["n"]), base64.b64decode(ann["w"]), None
        )
        return json.dumps({"keyunwrapresults": {"optsdata": list(opts)}}).encode()
    raise ValueError(f"unknown op {req['op']!r}")


if __name__ == "__main__":
    try:
        sys.stdout.buffer.write(handle(sys.argv[1], sys.stdin.buffer.read()))
    except Exception as e:
        print(f"test key provider: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
