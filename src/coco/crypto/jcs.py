"""RFC 8785 JSON Canonicalization Scheme (JCS): the bytes the KBS protocol hashes.

Keys are sorted by their UTF-16 code units, no insignificant whitespace, strings escaped as
ECMAScript's ``JSON.stringify`` does (only ``"``, ``\\`` and control characters; everything else
as raw UTF-8) and numbers in ECMAScript's shortest round-trip form.
"""

from __future__ import annotations

import math
from json.encoder import encode_basestring as _encode_basestring  # type: ignore[attr-defined]
from typing import Any

__all__ = ["canonicalize"]


def canonicalize(value: Any) -> bytes:
    """The canonical UTF-8 bytes of a JSON value (dict/list/str/int/float/bool/None)."""
    out: list[str] = []
    _emit(value, out)
    return "".join(out).encode("utf-8")


def _emit(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, int):
        if abs(value) >= 2**53:
            raise ValueError(f"JCS: integer {value} is outside the IEEE 754 exact range")
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, dict):
        out.append("{")
        first = True
        for key in sorted(value, key=_utf16_key):
            if not isinstance(key, str):
                raise ValueError(f"JCS: object keys must be strings, found {type(key).__name__}")
            if not first:
                out.append(",")
            first = False
            out.append(_string(key))
            out.append(":")
            _emit(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _emit(item, out)
        out.append("]")
    else:
        raise ValueError(f"JCS: cannot serialize {type(value).__name__}")


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be")


def _string(s: str) -> str:
    # Python's C string encoder (ensure_ascii=False flavour) escapes exactly what RFC 8785 does:
    # '"', '\\', \b \f \n \r \t and other control characters as lowercase \u00xx.
    return _encode_basestring(s)


def _number(x: float) -> str:
    if math.isnan(x) or math.isinf(x):
        raise ValueError("JCS: NaN and Infinity are not JSON numbers")
    if x == 0:
        return "0"
    if x.is_integer() and abs(x) < 1e21:
        return str(int(x))
    # repr() gives the shortest round-trip digits; reshape them the ECMAScript way.
    r = repr(x)
    sign = "-" if r.startswith("-") else ""
    r = r.lstrip("-")
    mantissa, _, exp_s = r.partition("e")
    exp = int(exp_s) if exp_s else 0
    int_part, _, frac = mantissa.partition(".")
    digits = (int_part + frac).lstrip("0")
    # decimal exponent n such that value = 0.digits * 10**n
    n = len(int_part) + exp if int_part != "0" else exp - (len(frac) - len(frac.lstrip("0")))
    digits = digits.rstrip("0") or "0"
    k = len(digits)
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * (-n) + digits
    e = n - 1
    es = f"+{e}" if e >= 0 else str(e)
    if k == 1:
        return f"{sign}{digits}e{es}"
    return f"{sign}{digits[0]}.{digits[1:]}e{es}"
