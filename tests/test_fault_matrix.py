"""The fault matrix: a frame-level man in the middle (`tests.netfault.FrameProxy`) breaks a
real migration at one point, in one way, and every case checks the handoff's invariants:

- never lost: afterwards the guest runs on exactly one host, and that host says so — the
  source reports failure and its guest runs on with its memory intact, or the migration
  completed, the destination runs the guest (its workload check passes) and the source
  released it;
- never twice: it never runs on both — after a failure the destination discards its copy
  (its last word is "failed", its exit code non-zero), and if it had already resumed the
  guest it stops no later than the source takes the guest back (within a small grace);
- never stale: no success with memory that differs (the digests match and the workload's
  own check passes), and a fault that alters the guest's memory in transit never lets the
  destination claim to run it;
- a clear one-line error without a traceback, the exit code (CLI) or exception type (API),
  a failure noticed within the I/O timeout, and nothing left behind (no /dev/shm name, no
  cvmig-source-*/cvmig-destination-* directory, no child process of the run).

The source runs in this process through `migrate_out` (which takes a short ``io_timeout``),
or as `python -m cvmig migrate --to ...` for kill -9 of the source and for the CLI's own
timeouts; the destination is always `cvmig vm --incoming ... --once --announce`.

The destination's I/O timeout cannot be set from `cvmig vm` (15 s before FINISH), so a
stall here ends after a bounded hold with the proxy closing both ways; how soon a silent
peer is noticed without that is checked on its own. A migration still going 20 s into a
case is cut by the proxy and the case fails: every wait must be bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from cvmig.guest.vm import GuestConfig
from cvmig.guest.workloads import parse_workload
from cvmig.migration.driver import MigrationParams, Progress
from cvmig.migration.host import Host
from cvmig.migration.session import DestinationProcess
from cvmig.migration.source import (
    MigrationFailed,
    MigrationInDoubt,
    Outcome,
    SourceHold,
    SourceVM,
    migrate_out,
)
from cvmig.psp.api import Batching, GuestState, Policy
from cvmig.wire.channel import parse_uri
from cvmig.wire.frames import MAX_META, FrameType
from cvmig.wire.protocol import LEASE_REQUEST_S
from tests.netfault import (
    D2S,
    S2D,
    At,
    BeforeVmsa,
    Fault,
    FrameProxy,
    Iterative,
    Where,
    ack_count,
    flip_hex,
    json_field,
    page_state_flip,
    pages_bounds,
    pages_count,
    pages_pfn,
    rewrite_start_batching,
    rewrite_start_npages,
    vmsa_pfn,
)
from tests.test_migration_failures import assert_still_running_intact

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
ES = int(Policy.NODBG | Policy.ES)
MEMORY = 16 * MiB
LIGHT = "dirtier:rate=3000,pattern=hotcold"  # bulk, then stop-and-copy
DIRTY = "dirtier:rate=6000,pattern=uniform"  # with downtime-limit 1: an iterative round
IO_TIMEOUT = 2.0  # the source's, through the API
HOLD = IO_TIMEOUT + 1.5  # a stall's hold: longer than the source's I/O timeout
DELAY = 1.0  # a delay: shorter than it
DETECT = IO_TIMEOUT + 3.0  # fault to source failure: the I/O timeout, the last words, roll back
# ... after the pause: issue 10 asks a silent peer noticed within 5 s, and the source may
# have to outwait the destination's lease (never twice) before it resumes its copy
DETECT_AFTER_PAUSE = 10.0
WATCHDOG_S = 20.0  # a migration still going this long into a case is hung
RESOLVE_WINDOW = 3.0  # how long a released source tries to tell an unreachable destination
SETTLE = IO_TIMEOUT + 8.0  # source done to destination done
TWICE_GRACE = 1.5  # how long a resumed destination may run on after the source took back
HUGE = 1 << 40

FAILED, COMPLETED, IN_DOUBT, ANY = "failed", "completed", "in-doubt", "any"


# -- the parts of a case ---------------------------------------------------------------------


class Dest:
    """The destination process, its announcements timestamped as they arrive."""

    def __init__(self) -> None:
        self.p = DestinationProcess()
        self.pid = self.p.pid
        self.target = parse_uri(self.p.uri)
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.stderr: list[str] = []
        self._q: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._readers = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._readers:
            t.start()

    def _read_out(self) -> None:
        assert self.p.proc.stdout is not None
        for line in self.p.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"event": "garbage", "line": line}
            self.events.append((time.monotonic(), ev))
            self._q.put(None)

    def _read_err(self) -> None:
        assert self.p.proc.stderr is not None
        for line in self.p.proc.stderr:
            self.stderr.append(line)

    def said(self, event: str) -> bool:
        return any(e[1].get("event") == event for e in self.events)

    def last(self) -> tuple[float, dict[str, Any]] | None:
        done = [e for e in self.events if e[1].get("event") in ("migrated", "failed")]
        return done[-1] if done else None

    def wait_exit(self, deadline: float) -> int | None:
        """The exit code, or None if it still runs at ``deadline``."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.proc.wait(max(0.0, deadline - time.monotonic()))
        code = self.p.proc.poll()
        if code is not None:
            for t in self._readers:
                t.join(5)
        return code

    def close(self) -> None:
        self.p.kill()
        for t in self._readers:
            t.join(5)
        self.p.close()


