"""What reaches a user as an error message: one readable line, never a traceback.

A message may come from far away — the peer's ERROR frame, a vCPU process, an older cvmig —
and carry a Python traceback; `clean` keeps what the user can act on: the exception line a
traceback ends with, and the text around it.
"""

from __future__ import annotations

import re

_TRACEBACK = re.compile(r"Traceback \(most recent call last\):\n(?:[ \t].*(?:\n|$))*")
MAX_LEN = 2000


def clean(text: object) -> str:
    """``text`` as one line without tracebacks, at most MAX_LEN characters."""
    s = _TRACEBACK.sub("", str(text))
    s = " ".join(part.strip() for part in s.splitlines() if part.strip())
    if len(s) > MAX_LEN:
        s = s[: MAX_LEN - 3] + "..."
    return s
