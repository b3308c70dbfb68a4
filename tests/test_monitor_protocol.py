"""The monitor's pure parts: framing, envelopes, argument types, parameters, capabilities,
and query-migrate's members per status. No processes."""

from __future__ import annotations

import pytest

from cvmig.migration.driver import Progress, Round, TimeoutAction
from cvmig.migration.live import RateMeter, migration_info, percent
from cvmig.migration.parameters import CAPABILITY_NAMES as CAPABILITIES
from cvmig.migration.throttle import ThrottleKind
from cvmig.monitor.params import Settings
from cvmig.monitor.protocol import QMPError, Splitter, check_request, event, parse
from cvmig.monitor.run import parse_qmp_address
from cvmig.monitor.schema import check_args
from cvmig.psp.api import PAGE_SIZE, Batching


def texts(chunks: list[str]) -> list[str | QMPError]:
    s = Splitter()
    out: list[str | QMPError] = []
    for c in chunks:
        out.extend(s.feed(c))
    return out


def test_splitter_cuts_by_depth_not_lines() -> None:
    out = texts(['{"execute":', ' "stop"}{"execute": "cont"}\n', '{"a": "}\\"{"}\n'])
    assert out == ['{"execute": "stop"}', '{"execute": "cont"}', '{"a": "}\\"{"}']


def test_splitter_ends_junk_at_newline_and_recovers() -> None:
    out = texts(["garbage\n", "42\n", "}\n", '{"execute": "x"}\n'])
    assert out[0] == "garbage" and out[1] == "42"
    assert isinstance(out[2], QMPError)
    assert out[3] == '{"execute": "x"}'


def test_splitter_limits_depth() -> None:
    out = texts(["[" * 2000])
    assert isinstance(out[0], QMPError) and "nesting" in out[0].desc


@pytest.mark.parametrize("text, desc", [
    ("garbage", "JSON parse error"),
    ('{"execute": }', "JSON parse error"),
])
def test_parse_errors_are_generic_errors(text: str, desc: str) -> None:
    with pytest.raises(QMPError) as e:
        parse(text)
    assert e.value.cls == "GenericError" and desc in e.value.desc


@pytest.mark.parametrize("msg, desc", [
    (42, "QMP input must be a JSON object"),
    ({"arguments": {}}, "QMP input lacks member 'execute'"),
    ({"execute": 1}, "QMP input member 'execute' must be a string"),
    ({"execute": "x", "arguments": []}, "QMP input member 'arguments' must be an object"),
    ({"execute": "x", "bogus": 1}, "QMP input member 'bogus' is unexpected"),
])
def test_envelope_checks_use_qemu_messages(msg: object, desc: str) -> None:
    with pytest.raises(QMPError) as e:
        check_request(msg)
    assert e.value.desc == desc


def test_argument_types_as_the_qapi_visitor() -> None:
    schema = {"n": ("uint8", True), "b": ("bool", False), "s": ("str", False),
              "x": ("number", False)}
    assert check_args({"n": 5, "x": 1}, schema) == {"n": 5, "x": 1}
    for args, desc in [
        ({}, "Parameter 'n' is missing"),
        # QEMU 10's words for its unsigned integers: the type, then the width
        ({"n": "5"}, "Parameter 'n' expects uint64"),
        ({"n": 5.0}, "Parameter 'n' expects uint64"),
        ({"n": True}, "Parameter 'n' expects uint64"),
        ({"n": 256}, "Parameter 'n' expects uint8_t"),
        ({"n": -1}, "Parameter 'n' expects uint8_t"),  # read as 2^64 - 1, as QEMU does
        ({"n": 1, "b": 1}, "Invalid parameter type for 'b', expected: boolean"),
        ({"n": 1, "s": 1}, "Invalid parameter type for 's', expected: string"),
        ({"n": 1, "x": False}, "Invalid parameter type for 'x', expected: number"),
        ({"n": 1, "z": 1}, "Parameter 'z' is unexpected"),
    ]:
        with pytest.raises(QMPError) as e:
            check_args(args, schema)
        assert e.value.desc == desc, args