class Spare:
    """One destination started ahead, while the previous case tears down: a destination
    process takes over a second to start, most of a short case."""

    def __init__(self) -> None:
        self._next: list[Dest | BaseException] = []
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._make, daemon=True)
            self._thread.start()

    def _make(self) -> None:
        try:
            self._next.append(Dest())
        except BaseException as e:  # noqa: BLE001 - raised to whoever takes it
            self._next.append(e)

    def take(self) -> Dest:
        """The started destination (or a new one), listening and still alive."""
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None
        got = self._next.pop() if self._next else None
        if isinstance(got, Dest) and got.p.proc.poll() is None:
            return got
        if isinstance(got, Dest):
            got.close()
        return Dest()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None
        for d in self._next:
            if isinstance(d, Dest):
                d.close()
        self._next.clear()


SPARE = Spare()


@pytest.fixture(scope="module", autouse=True)
def _spare_destination() -> Iterator[None]:
    yield
    SPARE.close()


def children_of(pid: int) -> set[int]:
    """Every live descendant of ``pid``."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p and c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_gone(pids: set[int], what: str, within: float = 10.0) -> None:
    """Every process in ``pids`` exits within ``within`` s; any left is killed (it is
    ours) and the case fails."""
    deadline = time.monotonic() + within
    left = {p for p in pids if alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.05)  # polling /proc for exits, with a deadline
        left = {p for p in left if alive(p)}
    for p in left:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    assert not left, f"{what} left running: pids {sorted(left)}"


TMP_PREFIXES = ("cvmig-source-", "cvmig-destination-")


def host_dirs(pids: set[int]) -> set[str]:
    """The temporary directories of the hosts among ``pids``: each host's secure
    processor serves a socket in its host's directory (``--socket DIR/psp.sock``)."""
    tmp = tempfile.gettempdir()
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        for flag, value in zip(argv, argv[1:], strict=False):
            d = os.path.dirname(value)
            if flag == "--socket" and os.path.basename(d).startswith(TMP_PREFIXES) and \
                    os.path.dirname(d) == tmp:
                out.add(d)
    return out


def wait_host_dirs(left: Leftovers, pid: int, timeout: float = 30.0) -> None:
    """Note the host directory of process ``pid`` as soon as its PSP runs."""
    deadline = time.monotonic() + timeout
    while not (dirs := host_dirs(children_of(pid))):
        if time.monotonic() > deadline or not alive(pid):
            return
        time.sleep(0.02)  # polling /proc for the child, with a deadline
    left.dirs |= dirs


class Leftovers:
    """What a case left in /dev/shm and the temporary directory. Only what the case's own
    processes created counts (other tests may run at the same time): /dev/shm names that
    are new and carry the pid of one of them, and the directories of its hosts."""

    def __init__(self) -> None:
        self.shm0 = set(os.listdir("/dev/shm"))
        self.dirs: set[str] = set()

    def note(self, pids: set[int]) -> set[int]:
        """Remember the host directories of ``pids`` (while they run); returns pids."""
        self.dirs |= host_dirs(pids)
        return pids

    def left(self, pids: set[int]) -> list[str]:
        marks = tuple(f"-{p}-" for p in pids)
        shm = [n for n in set(os.listdir("/dev/shm")) - self.shm0
               if n.startswith("cvmig-") and any(m in n for m in marks)]
        return [f"/dev/shm/{n}" for n in shm] + [d for d in self.dirs if os.path.exists(d)]

    def assert_clean(self, pids: set[int], within: float = 5.0) -> None:
        deadline = time.monotonic() + within
        while (left := self.left(pids)) and time.monotonic() < deadline:
            time.sleep(0.05)  # cleanup by exiting processes, polled with a deadline
        assert not left, f"left behind: {left}"


def assert_clear(msg: str, who: str) -> None:
    """One line a person can act on: not empty, no traceback."""
    assert msg.strip(), f"{who}: empty error message"
    assert "\n" not in msg.strip(), f"{who}: multi-line error message: {msg!r}"
    assert "Traceback" not in msg and 'File "' not in msg, f"{who}: traceback: {msg!r}"


def assert_runs_intact(vm: SourceVM) -> None:
    """The source guest runs on, intact (`test_migration_failures`' check), not shut down."""
    assert vm.alive, "the source shut its guest down"
    assert_still_running_intact(vm)


def assert_released(vm: SourceVM) -> None:
    assert not vm.alive, "migration completed but the source guest was not shut down"
    # None: decommissioned
    assert vm.psp_state() is not GuestState.RUNNING, "the source's PSP context still RUNNING"


