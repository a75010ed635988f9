"""Shared fixtures for the TEE verifier tests: the upstream vectors and helpers to corrupt them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

VECTORS = Path("/work/shared/vectors/trustee")


def vector(rel: str) -> Path:
    path = VECTORS / rel
    if not path.exists():
        pytest.fail(f"test vector {path} is missing")
    return path


def load_json(rel: str) -> dict[str, Any]:
    return json.loads(vector(rel).read_bytes())


def flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)
