"""The one grammar for sizes users type: QEMU's (``qemu_strtosz``), for every part.

A decimal number (a fraction allowed when a unit follows) or a hexadecimal one, then an
optional unit: B, K, M, G, T, P or E, binary, case-insensitive; ``KiB``/``MB`` spellings
are read as the same binary units. No unit means bytes. Imports nothing of cvmig: the
guest's command line and the migration's share it.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
          "P": 1 << 50, "E": 1 << 60}
_SIZE = re.compile(r"\s*(?:(0x[0-9a-f]+)|(\d+(?:\.\d*)?|\.\d+))\s*([bkmgtpe]?)(?:i?b)?\s*",
                   re.IGNORECASE)
MAX_SIZE = (1 << 64) - 1
HINT = ("a non-negative number below 2^64, optional suffix B, K, M, G, T, P or E "
        "(binary units)")


def parse_size(text: str, what: str = "size") -> int:
    """'256M', '1.5G', '0x1000', '4096' -> bytes; ValueError in one line otherwise."""
    m = _SIZE.fullmatch(text)
    if m is None or (m.group(3) == "" and text.strip().lower().endswith("ib")):
        raise ValueError(f"{what} expects {HINT}, got {text!r}")
    hexa, dec, unit = m.group(1), m.group(2), m.group(3).upper()
    mul = _UNITS[unit]
    if hexa is not None:
        value = int(hexa, 16) * mul
    else:
        whole, _, frac = dec.partition(".")
        if frac.strip("0") and mul == 1:  # QEMU: a fraction of a byte is not a size
            raise ValueError(f"{what} expects a whole number of bytes, got {text!r}")
        value = int(whole or "0") * mul + int(float(f"0.{frac or '0'}") * mul)
    if value > MAX_SIZE:
        raise ValueError(f"{what} expects {HINT}, got {text!r}")
    return value
