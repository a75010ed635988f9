"""Rego policies evaluated with regopy (rego-cpp).

A :class:`RegoPolicy` compiles the policy once per distinct ``data`` document into a bundle and
caches it, so each evaluation only runs the compiled plan (well under a millisecond).
``query_reference_value(id)`` (the upstream regorus extension) is provided as a Rego function over
``data.reference_values``, which the attestation service fills from the RVPS.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from typing import Any

import regopy
from regopy import rego_shared as _rs

from coco.errors import CocoError

__all__ = ["PolicyError", "RegoPolicy"]

_RV_MODULE = "package policy\n\nquery_reference_value(id) := data.reference_values[id]\n"
_ERRMSG = re.compile(r"\(errormsg \d+:([^)]*)\)")
_PKG = re.compile(r"^\s*package\s+([A-Za-z_][A-Za-z0-9_.]*)", re.M)


_LIB = _rs.rego
_OK = _rs.Code.OK


def _input(value: Any) -> regopy.Input:
    """A regopy Input built with direct C calls (regopy's own builder costs ~1 ms per token)."""
    p = _rs.rego_new_input()
    lib = _LIB

    def add(v: Any) -> int:
        if v is True or v is False:
            return lib.regoInputBoolean(p, v)
        if isinstance(v, str):
            return lib.regoInputString(p, v.encode("utf-8"))
        if isinstance(v, dict):
            for k, item in v.items():
                if add(k) != _OK or add(item) != _OK or lib.regoInputObjectItem(p) != _OK:
                    return -1
            return lib.regoInputObject(p, len(v))
        if isinstance(v, list | tuple):
            for item in v:
                if add(item) != _OK:
                    return -1
            return lib.regoInputArray(p, len(v))
        if isinstance(v, int):
            return lib.regoInputInt(p, v)
        if isinstance(v, float):
            return lib.regoInputFloat(p, v)
        if v is None:
            return lib.regoInputNull(p)
        raise PolicyError(f"policy input: cannot convert {type(v).__name__}")

    inp = regopy.Input.__new__(regopy.Input)
    inp._impl = p  # freed by Input.__del__
    if add(value) != _OK:
        raise PolicyError("policy input: the Rego engine refused the input document")
    return inp


class PolicyError(CocoError):
    """A policy that does not compile, or whose evaluation failed."""


def _rego_message(e: Exception) -> str:
    msgs = _ERRMSG.findall(str(e))
    return "; ".join(dict.fromkeys(msgs)) if msgs else " ".join(str(e).split())[:300]


class RegoPolicy:
    """One policy text, queried for a few rules of ``package policy``."""

    def __init__(
        self, text: str, name: str, rules: tuple[str, ...], *, reference_values: bool = False
    ) -> None:
        pkg = _PKG.search(text)
        if not pkg:
            raise PolicyError(f"policy {name}: expected a 'package' declaration")
        if pkg.group(1) != "policy":
            raise PolicyError(f"policy {name}: expected 'package policy', found {pkg.group(1)!r}")
        self.text = text
        self.name = name
        self.rules = rules
        self.reference_values = reference_values
        self.digest = hashlib.sha384(text.encode()).hexdigest()
        self._out = "package coco_out\n\n" + "".join(
            f'out["{r}"] := data.policy.{r}\n' for r in rules
        )
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._bundle("{}")  # compile now: syntax errors are refused at upload

    def _bundle(self, data_json: str) -> Any:
        with self._lock:
            b = self._cache.get(data_json)
            if b is not None:
                self._cache.move_to_end(data_json)
                return b
        interp = regopy.Interpreter()
        try:
            interp.add_module(f"{self.name}.rego", self.text)
            if self.reference_values:
                interp.add_module("coco_reference_values.rego", _RV_MODULE)
            interp.add_module("coco_out.rego", self._out)
            interp.add_data_json(data_json)
            b = interp.build("x := data.coco_out.out", [])
        except regopy.RegoError as e:
            raise PolicyError(f"policy {self.name}: does not compile: {_rego_message(e)}") from None
        with self._lock:
            self._cache[data_json] = b
            while len(self._cache) > 256:
                self._cache.popitem(last=False)
        return b

    def evaluate(self, input_doc: Any, data: dict[str, Any]) -> dict[str, Any]:
        """The defined rules among ``rules`` (an undefined rule is absent from the result)."""
        bundle = self._bundle(json.dumps(data, sort_keys=True, separators=(",", ":")))
        runner = regopy.Interpreter()
        try:
            runner.set_input(_input(input_doc))
            out = runner.query_bundle(bundle)
        except regopy.RegoError as e:
            raise PolicyError(
                f"policy {self.name}: evaluation failed: {_rego_message(e)}"
            ) from None
        if not out.ok():
            raise PolicyError(f"policy {self.name}: evaluation failed: {str(out)[:300]}")
        try:
            result = json.loads(str(out))
        except ValueError as e:
            raise PolicyError(f"policy {self.name}: unreadable result: {e}") from None
        value = result.get("bindings", {}).get("x")
        return value if isinstance(value, dict) else {}