# -- the cases -------------------------------------------------------------------------------

Make = Callable[["Run"], Fault]


@dataclass(frozen=True)
class Case:
    id: str
    make: Make
    expect: str = ANY  # what the design demands of this fault, beyond the invariants
    phase: str = "bulk"  # setup | bulk | iterative | stop-and-copy | end-game
    batching: Batching = Batching.AEAD
    alters: bool = False  # the guest's memory is altered in transit
    xfail: str | None = None

    @property
    def workload(self) -> str:
        return DIRTY if self.phase == "iterative" else LIGHT

    def params(self) -> MigrationParams:
        if self.phase == "iterative":
            return MigrationParams(batching=self.batching, downtime_limit_ms=1, max_rounds=1)
        return MigrationParams(batching=self.batching)


def fault(kind: str, where: Where, **kw: Any) -> Make:
    return lambda run: Fault(kind, where, **kw)


PAGES1 = At(S2D, FrameType.PAGES, 1)  # the bulk round's second page frame
ITER = Iterative()
LAST = BeforeVmsa()
VMSA0 = At(S2D, FrameType.VMSA, 0)
PSTATE = At(S2D, FrameType.PAGE_STATE, 0)
FINISH = At(S2D, FrameType.FINISH, 0)
CONFIRM0 = At(D2S, FrameType.CONFIRM, 0)
RELEASED = At(S2D, FrameType.RELEASED, 0)
CONFIRM1 = At(D2S, FrameType.CONFIRM, 1)
RENEWAL = At(D2S, FrameType.HEARTBEAT, 0)  # lease request 1: the guest runs at D