def test_parameters_have_qemu_names_and_defaults() -> None:
    s = Settings()
    q = s.query_parameters()
    assert q["downtime-limit"] == 300
    assert q["throttle-trigger-threshold"] == 50
    assert q["cpu-throttle-initial"] == 20
    assert q["cpu-throttle-increment"] == 10
    assert q["cpu-throttle-tailslow"] is False
    assert q["max-cpu-throttle"] == 99
    assert q["vcpu-dirty-limit"] == 1
    assert q["x-batching"] == "aead" and q["x-throttle"] == "auto"  # one default: the CLI's
    assert q["max-bandwidth"] == 134217728  # QEMU's; `cvmig migrate` keeps unlimited
    assert q["tls-creds"] == q["tls-hostname"] == q["tls-authz"] == ""
    p = s.params()
    assert p.throttle is ThrottleKind.NONE and p.max_bandwidth == 134217728


def test_parameters_map_onto_the_engine() -> None:
    s = Settings()
    s.set_parameters({"downtime-limit": 50, "max-bandwidth": 1 << 20, "x-batching": "contig",
                      "x-batch-cap": 4, "x-queue": True, "cpu-throttle-initial": 30,
                      "x-precopy-throttle": 40, "x-max-rounds": 3, "x-timeout": 2.5,
                      "x-timeout-action": "force"})
    p = s.params()
    assert (p.downtime_limit_ms, p.max_bandwidth, p.batching, p.cap, p.queue) == \
        (50, 1 << 20, Batching.CONTIG, 4, True)
    assert p.throttle_params.cpu_throttle_initial == 30
    assert p.throttle_params.precopy_throttle == 40
    assert (p.max_rounds, p.timeout_s, p.timeout_action) == (3, 2.5, TimeoutAction.FORCE)
    assert s.query_parameters()["x-batching"] == "contig"


