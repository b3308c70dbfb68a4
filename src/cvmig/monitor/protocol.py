"""QMP's wire format: framing, the greeting, errors and events, as QEMU writes them.

QEMU reads QMP with a streaming JSON parser, not by lines: a message may span lines and
several may share one. We cut the stream the same way, by bracket depth outside strings;
a newline at depth 0 ends anything else (a bare scalar or junk), so a typo typed into
``socat`` gets its error at once instead of waiting for a brace that never comes.
"""

from __future__ import annotations

import json
import time
from typing import Any

from cvmig import __version__ as _cvmig_version

# The QAPI schema we follow (QEMU 10.0's, as query-qmp-schema shows); clients key features on it.
QEMU_VERSION = {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": f"cvmig {_cvmig_version}"}
MAX_MESSAGE = 1 << 20  # bytes of one message; QEMU's limit is larger, ours needs no more
MAX_DEPTH = 1024  # QEMU's MAX_NESTING


class QMPError(Exception):
    """A command failed; the VM is untouched. ``cls`` is QEMU's ErrorClass."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


def greeting() -> dict[str, Any]:
    # no "oob": commands run in order on one connection, as on a monitor without it
    return {"QMP": {"version": QEMU_VERSION, "capabilities": []}}


def timestamp() -> dict[str, int]:
    """QEMU's event timestamp: wall clock, seconds and microseconds."""
    ns = time.time_ns()
    return {"seconds": ns // 1_000_000_000, "microseconds": ns // 1000 % 1_000_000}


def event(name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"timestamp": timestamp(), "event": name}
    if data is not None:  # STOP and RESUME carry no data member at all
        msg["data"] = data
    return msg


def error(err: QMPError, msg_id: Any = None, has_id: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"error": {"class": err.cls, "desc": err.desc}}
    if has_id:
        out["id"] = msg_id
    return out


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(", ", ": ")).encode() + b"\r\n"  # QEMU ends with CRLF


def parse(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise QMPError("JSON parse error, nesting too deep") from None
    except ValueError as e:
        msg = getattr(e, "msg", str(e))
        raise QMPError(f"JSON parse error, {msg[:1].lower()}{msg[1:]}") from None


class Splitter:
    """Cuts a character stream into JSON texts; errors come out in place of a text."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._buf: list[str] = []
        self._depth = 0
        self._in_str = False
        self._esc = False

    def feed(self, text: str) -> list[str | QMPError]:
        out: list[str | QMPError] = []
        buf = self._buf
        for ch in text:
            if self._in_str:
                buf.append(ch)
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
            elif ch == '"':
                self._in_str = True
                buf.append(ch)
            elif ch in "{[":
                self._depth += 1
                buf.append(ch)
                if self._depth > MAX_DEPTH:
                    out.append(QMPError("JSON parse error, nesting too deep"))
                    self._reset()
                    buf = self._buf
            elif ch in "}]":
                self._depth -= 1
                buf.append(ch)
                if self._depth <= 0:
                    out.append("".join(buf) if self._depth == 0
                               else QMPError("JSON parse error, unexpected end of object"))
                    self._reset()
                    buf = self._buf
            elif ch == "\n" and self._depth == 0:
                if "".join(buf).strip():
                    out.append("".join(buf))
                self._reset()
                buf = self._buf
            elif buf or not ch.isspace():
                buf.append(ch)
            if len(buf) > MAX_MESSAGE:
                out.append(QMPError(f"JSON parse error, message longer than {MAX_MESSAGE} bytes"))
                self._reset()
                buf = self._buf
        return out


_REQUEST_MEMBERS = ("execute", "exec-oob", "arguments", "id", "control")


def check_request(msg: Any) -> tuple[str, dict[str, Any]]:
    """qmp_dispatch's checks of the envelope, with QEMU's messages."""
    if not isinstance(msg, dict):
        raise QMPError("QMP input must be a JSON object")
    for key in msg:
        if key not in _REQUEST_MEMBERS:
            raise QMPError(f"QMP input member '{key}' is unexpected")
    if "exec-oob" in msg:
        raise QMPError("QMP input member 'exec-oob' is unexpected: out-of-band execution "
                       "was not negotiated (this monitor offers no 'oob')")
    if "execute" not in msg:
        raise QMPError("QMP input lacks member 'execute'")
    cmd = msg["execute"]
    if not isinstance(cmd, str):
        raise QMPError("QMP input member 'execute' must be a string")
    args = msg.get("arguments", {})
    if not isinstance(args, dict):
        raise QMPError("QMP input member 'arguments' must be an object")
    return cmd, args