CASES = [
    # setup
    Case("setup-drop-CERTS", fault("drop", At(D2S, FrameType.CERTS)), FAILED, "setup"),
    Case("setup-meta-START-npages", fault("corrupt_meta", At(S2D, FrameType.START),
                                          rewrite=rewrite_start_npages), FAILED, "setup"),
    Case("setup-meta-START-batching", fault("corrupt_meta", At(S2D, FrameType.START),
                                            rewrite=rewrite_start_batching), FAILED, "setup"),
    Case("setup-oversize-START-data", fault("oversize", At(S2D, FrameType.START),
                                            data_len=HUGE), FAILED, "setup"),
    Case("setup-close-HELLO", fault("close", At(S2D, FrameType.HELLO)), FAILED, "setup"),
    # bulk round
    Case("bulk-drop-PAGES", fault("drop", PAGES1), FAILED, alters=True),
    Case("bulk-duplicate-PAGES", fault("duplicate", PAGES1)),
    Case("bulk-reorder-PAGES", fault("reorder", PAGES1)),
    Case("bulk-delay-PAGES", fault("delay", PAGES1, seconds=DELAY), COMPLETED),
    Case("bulk-corrupt-PAGES", fault("corrupt_data", PAGES1), FAILED, alters=True),
    Case("bulk-meta-PAGES-pfn", fault("corrupt_meta", PAGES1, rewrite=pages_pfn), FAILED,
         alters=True),
    Case("bulk-meta-PAGES-count", fault("corrupt_meta", PAGES1, rewrite=pages_count), FAILED,
         alters=True),
    Case("bulk-meta-PAGES-bounds", fault("corrupt_meta", PAGES1, rewrite=pages_bounds), FAILED,
         alters=True),
    Case("bulk-oversize-PAGES-data", fault("oversize", PAGES1, data_len=HUGE), FAILED),
    Case("bulk-oversize-PAGES-meta", fault("oversize", PAGES1, meta_len=MAX_META), FAILED),
    Case("bulk-oversize-PAGES-meta-u32", fault("oversize", PAGES1, meta_len=(1 << 32) - 1),
         FAILED),
    Case("bulk-stall-PAGES", fault("stall", PAGES1, seconds=HOLD), FAILED),
    Case("bulk-close-PAGES", fault("close", PAGES1), FAILED),
    Case("bulk-drop-ACK", fault("drop", At(D2S, FrameType.ACK, 0)), COMPLETED),
    Case("bulk-duplicate-ACK", fault("duplicate", At(D2S, FrameType.ACK, 0)), COMPLETED),
    Case("bulk-meta-ACK-count", fault("corrupt_meta", At(D2S, FrameType.ACK, 1),
                                      rewrite=ack_count), FAILED),
    Case("bulk-page-meta-PAGES-pfn", fault("corrupt_meta", PAGES1, rewrite=pages_pfn), FAILED,
         batching=Batching.PAGE, alters=True),
    Case("bulk-sg-meta-PAGES-pfn", fault("corrupt_meta", PAGES1, rewrite=pages_pfn), FAILED,
         batching=Batching.SG, alters=True),
    Case("bulk-contig-corrupt-PAGES", fault("corrupt_data", PAGES1), FAILED,
         batching=Batching.CONTIG, alters=True),
    Case("bulk-page-duplicate-PAGES", fault("duplicate", PAGES1), batching=Batching.PAGE),
    # an iterative round
    Case("iter-drop-PAGES", fault("drop", ITER), FAILED, "iterative", alters=True),
    Case("iter-duplicate-PAGES", fault("duplicate", ITER), ANY, "iterative"),
    Case("iter-delay-PAGES", fault("delay", ITER, seconds=DELAY), COMPLETED, "iterative"),
    Case("iter-corrupt-PAGES", fault("corrupt_data", ITER), FAILED, "iterative", alters=True),
    Case("iter-meta-PAGES-pfn", fault("corrupt_meta", ITER, rewrite=pages_pfn), FAILED,
         "iterative", alters=True),
    Case("iter-stall-PAGES", fault("stall", ITER, seconds=HOLD), FAILED, "iterative"),
    Case("iter-close-PAGES", fault("close", ITER), FAILED, "iterative"),
    Case("iter-page-drop-PAGES", fault("drop", ITER), FAILED, "iterative",
         batching=Batching.PAGE, alters=True),
    # stop-and-copy: the guest is paused at the source
    Case("sc-drop-PAGES", fault("drop", LAST), FAILED, "stop-and-copy", alters=True),
    Case("sc-corrupt-PAGES", fault("corrupt_data", LAST), FAILED, "stop-and-copy",
         alters=True),
    Case("sc-meta-PAGES-pfn", fault("corrupt_meta", LAST, rewrite=pages_pfn), FAILED,
         "stop-and-copy", alters=True),
    Case("sc-drop-VMSA", fault("drop", VMSA0), FAILED, "stop-and-copy", alters=True),
    Case("sc-duplicate-VMSA", fault("duplicate", VMSA0), ANY, "stop-and-copy"),
    Case("sc-reorder-VMSA", fault("reorder", VMSA0), ANY, "stop-and-copy"),
    Case("sc-corrupt-VMSA", fault("corrupt_data", VMSA0), FAILED, "stop-and-copy",
         alters=True),
    Case("sc-meta-VMSA-pfn", fault("corrupt_meta", VMSA0, rewrite=vmsa_pfn), FAILED,
         "stop-and-copy", alters=True),
    Case("sc-oversize-VMSA-data", fault("oversize", VMSA0, data_len=HUGE), FAILED,
         "stop-and-copy"),
    Case("sc-stall-VMSA", fault("stall", VMSA0, seconds=HOLD), FAILED, "stop-and-copy"),
    Case("sc-close-VMSA", fault("close", VMSA0), FAILED, "stop-and-copy"),
    Case("sc-drop-PAGE_STATE", fault("drop", PSTATE), FAILED, "stop-and-copy", alters=True),
    Case("sc-meta-PAGE_STATE", fault("corrupt_meta", PSTATE, rewrite=page_state_flip), FAILED,
         "stop-and-copy", alters=True),
    Case("sc-delay-PAGE_STATE", fault("delay", PSTATE, seconds=DELAY), COMPLETED,
         "stop-and-copy"),
    # the end game
    Case("end-drop-FINISH", fault("drop", FINISH), FAILED, "end-game"),
    Case("end-duplicate-FINISH", fault("duplicate", FINISH), ANY, "end-game"),
    Case("end-corrupt-FINISH", fault("corrupt_data", FINISH), FAILED, "end-game",
         alters=True),
    Case("end-oversize-FINISH-data", fault("oversize", FINISH, data_len=HUGE), FAILED,
         "end-game"),
    Case("end-delay-FINISH", fault("delay", FINISH, seconds=DELAY), COMPLETED, "end-game"),
    Case("end-drop-CONFIRM", fault("drop", CONFIRM0), FAILED, "end-game"),
    Case("end-meta-CONFIRM-digest", fault("corrupt_meta", CONFIRM0,
                                          rewrite=json_field("digest", flip_hex)),
         FAILED, "end-game"),
    Case("end-delay-CONFIRM", fault("delay", CONFIRM0, seconds=DELAY), COMPLETED, "end-game"),
    Case("end-duplicate-CONFIRM", fault("duplicate", CONFIRM0), ANY, "end-game"),
    Case("end-stall-CONFIRM", fault("stall", CONFIRM0, seconds=HOLD + 3), ANY, "end-game"),
    Case("end-close-CONFIRM", fault("close", CONFIRM0), FAILED, "end-game"),
    Case("end-drop-RELEASED", fault("drop", RELEASED), ANY, "end-game"),
    Case("end-close-RELEASED", fault("close", RELEASED), ANY, "end-game"),
    Case("end-delay-RELEASED", fault("delay", RELEASED, seconds=DELAY), COMPLETED, "end-game"),
    Case("end-drop-HEARTBEAT", fault("drop", At(S2D, FrameType.HEARTBEAT, 0)), ANY,
         "end-game"),
    Case("end-drop-OWNED", fault("drop", At(D2S, FrameType.OWNED, 0)), ANY, "end-game"),
    # the destination's first renewal, asked as its vCPUs start: the source measures its
    # own copy only after it (a lost one is stood in for by the next, a second later)
    Case("end-drop-renewal", fault("drop", RENEWAL), COMPLETED, "end-game"),
    Case("end-delay-renewal", fault("delay", RENEWAL, seconds=DELAY), COMPLETED, "end-game"),
    Case("end-stall-renewal", fault("stall", RENEWAL, seconds=HOLD), ANY, "end-game"),
    Case("end-drop-CONFIRM2", fault("drop", CONFIRM1), COMPLETED, "end-game"),
    Case("end-stall-CONFIRM2", fault("stall", CONFIRM1, seconds=HOLD), COMPLETED, "end-game"),
]


