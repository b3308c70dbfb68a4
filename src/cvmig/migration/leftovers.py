"""Leftovers of processes killed outright, and their removal.

Every name cvmig creates in /dev/shm or the temporary directory carries the pid of the
process that owns it: ``cvmig-guest-<pid>-<hex>`` (guest memory, transport buffers, and
``...-ctl-<hex>`` control blocks), ``cvmig-psp-<pid>-<hex>`` (test regions),
``cvmig-source-<pid>-*`` and ``cvmig-destination-<pid>-*`` (a host's directory, holding its
PSP's socket). The owner removes its names early or on exit; when it is killed outright
(``kill -9``) its survivors remove them (the PSP and the vCPUs notice their parent's death);
what even they could not remove (all of them killed at once) `sweep` removes at the next
start of a host, by the dead owner's pid. A name whose owner lives is never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile

SHM_DIR = "/dev/shm"
_SHM_NAME = re.compile(r"^cvmig-[a-z]+(?:-[a-z]+)*-(\d+)-[0-9a-f]{8}(?:-|$)")
_HOST_DIR = re.compile(r"^cvmig-(?:source|destination)-(\d+)-")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _dead_owner(pattern: re.Pattern[str], name: str) -> bool:
    m = pattern.match(name)
    return m is not None and not pid_alive(int(m.group(1)))


def sweep(shm_dir: str = SHM_DIR, tmp_dir: str | None = None) -> list[str]:
    """Remove cvmig's shm names and host directories whose owner process is dead; return
    what was removed."""
    removed: list[str] = []
    with contextlib.suppress(OSError):
        for name in os.listdir(shm_dir):
            if _dead_owner(_SHM_NAME, name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(shm_dir, name))
                    removed.append(os.path.join(shm_dir, name))
    tmp = tmp_dir or tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            if _dead_owner(_HOST_DIR, name) and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
                if not os.path.exists(path):
                    removed.append(path)
    return removed
