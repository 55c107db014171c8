"""Sizes as people write them: ``540672``, ``64K``, ``1.5M``, ``2G`` (powers of 1024)."""

from __future__ import annotations

import re

from nvmgr.errors import UsageError

_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"(\d{1,15})(?:\.(\d{1,6}))?\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse a byte count with an optional K/M/G/T suffix (KiB, MiB... accepted).

    :raise UsageError: for anything else, negative numbers and fractions of a byte.
    """
    m = _SIZE_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m:
        raise UsageError(f"invalid {what} {text!r}: use a byte count with an optional K, M, G or T suffix")
    whole, frac, unit = m.group(1), m.group(2) or "", m.group(3).upper()
    mult = _SUFFIX[unit]
    value = int(whole) * mult + (int(frac) * mult // 10 ** len(frac) if frac else 0)
    if frac and (int(frac) * mult) % 10 ** len(frac):
        raise UsageError(f"invalid {what} {text!r}: not a whole number of bytes")
    return value


def format_size(n: int) -> str:
    """``540672`` -> ``528 KiB``; exact values only, else plain bytes."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10 and n % 1024 == 0:
        return f"{n >> 10} KiB"
    return f"{n} B"
