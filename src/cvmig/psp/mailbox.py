"""Compatibility: the mailbox's old single module, now split (see README.md, "Mailbox").

`commands` (the command table), `ring` (the shared-memory doorbell), `server`
(`PspServer`), `client` (`MailboxClient`, `fetch_memory_key`), `process` (`PspProcess`)
and `child` (the launcher). Import from those; this module re-exports the old names, and
``python -m cvmig.psp.mailbox`` still runs the PSP.
"""

from __future__ import annotations

from cvmig.psp import commands as _k
from cvmig.psp.client import MailboxClient, doorbell_round_trip, fetch_memory_key
from cvmig.psp.commands import COMMAND_NAMES, MAX_MESSAGE
from cvmig.psp.process import PspProcess, main
from cvmig.psp.server import PspServer, serve_in_thread

# The command IDs, as ints (the table's `Command` objects carry them as ``.id``).
PLATFORM_STATUS = _k.PLATFORM_STATUS.id
PDH_CERT_EXPORT = _k.PDH_CERT_EXPORT.id
DECOMMISSION = _k.DECOMMISSION.id
GUEST_STATUS = _k.GUEST_STATUS.id
LAUNCH_START = _k.LAUNCH_START.id
SEND_START = _k.SEND_START.id
SEND_UPDATE_DATA = _k.SEND_UPDATE_DATA.id
SEND_UPDATE_VMSA = _k.SEND_UPDATE_VMSA.id
SEND_FINISH = _k.SEND_FINISH.id
SEND_CANCEL = _k.SEND_CANCEL.id
SEND_TRAILER = _k.SEND_TRAILER.id
RECEIVE_START = _k.RECEIVE_START.id
RECEIVE_UPDATE_DATA = _k.RECEIVE_UPDATE_DATA.id
RECEIVE_UPDATE_VMSA = _k.RECEIVE_UPDATE_VMSA.id
RECEIVE_FINISH = _k.RECEIVE_FINISH.id
MAP_REGION = _k.MAP_REGION.id
UNMAP_REGION = _k.UNMAP_REGION.id
SEND_UPDATE_DATA_QUEUE = _k.SEND_UPDATE_DATA_QUEUE.id
RECEIVE_UPDATE_DATA_QUEUE = _k.RECEIVE_UPDATE_DATA_QUEUE.id
FETCH_MEMORY_KEY = _k.FETCH_MEMORY_KEY.id

__all__ = [
    "COMMAND_NAMES", "MAX_MESSAGE", "MailboxClient", "PspProcess", "PspServer",
    "doorbell_round_trip", "fetch_memory_key", "main", "serve_in_thread",
    "PLATFORM_STATUS", "PDH_CERT_EXPORT", "DECOMMISSION", "GUEST_STATUS", "LAUNCH_START",
    "SEND_START", "SEND_UPDATE_DATA", "SEND_UPDATE_VMSA", "SEND_FINISH", "SEND_CANCEL",
    "SEND_TRAILER", "RECEIVE_START", "RECEIVE_UPDATE_DATA", "RECEIVE_UPDATE_VMSA",
    "RECEIVE_FINISH", "MAP_REGION", "UNMAP_REGION", "SEND_UPDATE_DATA_QUEUE",
    "RECEIVE_UPDATE_DATA_QUEUE", "FETCH_MEMORY_KEY",
]

if __name__ == "__main__":
    main()
