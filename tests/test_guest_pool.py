"""vCPU processes started ahead of their guest (cvmig.guest.pool): a destination's guest
runs on the pooled processes, a pooled process that died is passed over, the start the
pool paid is not the guest's CPU time, and a pool ends with its host, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from cvmig.guest.memory import GuestMemory
from cvmig.guest.pool import VcpuPool
from cvmig.guest.vm import Guest, GuestConfig, _cpu_seconds
from cvmig.guest.workloads import parse_workload
from cvmig.psp.api import Policy
from tests.conftest import Psp
from tests.proctree import alive, cmdline, wait_for, wait_gone

MiB = 1 << 20
POLICY = int(Policy.NODBG | Policy.ES)


@pytest.fixture
def pool() -> Iterator[VcpuPool]:
    p = VcpuPool()
    yield p
    p.close()


@contextmanager
def _moved(psp: Psp, pool: VcpuPool, vcpus: int = 2) -> Iterator[tuple[list[int], Guest, Guest]]:
    """Boot a dirtier guest, pause it, and start a second guest over a copy of its memory
    the way a destination does (prepare while the pages arrive, then restore) on ``pool``:
    the second guest's vCPU pids, the first guest and the second."""
    sock, client = psp
    cfg = GuestConfig(memory=16 * MiB, vcpus=vcpus,
                      workload=parse_workload("dirtier:pattern=uniform"), tracker="dmap")
    with GuestMemory.create(cfg.memory) as mem, GuestMemory.create(cfg.memory) as mem2:
        region = client.map_region(mem.name, mem.size)
        handle = client.launch(region, mem.npages, POLICY)
        g = Guest(cfg, mem, sock, handle)
        g2 = Guest(cfg, mem2, sock, handle, pool=pool)
        try:
            g.boot()
            assert wait_for(lambda: sum(s.ops for s in g.stats()) >= 500, timeout=20.0)
            g.pause()
            g2.prepare()
            mem2.pages[:] = mem.pages
            mem2.page_state[:] = mem.page_state
            g2.restore()
            yield [s.pid for s in g2.stats()], g, g2
        finally:
            g2.shutdown()
            g.shutdown()
            client.decommission(handle)
            client.unmap_region(region)


def test_a_destination_guest_runs_on_the_pooled_processes(psp: Psp, pool: VcpuPool) -> None:
    pool.fill(2)
    warm = sorted(v.proc.pid for v in pool._warm)
    assert len(warm) == 2 and all("cvmig.guest.vcpu" in cmdline(p) for p in warm)
    with _moved(psp, pool) as (pids, g, g2):
        assert sorted(pids) == warm  # no process started for it
        assert len(pool) == 0
        assert g2.digest() == g.digest() and g2.check()["ok"]
        before = sum(s.ops for s in g2.stats())
        g2.resume()
        assert wait_for(lambda: sum(s.ops for s in g2.stats()) > before + 200, timeout=20.0)
        g2.pause()
        assert g2.check()["ok"]
    assert wait_gone(warm, 10.0) == []


def test_a_pooled_process_that_died_is_passed_over(psp: Psp, pool: VcpuPool) -> None:
    """Killed while it waited (an OOM kill, an operator): the guest takes the live one and
    starts what is missing; the dead one is reaped, not handed a spec."""
    pool.fill(2)
    dead, live = (v.proc.pid for v in pool._warm)
    os.kill(dead, signal.SIGKILL)
    assert wait_for(lambda: not alive(dead), 10.0)
    with _moved(psp, pool) as (pids, g, g2):
        assert live in pids and dead not in pids and len(set(pids)) == 2
        assert g2.digest() == g.digest()


def test_more_vcpus_than_pooled_start_the_rest(psp: Psp, pool: VcpuPool) -> None:
    pool.fill(1)
    (warm,) = (v.proc.pid for v in pool._warm)
    with _moved(psp, pool, vcpus=3) as (pids, _, g2):
        assert warm in pids and len(set(pids)) == 3
        assert g2.check()["ok"]


def test_the_pooled_start_is_not_the_guests_cpu_time(psp: Psp, pool: VcpuPool) -> None:
    """A destination reports what readying itself cost during the migration (the model's
    start contention): the interpreter start the pool paid before is not part of it."""
    pool.fill(2)
    paid = sum(_cpu_seconds(v.proc.pid) or 0.0 for v in pool._warm)
    assert paid > 0.1  # an interpreter and numpy, cryptography, ...: not free
    with _moved(psp, pool) as (pids, _, g2):
        total = sum(_cpu_seconds(p) or 0.0 for p in pids)
        assert g2.cpu_seconds() == pytest.approx(total - paid, abs=0.05)
        assert g2.cpu_seconds() < total - 0.05


def test_close_ends_the_pooled_processes(pool: VcpuPool) -> None:
    pool.fill(2)
    pids = [v.proc.pid for v in pool._warm]
    pool.close()
    assert wait_gone(pids, 10.0) == []
    with pytest.raises(RuntimeError, match="closed"):
        pool.fill(1)


def test_pooled_processes_end_with_a_host_killed_outright() -> None:
    """kill -9 of the process that pooled them: they read end of file and exit, with no
    guest memory or name of theirs to leave behind."""
    code = ("import sys; from cvmig.guest.pool import VcpuPool; p = VcpuPool(); p.fill(2); "
            "print(*(v.proc.pid for v in p._warm), flush=True); sys.stdin.read()")
    host = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None
        pids = [int(x) for x in host.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        host.kill()
        host.wait(10.0)
        assert wait_gone(pids, 10.0) == []
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
