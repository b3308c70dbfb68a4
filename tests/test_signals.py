"""Signals and kills: Ctrl-C and SIGTERM cancel a running `cvmig migrate` cleanly; a
killed CLI, destination, vCPU or secure processor leaves no process and no name behind.

Each case starts a real migration (a 32 MiB guest, the link limited to 2 MB/s so that it
is still in progress when the signal comes), waits until the destination is receiving
(its vCPUs have the guest's memory mapped), and then signals or kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.proctree import (
    attached_vcpus,
    cmdline,
    descendants,
    finish_within,
    leftovers,
    wait_for,
    wait_gone,
)

MIGRATE = [sys.executable, "-m", "cvmig", "migrate", "-m", "32M", "--vcpus", "1",
           "-w", "dirtier:rate=500", "--max-bandwidth", "2M", "--timeout", "0",
           "--warmup", "0.1", "-q"]


def _is_destination(cmd: str) -> bool:
    return " vm --incoming" in cmd


def _start() -> tuple[subprocess.Popen[str], dict[int, str]]:
    """A migration in progress: the CLI (its own process group, as a shell starts a
    foreground job) and, once the destination receives, its whole process tree."""
    proc = subprocess.Popen(MIGRATE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    tree: dict[int, str] = {}

    def receiving() -> bool:
        nonlocal tree
        if proc.poll() is not None:
            return True
        tree = descendants(proc.pid)
        dests = [p for p, c in tree.items() if _is_destination(c)]
        return bool(set(attached_vcpus(dests[0])) & set(tree)) if dests else False

    try:
        assert wait_for(receiving, 60.0), "the migration did not start within 60 s"
        assert proc.poll() is None, f"cvmig migrate ended early: {proc.communicate()}"
        tree = descendants(proc.pid)
        kinds = " ".join(tree.values())
        assert "cvmig.psp.process" in kinds and "cvmig.guest.vcpu" in kinds, tree
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc, tree


def _assert_clean(tree: dict[int, str], owners: list[int]) -> None:
    stuck = wait_gone(tree, 10.0)
    assert not stuck, f"still alive: {[(p, cmdline(p)) for p in stuck]}"
    left = leftovers(owners + list(tree))
    assert not left, f"left behind: {left}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_to_the_process_group_cancels_cleanly(sig: signal.Signals) -> None:
    proc, tree = _start()
    t0 = time.monotonic()
    os.killpg(proc.pid, sig)  # what a terminal does with Ctrl-C: the whole foreground group
    code, _, err = finish_within(proc, 30.0)
    took = time.monotonic() - t0
    assert code == 128 + sig, err
    assert f"migration cancelled ({sig.name})" in err, err
    assert "guest kept running on the source" in err, err
    assert "Traceback" not in err, err
    # the children were in sessions of their own: the group's signal did not reach them,
    # they ended because the CLI ended them (the PSP answered the roll-back's commands)
    _assert_clean(tree, [proc.pid])
    assert took < 15.0, f"cancelling took {took:.1f} s"


VICTIMS = {
    "cli": lambda pid, tree: pid,
    "destination": lambda pid, tree: _find(tree, _is_destination),
    "source-psp": lambda pid, tree: _child_of(tree, pid, "cvmig.psp.process"),
    "source-vcpu": lambda pid, tree: _child_of(tree, pid, "cvmig.guest.vcpu"),
    "destination-psp": lambda pid, tree: _child_of(tree, _find(tree, _is_destination),
                                                   "cvmig.psp.process"),
    "destination-vcpu": lambda pid, tree: _child_of(tree, _find(tree, _is_destination),
                                                    "cvmig.guest.vcpu"),
}


def _find(tree: dict[int, str], pred: object) -> int:
    hits = [p for p, c in tree.items() if pred(c)]  # type: ignore[operator]
    assert hits, tree
    return hits[0]


def _child_of(tree: dict[int, str], parent: int, what: str) -> int:
    kids = descendants(parent)
    hits = [p for p, c in kids.items() if what in c and p in tree]
    assert hits, (parent, kids)
    return hits[0]


@pytest.mark.parametrize("victim", list(VICTIMS))
def test_kill_9_leaves_nothing_behind(victim: str) -> None:
    proc, tree = _start()
    pid = VICTIMS[victim](proc.pid, tree)
    os.kill(pid, signal.SIGKILL)
    if victim == "cli":
        proc.wait(5.0)
        # its PSP, vCPUs and destination (with the destination's own) see it die
        stuck = wait_gone(tree, 10.0)
        assert not stuck, f"still alive: {[(p, cmdline(p)) for p in stuck]}"
        proc.communicate()
    else:
        code, _, err = finish_within(proc, 60.0)
        assert code != 0, err
        assert "Traceback" not in err, err
    _assert_clean(tree, [proc.pid])


def test_ctrl_c_before_the_migration_starts_ends_at_once() -> None:
    """Ctrl-C while the guest warms up, the destination up and listening but not yet
    connected to: the CLI ends, and the destination with it, without waiting for a last
    word from a destination that never heard from it."""
    proc = subprocess.Popen([*MIGRATE, "--warmup", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    tree: dict[int, str] = {}

    def listening() -> bool:
        nonlocal tree
        tree = descendants(proc.pid)
        return proc.poll() is not None or any(_is_destination(c) for c in tree.values())

    try:
        assert wait_for(listening, 60.0) and proc.poll() is None, proc.communicate()
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        code, _, err = finish_within(proc, 30.0)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 130, err
    assert "guest kept running on the source" in err, err
    assert "Traceback" not in err, err
    assert took < 10.0, f"cancelling took {took:.1f} s"
    _assert_clean(descendants(proc.pid) | tree, [proc.pid])