# -- running a case through the API ----------------------------------------------------------


@dataclass
class Run:
    """One case's parts and what happened."""

    case: Case
    vm: SourceVM
    dest: Dest
    proxy: FrameProxy | None = None
    kind: str = ""  # completed | failed
    error: str = ""
    outcome: Outcome | None = None
    t_end: float = 0.0
    killed: set[int] = field(default_factory=set)  # pids of processes a fault killed
    hold: SourceHold | None = None  # in doubt: the source's paused copy


@pytest.fixture(scope="module")
def src_host() -> Iterator[Host]:
    with Host("source") as h:
        yield h


def boot(host: Host, workload: str) -> SourceVM:
    cfg = GuestConfig(memory=MEMORY, vcpus=2, workload=parse_workload(workload))
    return SourceVM.boot(host, cfg, ES)


def run_api(host: Host, case: Case, make: Make | None = None) -> Run:
    """Migrate through the proxy with the case's fault; check everything; clean up."""
    left = Leftovers()
    vm = boot(host, case.workload)
    dest: Dest | None = None
    proxy: FrameProxy | None = None
    try:
        dest = SPARE.take()
        left.note(children_of(dest.pid))
        run = Run(case, vm, dest)
        proxy = FrameProxy(dest.target, (make or case.make)(run))
        run.proxy = proxy
        cut: list[float] = []

        def cut_off() -> None:
            cut.append(time.monotonic())
            proxy.close()

        watchdog = threading.Timer(WATCHDOG_S, cut_off)  # a hung migration is cut, not waited on
        watchdog.start()
        kinds: set[str] = set()

        def observe(event: str, p: Progress) -> None:
            if event == "chunk":
                kinds.add(p.rounds[-1].kind)

        try:
            run.outcome = migrate_out(vm, proxy.uri, case.params(), observe,
                                      io_timeout=IO_TIMEOUT, connect_timeout=5,
                                      resolve_window_s=RESOLVE_WINDOW)
            run.kind = COMPLETED
        except MigrationFailed as e:
            run.kind, run.error = FAILED, str(e)
        except MigrationInDoubt as e:
            run.kind, run.error, run.hold = IN_DOUBT, str(e), e.hold
        finally:
            run.t_end = time.monotonic()
            watchdog.cancel()
        assert not cut, (
            f"the migration had not ended {WATCHDOG_S:g} s into the case ({proxy.fault}): "
            f"the proxy cut it, then it ended {run.kind} {run.error}")
        if case.phase == "iterative":  # the first page sent twice was an iterative round's
            assert "iterative" in kinds, f"no iterative round (rounds: {sorted(kinds)})"
        check_api(run)
        return run
    finally:
        SPARE.start()  # the next case's destination starts while this one ends
        descendants = children_of(dest.pid) if dest is not None else set()
        vm.shutdown()
        if proxy is not None:
            proxy.close()
        if dest is not None:
            dest.close()
            assert_gone(descendants, "destination's children")
            left.assert_clean({os.getpid(), dest.pid, *descendants})


