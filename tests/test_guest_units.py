"""Guest pieces that need no vCPU process: specs, config validation, page format, the
dirty-tracking primitives, guest memory and the CLI's input checks."""

from __future__ import annotations

import mmap
import os
import re

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmig.guest import uffd
from cvmig.guest.cli import guest as guest_cli
from cvmig.guest.cli import parse_size, parse_throttle
from cvmig.guest.memory import PRIVATE, SHARED, GuestMemory
from cvmig.guest.vm import GuestConfig
from cvmig.guest.workloads import (
    MAGIC_PRIVATE,
    WorkloadSpec,
    bad_pages,
    make_pages,
    parse_workload,
    with_params,
)

MiB = 1 << 20


# --------------------------------------------------------------------------- specs


def test_parse_examples() -> None:
    s = parse_workload("dirtier:rate=20000,pattern=hotcold,hot=0.1,skew=0.9")
    assert s.kind == "dirtier"
    assert s.get("rate") == 20000 and s.get("pattern") == "hotcold"
    assert s.get("hot") == 0.1 and s.get("skew") == 0.9
    assert parse_workload("dirtier:pattern=sequential").get("pattern") == "sequential"
    assert parse_workload("sqlite:accounts=1000").get("accounts") == 1000
    assert parse_workload("idle") == WorkloadSpec("idle")
    assert parse_workload("dirtier:rate=max").get("rate") == 0
    assert parse_workload("dirtier:rate=20k").get("rate") == 20000


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("busy", ["busy", "idle, dirtier, sqlite"]),
        ("dirtier:speed=3", ["speed", "rate, pattern"]),
        ("dirtier:pattern=zigzag", ["zigzag", "uniform, hotcold, sequential"]),
        ("dirtier:rate=-5", ["rate", "positive"]),
        ("dirtier:rate=fast", ["rate", "not a number"]),
        ("dirtier:pattern=hotcold,hot=1.5", ["hot", "(0, 1)"]),
        ("dirtier:pattern=hotcold,skew=2", ["skew", "[0, 1]"]),
        ("dirtier:hot=0.2", ["hot", "pattern=hotcold"]),
        ("dirtier:rate=1,rate=2", ["rate", "twice"]),
        ("dirtier:rate", ["rate", "needs a value"]),
        ("sqlite:accounts=2.5", ["accounts", "integer"]),
        ("idle:x=1", ["x", "none"]),
    ],
)
def test_parse_errors_name_the_problem(text: str, names: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        parse_workload(text)
    for n in names:
        assert n in str(e.value), (n, str(e.value))


@settings(max_examples=60, deadline=None)
@given(
    pattern=st.sampled_from(["uniform", "hotcold", "sequential"]),
    rate=st.one_of(st.just("max"), st.integers(1, 10**7).map(str)),
    hot=st.floats(0.01, 0.99),
    skew=st.floats(0.0, 1.0),
    ws=st.floats(0.01, 1.0),
)
def test_spec_round_trips(pattern: str, rate: str, hot: float, skew: float, ws: float) -> None:
    text = f"dirtier:rate={rate},pattern={pattern},ws={ws!r}"
    if pattern == "hotcold":
        text += f",hot={hot!r},skew={skew!r}"
    spec = parse_workload(text)
    assert parse_workload(str(spec)) == spec
    assert with_params(spec) == spec


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"memory": 64 * MiB + 1}, "multiple of 4096"),
        ({"memory": 8 * MiB}, "at least 16 MiB"),
        ({"memory": 1 << 50}, "exceeds what this machine has"),
        ({"memory": 64 * MiB, "vcpus": 0}, "vcpus"),
        ({"memory": 64 * MiB, "tracker": "softdirty"}, "auto, uffd, dmap"),
        ({"memory": 16 * MiB, "vcpus": 64}, "RAM pages"),
        ({"memory": 16 * MiB, "workload": parse_workload("sqlite:accounts=1000000")}, "add memory"),
        ({"memory": 64 * MiB, "shared_pages": -1}, "shared_pages"),
    ],
)
def test_config_validate(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        GuestConfig(**kwargs).validate()


def test_config_default_ok() -> None:
    GuestConfig(memory=16 * MiB).validate()


# --------------------------------------------------------------------------- page format


def test_page_format_detects_torn_misplaced_stale() -> None:
    n = 8
    pfns = np.arange(100, 100 + n, dtype=np.int64)
    ver = np.arange(1, n + 1, dtype=np.int64) * 7
    pages = np.empty((n, 4096), dtype=np.uint8)
    make_pages(MAGIC_PRIVATE, pfns, ver, 0, pages)
    assert not bad_pages(MAGIC_PRIVATE, pfns, ver, 0, pages).any()
    other = np.empty_like(pages)
    make_pages(MAGIC_PRIVATE, pfns, ver + 1, 0, other)
    torn = pages.copy()
    torn[1, 2048:] = other[1, 2048:]  # second half of a newer write
    torn[2] = pages[3]  # a page at the wrong address
    torn[4, 4000] ^= 1  # one flipped bit
    bad = bad_pages(MAGIC_PRIVATE, pfns, ver, 0, torn)
    assert bad.tolist() == [False, True, True, False, True, False, False, False]
    # stale: the page holds an older version than the replay says it must
    assert bad_pages(MAGIC_PRIVATE, pfns, ver + 1, 0, pages).all()
    # version 0 = never written = all zero
    assert not bad_pages(MAGIC_PRIVATE, pfns, np.zeros(n, np.int64), 0, np.zeros_like(pages)).any()


# --------------------------------------------------------------------------- memory


def test_guest_memory_create_attach() -> None:
    with GuestMemory.create(16 * MiB) as mem:
        assert mem.npages == 4096 and mem.size == 16 * MiB
        assert mem.pages.shape == (4096, 4096) and mem.page_state.shape == (4096,)
        assert (mem.page_state == PRIVATE).all()
        assert os.path.exists(f"/dev/shm/{mem.name}")
        other = GuestMemory.attach(mem.name, mem.npages)
        mem.pages[7, 3] = 42
        mem.page_state[9] = SHARED
        assert other.pages[7, 3] == 42 and other.page_state[9] == SHARED
        other.close()
    assert not os.path.exists(f"/dev/shm/{mem.name}")


def test_guest_memory_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        GuestMemory.create(16 * MiB + 100)


# --------------------------------------------------------------------------- uffd primitives


@pytest.mark.skipif(uffd.probe() is not None, reason="userfaultfd WP_ASYNC unavailable")
@settings(max_examples=20, deadline=None)
@given(writes=st.lists(st.lists(st.integers(0, 1023), max_size=64), min_size=1, max_size=5))
def test_uffd_get_and_clear_is_exact(writes: list[list[int]]) -> None:
    """In one process: every round reports exactly the pages written since the last one."""
    mm = mmap.mmap(-1, 1024 * 4096, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    buf = np.frombuffer(mm, dtype=np.uint8).reshape(1024, 4096)
    w = uffd.UffdWriter(buf.ctypes.data, buf.nbytes)
    s = uffd.PagemapScanner(os.getpid(), buf.ctypes.data, buf.nbytes, vec_len=4)  # small: loops
    try:
        assert len(s.scan()) == 1024  # everything reports written until the first clear
        for round_ in writes:
            _ = buf[::7, 0].sum()  # reads never mark
            buf[round_, 5] += 1
            assert s.scan().tolist() == sorted(set(round_))
        assert len(s.scan()) == 0
    finally:
        s.close()
        w.close()
        del buf
        mm.close()


def test_expand_runs() -> None:
    got = uffd._expand_runs(np.array([3, 10, 20]), np.array([2, 1, 3]))
    assert got.tolist() == [3, 4, 10, 20, 21, 22]


# --------------------------------------------------------------------------- CLI input


def test_parse_size_and_throttle() -> None:
    assert parse_size("256M") == 256 * MiB and parse_size("1G") == 1 << 30
    assert parse_size("16777216") == 16 * MiB and parse_size("64MiB") == 64 * MiB
    assert parse_throttle("30%") == pytest.approx(0.3) and parse_throttle("0.5") == 0.5
    for bad in ("12Q", "M", "1.5"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        parse_throttle("1.5")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memory", "100000001"], "multiple of 4096"),
        (["--memory", "12X"], "size expects"),
        (["--memory", "64G"], "exceeds what this machine has"),
        (["--workload", "spinner"], "unknown workload"),
        (["--workload", "dirtier:pattern=zigzag"], "allowed: uniform, hotcold, sequential"),
        (["--throttle", "1.2"], "[0, 0.99]"),
        (["--tracker", "kvm"], "'auto', 'uffd', 'dmap'"),
    ],
)
def test_cli_bad_input_is_a_clear_error(args: list[str], message: str) -> None:
    res = CliRunner().invoke(guest_cli, ["run", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
