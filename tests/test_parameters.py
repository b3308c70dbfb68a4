"""The one parameter table and the one size grammar: the CLI, QMP and the engine derived
from them, and side by side with a real QEMU (when one is installed) for QEMU's defaults
and error wording. No VM processes."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from typing import Any

import pytest
from click.testing import CliRunner

from cvmig.migration.cli import build_params, migrate
from cvmig.migration.driver import Driver, MigrationParams, ParamsFeed, Progress, Switchover
from cvmig.migration.parameters import (
    CLI_DEFAULTS,
    DEFAULTS,
    KINDS,
    PARAMS,
    TABLE,
    ParamError,
    build,
    merge,
)
from cvmig.migration.throttle import ThrottleKind, ThrottleParams
from cvmig.model.world import Costs, GuestModel, SimWorld
from cvmig.monitor.params import Settings
from cvmig.monitor.protocol import QMPError
from cvmig.psp.api import Batching
from cvmig.units import parse_size

QEMU = shutil.which("qemu-system-x86_64")
MiB = 1 << 20


def test_qemus_size_grammar() -> None:
    for text, want in [("256M", 256 * MiB), ("1G", 1 << 30), ("4096", 4096), ("4k", 4096),
                       ("1.5G", 3 << 29), ("0x1000", 4096), ("2T", 2 << 40), ("1E", 1 << 60),
                       ("64MiB", 64 * MiB), (" 8 M ", 8 * MiB), ("10b", 10)]:
        assert parse_size(text) == want, text
    for bad in ("", "M", "12Q", "-1", "1.5", "16E", "1.5B", "KiB", "0x", "1,5G"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_every_parameter_is_declared_once_with_what_a_user_needs() -> None:
    assert len(PARAMS) == len(TABLE)
    for p in TABLE:
        assert p.help and p.kind in KINDS, p.name
        if p.kind == "enum":
            assert p.default in p.choices and p.default_cli in (p.cli_choices or p.choices)
        p.check(p.default)
        p.check(p.default_cli)
    build(DEFAULTS)
    build(CLI_DEFAULTS)


def test_the_cli_options_come_from_the_table() -> None:
    text = CliRunner().invoke(migrate, ["--help"], terminal_width=200).output
    for p in TABLE:
        for opt in p.cli:
            assert opt in text, opt
    # the defaults: the table's, the CLI's own where it says so
    params = build_params({})
    assert params.batching is Batching.AEAD and params.throttle is ThrottleKind.AUTO_CONVERGE
    assert params.max_bandwidth == 0 and params.timeout_s == 120.0
    assert build_params({"batch_cap": 8, "batching": "sg", "max_bandwidth": 1 << 20}).cap == 8


@pytest.mark.parametrize("args, needle", [
    (["--max-cpu-throttle", "10"], "--max-cpu-throttle expects an integer in the range of "
                                   "cpu_throttle_initial to 99"),
    (["--cpu-throttle-initial", "0"], "expects an integer in the range of 1 to 99"),
    (["--max-bandwidth", "12Q"], "optional suffix B, K, M, G, T, P or E"),
    (["--downtime-limit", "3000000"], "0 to (2000 * 1000) ms"),
    (["--batching", "page", "--cap", "4"], "one page per command"),
    (["--vcpu-dirty-limit", "0"], "must be greater than 1 MB/s"),
])
def test_the_cli_refuses_what_qmp_refuses(args: list[str], needle: str) -> None:
    r = CliRunner().invoke(migrate, args, terminal_width=200)
    assert r.exit_code == 2 and needle in r.output, r.output


def test_qmp_and_the_cli_share_defaults_but_max_bandwidth() -> None:
    differ = {n for n in DEFAULTS if DEFAULTS[n] != CLI_DEFAULTS[n]}
    # QEMU's 128 MiB/s over QMP; x-throttle auto (capabilities) and no x-timeout as QEMU
    assert differ == {"max-bandwidth", "x-throttle", "x-timeout"}
    assert DEFAULTS["x-batching"] == CLI_DEFAULTS["x-batching"] == "aead"


def test_only_live_parameters_change_during_a_migration() -> None:
    live = {p.name for p in TABLE if p.live}
    assert {"downtime-limit", "max-bandwidth", "cpu-throttle-initial", "max-cpu-throttle",
            "x-max-rounds", "x-timeout"} <= live
    assert not live & {"x-batching", "x-batch-cap", "x-throttle", "tls-creds"}
    new, params = merge(DEFAULTS, {"downtime-limit": 50, "max-bandwidth": 0}, {},
                        migrating=True)
    assert (params.downtime_limit_ms, params.max_bandwidth) == (50, 0)
    assert new["downtime-limit"] == 50
    with pytest.raises(ParamError, match="'x_batching' cannot change while a migration"):
        merge(DEFAULTS, {"x-batching": "page"}, {}, migrating=True)
    merge(DEFAULTS, {"x-batching": "aead"}, {}, migrating=True)  # unchanged: fine
    s = Settings()
    with pytest.raises(QMPError):
        s.set_parameters({"downtime-limit": 1, "x-queue": True, "x-batch-cap": 8},
                         migrating=True)
    assert s.query_parameters() == DEFAULTS  # all or nothing


def _qemu(cmds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert QEMU is not None
    msgs = [{"execute": "qmp_capabilities"}, *cmds, {"execute": "quit"}]
    out = subprocess.run([QEMU, "-machine", "none", "-nodefaults", "-display", "none",
                          "-qmp", "stdio"], input="".join(json.dumps(m) + "\n" for m in msgs),
                         capture_output=True, text=True, timeout=60).stdout
    replies = [json.loads(line) for line in out.splitlines()[1:]]
    return [r for r in replies if "event" not in r][1 : len(cmds) + 1]


BAD_SETS = [
    {"max-cpu-throttle": 10},
    {"cpu-throttle-initial": 0},
    {"cpu-throttle-initial": 100},
    {"cpu-throttle-increment": 100},
    {"throttle-trigger-threshold": 0},
    {"downtime-limit": 2_000_001},
    {"vcpu-dirty-limit": 0},
    {"cpu-throttle-initial": 300},
    {"bogus": 1},
    {"downtime-limit": True},
    {"downtime-limit": "x"},
    {"downtime-limit": 1.5},
    {"downtime-limit": -1},
    {"cpu-throttle-initial": -1},
    {"cpu-throttle-initial": 1.0},
    {"max-bandwidth": "x"},
    {"cpu-throttle-tailslow": 1},
    {"tls-creds": 5},
]


@pytest.mark.skipif(QEMU is None, reason="no qemu-system-x86_64 to compare with")
def test_side_by_side_with_qemu() -> None:
    """QEMU's defaults and QEMU's refusals, word for word, for the parameters both have."""
    replies = _qemu([{"execute": "query-migrate-parameters"}]
                    + [{"execute": "migrate-set-parameters", "arguments": a} for a in BAD_SETS])
    theirs = replies[0]["return"]
    ours = Settings().query_parameters()
    for name in ours.keys() & theirs.keys():
        assert ours[name] == theirs[name], name
    for args, reply in zip(BAD_SETS, replies[1:], strict=True):
        s = Settings()
        with pytest.raises(QMPError) as e:
            s.set_parameters(args)  # the path migrate-set-parameters takes
        assert e.value.desc == reply["error"]["desc"], args


# -- the driver takes live changes (simulated world: deterministic, no processes) -------

def _live_run(params: MigrationParams, change: dict[str, Any], when: str, nth: int,
              guest: GuestModel) -> tuple[SimWorld, Driver]:
    feed = ParamsFeed()
    params = replace(params, updates=feed)
    seen = {"n": 0}

    def observe(event: str, p: Progress) -> None:
        if event == when:
            seen["n"] += 1
            if seen["n"] == nth:
                feed.put(replace(params, **change))

    w = SimWorld(guest, Costs())
    d = Driver(w, params, observe)
    d.run()
    assert w.destination_matches()
    return w, d


def test_a_new_downtime_limit_counts_at_the_next_sync() -> None:
    hot = GuestModel(npages=16384, dirty_rate=60000, working_set=16384)
    base = MigrationParams(downtime_limit_ms=1, switchover=Switchover.QEMU, max_rounds=50)
    _, d = _live_run(base, {"downtime_limit_ms": 2_000_000}, "sync", 3, hot)
    assert d.progress.switchover == "converged"  # never, at 1 ms
    assert d.params.downtime_limit_ms == 2_000_000 and d.params.updates is not None
    # put as sync 3 was reported (after its decision): sync 4 converges
    assert len([r for r in d.progress.rounds if r.kind == "iterative"]) == 3


def test_a_lifted_bandwidth_cap_paces_the_very_next_send() -> None:
    idle = GuestModel(npages=16384, dirty_rate=0, working_set=0)  # 64 MiB
    capped = MigrationParams(max_bandwidth=1 << 20, switchover=Switchover.QEMU)
    w, d = _live_run(capped, {"max_bandwidth": 0}, "chunk", 1, idle)
    assert d.progress.total_time < 10  # at 1 MiB/s the bulk alone is 64 s


def test_a_lower_max_cpu_throttle_clamps_at_once() -> None:
    hot = GuestModel(npages=16384, dirty_rate=60000, working_set=16384)
    tp = ThrottleParams(cpu_throttle_initial=60, max_cpu_throttle=99)
    base = MigrationParams(throttle=ThrottleKind.PRECOPY, throttle_params=tp, max_rounds=6,
                           switchover=Switchover.QEMU, downtime_limit_ms=1)
    _, d = _live_run(base, {"throttle_params": replace(tp, cpu_throttle_initial=20,
                                                       max_cpu_throttle=30)}, "sync", 2, hot)
    assert max(r.throttle_pct for r in d.progress.rounds[3:]) <= 30
