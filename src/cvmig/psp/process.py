"""The PSP as its own process: `PspProcess` starts and stops it; `main` is the process.

Run standalone: ``python -m cvmig.psp.process --socket /run/psp.sock [--profile sev-2020]``
(it prints ``ready`` once it serves). Started by `PspProcess`, it announces itself through
`child.spawn`'s handshake instead and exits when the host process that started it is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
from pathlib import Path
from types import TracebackType

from cvmig.psp import certs as C
from cvmig.psp.api import SPEC_MAX_LENGTH
from cvmig.psp.child import Child, ChildFailed, Parent, spawn
from cvmig.psp.client import MailboxClient
from cvmig.psp.cost import parse
from cvmig.psp.firmware import DEFAULT_MAX_SG_PAGES, Firmware, shm_path
from cvmig.psp.server import PspServer


class PspProcess:
    """Start (and stop) one host's PSP as its own process serving ``socket_path``.

    ``profile``: cost profile name or spec (see `cvmig.psp.cost`). ``max_contig_bytes``:
    the contig cap (16 KiB per the SEV spec; larger is an extension). ``pki``: directory of
    the emulated PKI (``amd-root/``, ``owner/``; default `certs.pki_dir()`), so that every
    PSP on the machine chains to one ARK and, by default, one owner (a DOMAIN). ``owner``:
    another owner directory, or ``"self"`` for a self-owned platform with a fresh OCA.
    ``remove_dir``: an (empty but for the socket) directory the PSP removes if its host
    process dies first, with the shm names of the regions mapped here: a host killed
    outright leaves nothing behind.
    """

    def __init__(
        self,
        socket_path: str,
        profile: str = "none",
        *,
        max_contig_bytes: int = SPEC_MAX_LENGTH,
        max_sg_pages: int = DEFAULT_MAX_SG_PAGES,
        pki: str | None = None,
        owner: str | None = None,
        start_timeout: float = 30.0,
        remove_dir: str | None = None,
    ) -> None:
        parse(profile)  # fail here, not in the child
        self.socket_path = socket_path
        self.profile = profile
        self._args = [
            "--socket", socket_path, "--profile", profile,
            "--max-contig-bytes", str(max_contig_bytes), "--max-sg-pages", str(max_sg_pages),
            "--parent-pid", str(os.getpid()),
        ]
        if pki:
            self._args += ["--pki", pki]
        if owner:
            self._args += ["--owner", owner]
        if remove_dir:
            self._args += ["--remove-dir", remove_dir]
        self._timeout = start_timeout
        self._child: Child | None = None

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    def start(self) -> PspProcess:
        if self._child is not None:
            raise RuntimeError("PSP process already started")
        try:
            self._child = spawn([sys.executable, "-m", "cvmig.psp.process", *self._args],
                                what="PSP process", ready_timeout=self._timeout)
        except ChildFailed as e:
            raise RuntimeError(f"PSP process did not start: {e}") from None
        return self

    def client(self, trace: list[bytes] | None = None) -> MailboxClient:
        return MailboxClient(self.socket_path, trace)

    def stop(self, timeout: float = 10.0) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.stop(timeout)

    def __enter__(self) -> PspProcess:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cvmig.psp.process", description=__doc__)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--profile", default="none")
    ap.add_argument("--max-contig-bytes", type=int, default=SPEC_MAX_LENGTH)
    ap.add_argument("--max-sg-pages", type=int, default=DEFAULT_MAX_SG_PAGES)
    ap.add_argument("--pki", default=None)
    ap.add_argument("--owner", default=None)
    ap.add_argument("--parent-pid", type=int, default=None,
                    help="exit when this process (the host that started the PSP) is gone")
    ap.add_argument("--remove-dir", default=None,
                    help="if the host dies first: remove this directory (it holds the "
                         "socket) and the shm names of every region mapped here")
    a = ap.parse_args(argv)
    parent = Parent.from_env()
    try:
        if a.pki:
            os.environ["CVMIG_PKI_DIR"] = a.pki
        root, owner = C.default_pki()
        if a.owner == "self":
            owner = C.Owner.generate()
        elif a.owner:
            owner = C.Owner.load(Path(a.owner))
        fw = Firmware(
            C.PlatformIdentity.generate(root, owner), trusted_arks=[root.ark_cert],
            max_contig_bytes=a.max_contig_bytes, max_sg_pages=a.max_sg_pages,
        )
        server = PspServer(fw, a.socket, a.profile)
    except Exception as e:
        if parent is None:
            raise
        parent.fail(f"{type(e).__name__}: {e}")
        sys.exit(1)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    if parent is None:
        print("ready", flush=True)
    else:
        parent.ready(socket=a.socket)
    server.serve_forever(parent_pid=a.parent_pid,
                         lifeline=None if parent is None else parent.fileno())
    if _host_gone(parent, a.parent_pid):
        _clean_up_after_host(fw, a.remove_dir)


def _host_gone(parent: Parent | None, parent_pid: int | None) -> bool:
    """Whether the host that started us died (rather than stopping us)."""
    if parent is not None and select.select([parent.fileno()], [], [], 0)[0]:
        return True  # the lifeline reads end of file: the host never writes on it
    return parent_pid is not None and os.getppid() != parent_pid


def _clean_up_after_host(fw: Firmware, remove_dir: str | None) -> None:
    """What a host killed outright could not remove: the shm names of the regions it had
    us map (guest memory, transport buffers; the mappings stay valid while mapped) and its
    directory. Names already removed, as the engine does once every party has them mapped,
    are simply not there."""
    for region in list(fw._regions.values()):
        with contextlib.suppress(OSError):
            os.unlink(shm_path(region.name))
    if remove_dir:
        with contextlib.suppress(OSError):
            for entry in os.scandir(remove_dir):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            os.rmdir(remove_dir)


if __name__ == "__main__":
    main()