def test_bad_parameter_sets_change_nothing() -> None:
    s = Settings()
    before = s.query_parameters()
    for args, needle in [
        ({"downtime-limit": 10, "cpu-throttle-initial": 0},
         "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
        ({"max-cpu-throttle": 10},  # below cpu-throttle-initial (20): QEMU's words
         "Parameter 'max_cpu_throttle' expects an integer in the range of "
         "cpu_throttle_initial to 99"),
        ({"vcpu-dirty-limit": 0}, "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s"),
        ({"x-batching": "page", "x-batch-cap": 4}, "one page per command"),
        ({"x-batching": "bogus"}, "does not accept value 'bogus'"),
        ({"x-precopy-throttle": 100}, "x_precopy_throttle"),
        ({"multifd-channels": 4}, "not supported by cvmig"),
        ({"nonsense": 1}, "Parameter 'nonsense' is unexpected"),
        ({"downtime-limit": 2_000_001}, "Parameter 'downtime_limit' expects an integer in "
                                        "the range of 0 to (2000 * 1000) ms"),
        ({"tls-creds": 5}, "Invalid parameter type for 'tls-creds', expected: StrOrNull"),
    ]:
        with pytest.raises(QMPError) as e:
            s.set_parameters(args)
        assert needle in e.value.desc, (args, e.value.desc)
        assert s.query_parameters() == before


def test_capabilities_choose_the_throttle_unless_x_throttle_says_otherwise() -> None:
    s = Settings()
    assert [c["capability"] for c in s.query_capabilities()] == list(CAPABILITIES)
    assert not any(c["state"] for c in s.query_capabilities())
    s.set_capabilities([{"capability": "auto-converge", "state": True}])
    assert s.params().throttle is ThrottleKind.AUTO_CONVERGE
    s.set_capabilities([{"capability": "auto-converge", "state": False},
                        {"capability": "dirty-limit", "state": True}])
    assert s.params().throttle is ThrottleKind.DIRTY_LIMIT
    s.set_parameters({"x-throttle": "precopy"})
    assert s.params().throttle is ThrottleKind.PRECOPY
    s.set_parameters({"x-throttle": "none"})
    assert s.params().throttle is ThrottleKind.NONE


def test_capability_errors() -> None:
    s = Settings()
    for items, needle in [
        ([{"capability": "xbzrle", "state": True}], "not supported by cvmig"),
        ([{"capability": "warp-drive", "state": True}], "does not accept value 'warp-drive'"),
        ([{"capability": "events", "state": "on"}], "expected: boolean"),
        ([{"capability": "events"}], "'capabilities[0].state' is missing"),
        ([{"capability": "events", "state": True, "x": 1}], "is unexpected"),
        (["events"], "expected: object"),
        ([{"capability": "dirty-limit", "state": True},
          {"capability": "auto-converge", "state": True}], "dirty-limit conflicts"),
    ]:
        with pytest.raises(QMPError) as e:
            s.set_capabilities(items)
        assert needle in e.value.desc, (items, e.value.desc)
    assert not any(c["state"] for c in s.query_capabilities())
    s.set_capabilities([{"capability": "xbzrle", "state": False}])  # off is always fine


def _progress(status: str) -> Progress:
    p = Progress(status=status, start=100.0, setup_time=0.01, total_pages=1000,
                 transferred=600 * PAGE_SIZE, pages_sent=600, remaining_pages=400,
                 dirty_sync_count=2, bandwidth=1e8, expected_downtime_ms=12.0,
                 throttle_pct=20)
    p.rounds.append(Round(0, "bulk", 0.0, bytes=600 * PAGE_SIZE, pages=600))
    return p


def test_query_migrate_members_per_status() -> None:
    assert migration_info("none", Progress(), None, None) == {}
    assert migration_info("setup", Progress(), None, None) == {"status": "setup"}
    meter = RateMeter()
    meter.add(100.0, 0, 0)
    meter.add(100.2, 2_000_000, 500)
    info = migration_info("active", _progress("active"), None, meter, now=101.5)
    assert info["status"] == "active"
    assert info["total-time"] == 1500  # live, not only at the end
    assert "expected-downtime" in info and "downtime" not in info
    ram = info["ram"]
    assert ram["remaining"] == 400 * PAGE_SIZE and ram["total"] == 1000 * PAGE_SIZE
    assert ram["mbps"] == pytest.approx(80.0)  # 2 MB in 0.2 s, the latest window
    assert ram["pages-per-second"] == 2500
    assert info["cpu-throttle-percentage"] == 20
    assert percent(info) == pytest.approx(60.0)
    failed = migration_info("failed", _progress("active"), None, meter, error="boom")
    assert failed == {"status": "failed", "error-desc": "boom"}
    assert migration_info("cancelled", _progress("active"), None, meter) == {"status": "cancelled"}
    done = _progress("completed")
    done.total_time, done.downtime = 2.0, 0.05
    info = migration_info("completed", done, None, meter)
    assert info["downtime"] == 50 and info["total-time"] == 2000
    assert "expected-downtime" not in info and info["ram"]["remaining"] == 0
    assert percent(info) == 100.0


def test_events_carry_qemu_timestamps() -> None:
    ev = event("STOP")
    assert set(ev) == {"timestamp", "event"}  # no data member at all
    ts = ev["timestamp"]
    assert isinstance(ts["seconds"], int) and 0 <= ts["microseconds"] < 1_000_000
    assert event("MIGRATION", {"status": "setup"})["data"] == {"status": "setup"}


def test_qmp_address() -> None:
    assert parse_qmp_address("unix:/tmp/x.sock") == "/tmp/x.sock"
    assert parse_qmp_address("unix:/tmp/x.sock,server=on,wait=off") == "/tmp/x.sock"
    for bad in ("tcp:1.2.3.4:5", "unix:", "/tmp/x", "unix:/x,reconnect=1"):
        with pytest.raises(ValueError):
            parse_qmp_address(bad)