def check_api(run: Run) -> None:
    case, proxy, dest, vm = run.case, run.proxy, run.dest, run.vm
    assert proxy is not None
    assert proxy.fired.is_set(), f"the fault ({proxy.fault}) was never injected"
    assert proxy.fired_at is not None
    got_guest = any(f.fault not in ("drop", "close", "stall")
                    for f in proxy.frames(S2D, "START"))
    if run.kind == IN_DOUBT:  # a destination holding the guest in doubt goes on running
        in_doubt_by = proxy.fired_at + DETECT_AFTER_PAUSE
        while not dest.said("in-doubt") and dest.p.proc.poll() is None and \
                time.monotonic() < in_doubt_by:
            time.sleep(0.05)  # polling its announcements, with a deadline
    code = dest.wait_exit(run.t_end + (SETTLE if got_guest and run.kind != IN_DOUBT else 0.0))
    last = dest.last()
    resumed = proxy.may_have_resumed()
    if run.kind == FAILED:
        # never lost: the source has it, running, intact, and said why it failed
        assert_clear(run.error, "source")
        assert_runs_intact(vm)
        bound = DETECT if case.phase in ("setup", "bulk", "iterative") else DETECT_AFTER_PAUSE
        assert run.t_end - proxy.fired_at <= bound, (
            f"the source noticed after {run.t_end - proxy.fired_at:.1f} s: {run.error}")
        # never twice: the destination discarded its copy, no later than the source resumed
        # (if it may have resumed its own: it confirmed, and the source's answer reached it)
        if not run.killed and not got_guest:
            # no guest ever reached it: it may go on waiting for one, but must not run one
            assert not (last and last[1]["event"] == "migrated"), f"destination: {last}"
        elif not run.killed:
            assert code is not None, (
                f"the destination still runs {SETTLE:g} s after the source took the guest "
                f"back (its last word: {last})")
            assert last is not None and last[1]["event"] == "failed", (
                f"source failed ({run.error}) but the destination says {last}, exit {code}")
            assert code != 0, "the destination discarded the guest but exited 0"
            assert_clear(str(last[1].get("error", "")), "destination")
            if resumed:
                late = last[0] - run.t_end
                assert late <= TWICE_GRACE, (
                    f"the destination ran the guest {late:.1f} s after the source had taken "
                    f"it back")
    elif run.kind == IN_DOUBT:
        # the source released the guest and could not hear the destination take it: it
        # holds its own copy paused and unfinished (never resumed on its own: that could
        # run it twice); the destination holds it (paused, in doubt) or runs it, or is
        # dead, and then the source's copy is the one left
        assert_clear(run.error, "source")
        hold = run.hold
        assert hold is not None and vm.alive, "the source gave up its copy while in doubt"
        assert vm.guest.paused, "the source resumed its copy on its own while in doubt"
        assert vm.psp_state() is GuestState.SUPDATE, "the source's copy was finished"
        holds = code is None and dest.said("in-doubt")
        runs = last is not None and last[1]["event"] == "migrated" and \
            last[1].get("report", {}).get("check", {}).get("ok") is True
        if holds or runs:
            hold.release()  # the operator's call: the destination has it
            assert_released(vm)
        else:
            assert dest.pid in run.killed, (
                f"the destination neither holds the guest in doubt nor runs it, yet was not "
                f"killed (exit {code}, last word {last})")
            hold.keep()  # the operator's call: its host is gone, the source's copy runs
            assert_runs_intact(vm)
    else:
        # never lost, never twice: the destination runs it and the source released it
        out = run.outcome
        assert out is not None
        assert_released(vm)
        assert last is not None and last[1]["event"] == "migrated", (
            f"the source reports completed and released its guest, but the destination "
            f"does not run it (last word {last}, exit {code}): lost")
        assert code == 0, f"destination exit {code} after running the guest"
        # never stale: the digests agree and the workload checked itself at the destination
        assert out.confirm.get("digest") == out.source_digest, "digests differ"
        check = last[1].get("report", {}).get("check", {})
        assert check.get("ok") is True, f"workload check at the destination: {check}"
    if case.alters:
        claims = proxy.confirms(after=proxy.fired_at)
        assert not claims, (
            "the destination accepted a stream altered in transit and confirmed it runs, "
            f"or is about to run, the guest ({proxy.fault})")
    if case.expect != ANY:
        assert run.kind == case.expect, (
            f"expected {case.expect} under {proxy.fault}, got {run.kind} {run.error}")


def _params(cases: list[Case]) -> list[Any]:
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)]
                         if c.xfail else []) for c in cases]


@pytest.mark.parametrize("case", _params(CASES))
def test_frame_fault(src_host: Host, case: Case) -> None:
    run_api(src_host, case)


# -- kill -9 of the destination (source through the API) -------------------------------------


