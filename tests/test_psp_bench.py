"""`cvmig bench psp`: a short run writes sound records; bad options are refused clearly."""

from __future__ import annotations

import json
import pathlib

import pytest
from click.testing import CliRunner

from cvmig.bench.psp import psp


def test_bench_psp_short_run(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "psp.json"
    r = CliRunner().invoke(
        psp,
        ["--seconds", "0.05", "--pages", "256", "--batches", "1,4,64", "--json", str(out)],
    )
    assert r.exit_code == 0, r.output
    assert "µs/page" in r.output and "machine:" in r.output
    recs = json.loads(out.read_text())
    # page x1, contig x3, sg x3, aead x3, queue x2 (a queue of 1 is page mode), both ways
    assert len(recs) == 2 * (1 + 3 + 3 + 3 + 2)
    for rec in recs:
        assert rec["direction"] in ("send", "receive")
        assert rec["mode"] in ("page", "contig", "sg", "aead", "queue")
        assert rec["us_per_page"] > 0 and rec["mb_per_s"] > 0
        # the floor is the format's cryptography alone: positive, and below what was achieved
        assert 0 < rec["floor_us_per_page"] <= rec["us_per_page"]
        assert rec["pct_of_floor"] == pytest.approx(
            100 * rec["floor_us_per_page"] / rec["us_per_page"], abs=0.2)
        assert rec["pages"] == rec["commands"] * (1 if rec["mode"] == "queue" else rec["batch_pages"])
        assert isinstance(rec["machine"], dict) and rec["machine"]["cores"]
    by = {(r["direction"], r["mode"], r["batch_pages"]): r for r in recs}
    assert by[("send", "contig", 4)]["spec_compliant"]
    assert not by[("send", "contig", 64)]["spec_compliant"]
    for d in ("send", "receive"):
        # The per-page cost falls with the batch size (a 16x batch by a wide margin).
        for mode in ("contig", "sg", "aead"):
            assert by[(d, mode, 64)]["us_per_page"] < by[(d, mode, 1)]["us_per_page"] / 2
        # a tag per page costs less than a MAC per page: aead's floor is sg's less HMAC
        assert by[(d, "aead", 64)]["floor_us_per_page"] < by[(d, "sg", 64)]["floor_us_per_page"]


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--seconds", "0"], "--seconds"),
        (["--pages", "10"], "--pages"),
        (["--modes", "page,turbo"], "turbo"),
        (["--batches", "0"], "outside"),
        (["--batches", "two"], "whole number"),
        (["--psp-profile", "warp"], "unknown PSP cost profile"),
        (["--modes", "queue", "--batches", "1"], "nothing to measure"),
    ],
)
def test_bench_psp_bad_options(args: list[str], msg: str) -> None:
    r = CliRunner().invoke(psp, args)
    assert r.exit_code == 2 and msg in r.output, r.output