def kill_dest(where: Where, forward: bool = False) -> Make:
    def make(run: Run) -> Fault:
        def act() -> None:
            run.killed.add(run.dest.pid)
            os.kill(run.dest.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.dest.p.proc.wait(5)  # dead before the frame goes on (or not)

        return Fault("call", where, action=act, forward=forward)

    return make


KILL_DEST = [
    Case("kill-dest-bulk", kill_dest(PAGES1), FAILED),
    Case("kill-dest-iterative", kill_dest(ITER), FAILED, "iterative"),
    Case("kill-dest-stop-and-copy", kill_dest(VMSA0), FAILED, "stop-and-copy"),
    Case("kill-dest-at-FINISH", kill_dest(FINISH), FAILED, "end-game"),
    Case("kill-dest-after-CONFIRM", kill_dest(CONFIRM0, forward=True), ANY, "end-game"),
    Case("kill-dest-at-RELEASED", kill_dest(RELEASED), IN_DOUBT, "end-game"),
]


@pytest.mark.parametrize("case", _params(KILL_DEST))
def test_kill_destination(src_host: Host, case: Case) -> None:
    run_api(src_host, case)


# -- the source as the CLI: kill -9, and its own timeouts ------------------------------------


class Cli:
    """`python -m cvmig migrate --to URI` with a small guest."""

    def __init__(self, uri: str, phase: str) -> None:
        cmd = [sys.executable, "-m", "cvmig", "migrate", "--to", uri, "-m", "16M",
               "--vcpus", "2", "--quiet", "--warmup", "0.2", "--timeout", "30"]
        if phase == "iterative":
            cmd += ["-w", DIRTY, "--downtime-limit", "1", "--max-rounds", "1"]
        else:
            cmd += ["-w", LIGHT]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.pid = self.proc.pid
        self.out = ""
        self.err = ""

    def wait(self, timeout: float) -> int | None:
        try:
            self.out, self.err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.communicate(timeout=10)


@dataclass(frozen=True)
class CliCase:
    id: str
    where: Where
    phase: str
    kill_source: bool = True
    forward: bool = False
    xfail: str | None = None


KILL_SOURCE = [
    CliCase("kill-source-bulk", PAGES1, "bulk"),
    CliCase("kill-source-iterative", ITER, "iterative"),
    CliCase("kill-source-stop-and-copy", VMSA0, "stop-and-copy"),
    CliCase("kill-source-at-FINISH", FINISH, "end-game"),
    CliCase("kill-source-after-CONFIRM", CONFIRM0, "end-game"),
    CliCase("kill-source-at-RELEASED", RELEASED, "end-game"),
]


def _cli_params(cases: list[CliCase]) -> list[Any]:
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)]
                         if c.xfail else []) for c in cases]


@pytest.mark.parametrize("case", _cli_params(KILL_SOURCE))
def test_kill_source(case: CliCase) -> None:
    """kill -9 of the source CLI at a frame: its guest dies with it (a host crash), its
    children go, nothing stays behind; the destination discards a copy it cannot run, and
    keeps one it already runs when that is the only one left."""
    left = Leftovers()
    dest = Dest()
    left.note(children_of(dest.pid))
    cli: Cli | None = None
    proxy: FrameProxy | None = None
    killed: set[int] = set()
    try:
        holder: list[Cli] = []

        def act() -> None:
            pid = holder[0].pid
            killed.update(left.note(children_of(pid)) | {pid})
            os.kill(pid, signal.SIGKILL)

        proxy = FrameProxy(dest.target, Fault("call", case.where, action=act,
                                              forward=case.forward))
        cli = Cli(proxy.uri, case.phase)
        holder.append(cli)
        code = cli.wait(60)
        assert proxy.fired.is_set(), f"never reached {case.where} (exit {code}): {cli.err}"
        assert code == -signal.SIGKILL
        assert proxy.fired_at is not None
        assert_gone(killed - {cli.pid}, "the killed source's children")
        resumed = proxy.may_have_resumed()
        deadline = proxy.fired_at + SETTLE
        while not dest.said("in-doubt") and dest.p.proc.poll() is None and \
                time.monotonic() < deadline:
            time.sleep(0.05)  # polling its announcements, with a deadline
        dcode = dest.wait_exit(deadline if not dest.said("in-doubt") else 0.0)
        last = dest.last()
        holds = dcode is None and dest.said("in-doubt")
        if holds:
            # it holds its copy paused and says so: an operator decides (cvmig resolve)
            word = next(e[1] for e in dest.events if e[1].get("event") == "in-doubt")
            assert_clear(str(word.get("message", "")), "destination in doubt")
        elif resumed:
            # the destination runs the only copy left: it must not discard it, but hold it
            # in doubt (above) or say it runs it
            assert not (last and last[1]["event"] == "failed"), (
                f"the destination discarded the only running copy: {last}")
            assert last is not None and last[1]["event"] == "migrated", (
                f"the destination (exit {dcode}) says nothing of the guest it ran: {last}")
        else:
            assert dcode is not None and dcode != 0, f"destination: exit {dcode}, {last}"
            assert last is not None and last[1]["event"] == "failed", f"destination: {last}"
            assert_clear(str(last[1].get("error", "")), "destination")
    finally:
        descendants = children_of(dest.pid)
        if cli is not None:
            cli.close()
        if proxy is not None:
            proxy.close()
        dest.close()
        assert_gone(descendants, "destination's children")
        assert_gone(killed, "the killed source's processes")
        left.assert_clean({dest.pid, *descendants, *killed})


def test_cli_failure_is_one_clear_line_and_exit_1() -> None:
    """A dropped VMSA (the guest paused at the source): exit 1, one line saying why, the
    promise that the guest kept running, no traceback; the destination discards."""
    left = Leftovers()
    dest = Dest()
    left.note(children_of(dest.pid))
    proxy = FrameProxy(dest.target, Fault("drop", VMSA0))
    cli = Cli(proxy.uri, "stop-and-copy")
    try:
        wait_host_dirs(left, cli.pid)
        code = cli.wait(60)
        assert proxy.fired.is_set()
        assert code == 1, f"exit {code}: {cli.err}"
        lines = [ln for ln in cli.err.splitlines() if ln.strip()]
        assert lines and lines[0].startswith("migration failed: "), cli.err
        assert any("kept running on the source" in ln for ln in lines), cli.err
        assert len(lines) <= 2, f"more than a reason and a promise: {cli.err!r}"
        assert_clear(lines[0], "source CLI")
        dcode = dest.wait_exit(time.monotonic() + SETTLE)
        last = dest.last()
        assert dcode == 1 and last is not None and last[1]["event"] == "failed", last
        assert_clear(str(last[1].get("error", "")), "destination")
    finally:
        descendants = children_of(dest.pid)
        cli.close()
        proxy.close()
        dest.close()
        assert_gone(descendants, "destination's children")
        left.assert_clean({dest.pid, cli.pid, *descendants})


SILENT_PEER_S = 5.0  # issue 10: a silent peer is noticed within 5 s in stop-and-copy
GIVE_BACK_S = DETECT_AFTER_PAUSE  # a stall after the pause: the guest resumes at the source


def test_cli_stall_after_pause_gives_the_guest_back_soon() -> None:
    left = Leftovers()
    dest = Dest()
    left.note(children_of(dest.pid))
    proxy = FrameProxy(dest.target, Fault("stall", VMSA0, seconds=None))
    cli = Cli(proxy.uri, "stop-and-copy")
    try:
        wait_host_dirs(left, cli.pid)
        assert proxy.fired.wait(30), "never reached the VMSA"
        code = cli.wait(GIVE_BACK_S + 3)
        assert code == 1, f"source CLI still waiting {GIVE_BACK_S + 3:g} s into a stall"
        assert "kept running on the source" in cli.err
    finally:
        descendants = children_of(dest.pid) | children_of(cli.pid)
        cli.close()
        proxy.close()
        dest.close()
        assert_gone(descendants, "children")
        left.assert_clean({dest.pid, cli.pid, *descendants})


def test_destination_notices_a_silent_source_soon(src_host: Host) -> None:
    """The link stalls for good at the page-state map, the VMSAs delivered (the guest is
    paused at the source): the source takes its guest back; the destination must give up
    its half within 5 s on its own."""
    case = Case("dest-silent-source", fault("stall", PSTATE, seconds=None), FAILED,
                "stop-and-copy")
    left = Leftovers()
    vm = boot(src_host, case.workload)
    dest = Dest()
    left.note(children_of(dest.pid))
    proxy = FrameProxy(dest.target, case.make(Run(case, vm, dest)))
    try:
        with pytest.raises(MigrationFailed):
            migrate_out(vm, proxy.uri, case.params(), io_timeout=IO_TIMEOUT, connect_timeout=5,
                        resolve_window_s=RESOLVE_WINDOW)
        assert_runs_intact(vm)
        assert proxy.fired_at is not None
        code = dest.wait_exit(proxy.fired_at + SILENT_PEER_S + 2)
        assert code is not None, "the destination still waits on a silent source"
    finally:
        descendants = children_of(dest.pid)
        vm.shutdown()
        proxy.close()
        dest.close()
        assert_gone(descendants, "destination's children")
        left.assert_clean({os.getpid(), dest.pid, *descendants})


def test_proxy_passes_a_clean_migration(src_host: Host) -> None:
    """The proxy itself alters nothing: with no fault the migration completes, and it saw
    the whole protocol in both directions."""
    vm = boot(src_host, LIGHT)
    dest = Dest()
    proxy = FrameProxy(dest.target, None)
    try:
        # the leftover checks find a host's directory this way: keep them meaningful
        assert host_dirs(children_of(dest.pid)), "no host directory found for the destination"
        out = migrate_out(vm, proxy.uri, MigrationParams(batching=Batching.AEAD),
                          io_timeout=IO_TIMEOUT, connect_timeout=5)
        assert out.confirm.get("digest") == out.source_digest
        assert dest.wait_exit(time.monotonic() + SETTLE) == 0
        names = {(s.direction, s.name) for s in proxy.log}
        for t in ("HELLO", "START", "PAGES", "VMSA", "PAGE_STATE", "FINISH", "RELEASED"):
            assert (S2D, t) in names, t
        for t in ("HELLO", "CERTS", "ACK", "CONFIRM"):
            assert (D2S, t) in names, t
        assert proxy.confirms() and proxy.may_have_resumed()
        # the destination asks its first renewal as soon as the grant starts its vCPUs,
        # not on its once-a-second schedule: the source's measuring waits for it
        asks = proxy.frames(D2S, "HEARTBEAT")
        assert asks, "the destination asked no renewal once it ran the guest"
        grant = proxy.frames(S2D, "HEARTBEAT")[0]
        assert asks[0].t - grant.t < LEASE_REQUEST_S / 2, asks[0].t - grant.t
    finally:
        vm.shutdown()
        proxy.close()
        dest.close()
