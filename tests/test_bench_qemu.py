"""`cvmig bench qemu`: the pure pieces here; the real QEMU run only where QEMU is installed."""

from __future__ import annotations

import json
import shutil
import stat
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cvmig.bench import qemu as q
from cvmig.bench.cli import bench
from cvmig.psp.api import Batching

MiB = 1 << 20


def parse_newc(data: bytes) -> list[dict[str, Any]]:
    """An independent reader of the newc format (what the kernel's initramfs unpacker reads)."""
    out, off = [], 0
    while True:
        assert data[off:off + 6] == b"070701", f"bad magic at {off}"
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[off + 110: off + 110 + namesize]
        assert name.endswith(b"\0")
        off += 110 + namesize
        off += -off % 4
        body = data[off: off + filesize]
        off += filesize
        off += -off % 4
        if name[:-1] == b"TRAILER!!!":
            assert off == len(data)
            return out
        out.append({"name": name[:-1].decode(), "mode": f[1], "data": body,
                    "rdev": (f[9], f[10]), "nlink": f[4]})


def test_qemu_version_parsed() -> None:
    assert q.parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)") == (10, 0, 2)
    assert q.parse_qemu_version("QEMU emulator version 7.2.0") == (7, 2, 0)
    assert q.parse_qemu_version("QEMU emulator version 9.0") == (9, 0, 0)
    assert q.parse_qemu_version("nonsense") is None


def _elf(interp: bool) -> bytes:
    hdr = bytearray(64)
    hdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", hdr, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", hdr, 0x36, 56, 2)  # e_phentsize, e_phnum
    ph = bytearray(112)
    struct.pack_into("<I", ph, 0, 1)  # PT_LOAD
    struct.pack_into("<I", ph, 56, 3 if interp else 1)  # PT_INTERP or another PT_LOAD
    return bytes(hdr + ph)


def test_static_elf_told_from_dynamic() -> None:
    assert q.is_static_elf(_elf(interp=False))
    assert not q.is_static_elf(_elf(interp=True))
    assert not q.is_static_elf(b"#!/bin/sh\n" + bytes(100))


def test_initramfs_is_a_newc_cpio_python_reads_back() -> None:
    entries = q.initramfs_entries(b"BUSYBOX", b"FILL-PROGRAM")
    data = q.newc_archive(entries)
    assert len(data) % 4 == 0
    got = {e["name"]: e for e in parse_newc(data)}
    assert set(got) == {e.name for e in entries}
    assert got["init"]["data"].decode() == q.INIT_SH
    assert got["init"]["mode"] & 0o111 and stat.S_ISREG(got["init"]["mode"])
    assert got["bin/busybox"]["data"] == b"BUSYBOX"
    assert got["fill"]["data"] == b"FILL-PROGRAM"
    # the kernel gives init a console only if /dev/console exists in the archive
    assert stat.S_ISCHR(got["dev/console"]["mode"]) and got["dev/console"]["rdev"] == (5, 1)
    assert stat.S_ISDIR(got["proc"]["mode"]) and got["proc"]["nlink"] == 2
    assert q.newc_archive(entries) == data  # reproducible: the cache key can rely on it


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed")
def test_initramfs_listed_by_busybox_cpio() -> None:
    data = q.newc_archive(q.initramfs_entries(b"x" * 5, b"y" * 7))
    out = subprocess.run(["busybox", "cpio", "-t"], input=data, capture_output=True, check=True)
    assert set(out.stdout.decode().split()) >= {"init", "fill", "bin/busybox", "dev/console"}


def test_init_script_reads_size_and_rate_from_the_kernel_command_line() -> None:
    assert "cvmig_fill=*" in q.INIT_SH and "cvmig_rate=*" in q.INIT_SH
    assert q.MARK_FILLED in q.FILL_C and q.MARK_VERIFY in q.FILL_C


def test_modes_default_to_every_batching_mode() -> None:
    assert q.parse_modes(None) == list(Batching)
    assert q.parse_modes("sg, page,sg") == [Batching.SG, Batching.PAGE]
    with pytest.raises(ValueError, match="unknown batching mode 'fast'; allowed: page"):
        q.parse_modes("page,fast")
    with pytest.raises(ValueError, match="no batching mode"):
        q.parse_modes(" , ")


@pytest.mark.parametrize(("memory", "fill", "msg"), [
    (128 * MiB, 64 * MiB, "at least 256 MiB"),
    (1024 * MiB, 900 * MiB, "at most 864 MiB"),
    (1024 * MiB, 0, "at least 1"),
    (1024 * MiB + 4096, 64 * MiB, "whole number of MiB"),
])
def test_sizes_refused_with_reason(memory: int, fill: int, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        q.check_sizes(memory, fill)


def test_sizes_accepted() -> None:
    q.check_sizes(1024 * MiB, 768 * MiB)
    q.check_sizes(256 * MiB, 96 * MiB)


def _runs() -> list[q.Run]:
    return [
        q.Run("qemu", "precopy", "completed", total_ms=700, downtime_ms=200, transferred=857 * MiB,
              verified=True),
        q.Run("qemu", "precopy", "completed", total_ms=800, downtime_ms=100, transferred=857 * MiB,
              verified=True),
        q.Run("qemu", "precopy", "completed", total_ms=900, downtime_ms=150, transferred=857 * MiB,
              verified=True),
        q.Run("cvmig", "page", "completed", total_ms=8000, downtime_ms=300,
              transferred=1030 * MiB, verified=True),
        q.Run("cvmig", "sg", "completed", total_ms=2000, downtime_ms=75, transferred=1030 * MiB,
              verified=True),
        q.Run("cvmig", "sg", "failed", error="boom"),
        q.Run("cvmig", "contig", "failed", error="boom"),
    ]


def test_ratios_are_medians_over_qemus_median() -> None:
    rows = {r["mode"]: r for r in q.compare(_runs())}
    assert rows["precopy"]["total_ms"] == 800 and rows["precopy"]["downtime_ms"] == 150
    assert rows["precopy"]["time_vs_qemu"] == 1.0
    assert rows["page"]["time_vs_qemu"] == 10.0 and rows["page"]["downtime_vs_qemu"] == 2.0
    assert rows["sg"]["runs"] == 2 and rows["sg"]["completed"] == 1
    assert rows["sg"]["time_vs_qemu"] == 2.5 and rows["sg"]["downtime_vs_qemu"] == 0.5
    assert "total_ms" not in rows["contig"] and rows["contig"]["completed"] == 0


def test_no_ratio_without_a_qemu_result() -> None:
    rows = q.compare([r for r in _runs() if r.system == "cvmig"])
    assert all("time_vs_qemu" not in r for r in rows)
    assert "-" in q.format_table(rows)


def test_table_shows_each_mode_and_its_ratio() -> None:
    text = q.format_table(q.compare(_runs()))
    lines = text.splitlines()
    assert lines[0].split()[:6] == ["system", "mode", "runs", "ok", "total", "ms"]
    page = next(ln for ln in lines if " page " in ln)
    assert "8000" in page and "10.00" in page and "2.00" in page and page.endswith("yes")
    assert "0/1" in next(ln for ln in lines if " contig " in ln)
    sg = next(ln for ln in lines if " sg " in ln)
    assert " 1/2 " in sg and "2000" in sg


@pytest.mark.parametrize(("args", "msg"), [
    (["--modes", "page,fast"], "unknown batching mode 'fast'"),
    (["--memory", "12X"], "size expects"),
    (["--memory", "128M"], "at least 256 MiB"),
    (["--memory", "1G", "--fill", "1G"], "at most 864 MiB"),
    (["--reps", "0"], "--reps"),
])
def test_bad_input_refused_before_work(monkeypatch: pytest.MonkeyPatch, args: list[str],
                                       msg: str) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("work started on bad input")

    monkeypatch.setattr(q, "missing_tools", boom)
    monkeypatch.setattr(q, "build_guest", boom)
    res = CliRunner().invoke(bench, ["qemu", *args])
    assert res.exit_code == 2, res.output
    assert msg in res.output


def _fake_qemu(tmp_path: Path, version: str) -> str:
    p = tmp_path / "qemu-system-x86_64"
    p.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version}'\n")
    p.chmod(0o755)
    return str(p)


def test_missing_qemu_says_how_to_install(tmp_path: Path) -> None:
    res = CliRunner().invoke(bench, ["qemu", "--qemu", str(tmp_path / "nope"),
                                     "--json", str(tmp_path / "q.json")])
    assert res.exit_code == 1
    assert "not found" in res.output and "bookworm-backports" in res.output
    assert "apt-get install" in res.output and "--install" in res.output
    assert not (tmp_path / "q.json").exists()


def test_old_qemu_refused(tmp_path: Path) -> None:
    res = CliRunner().invoke(bench, ["qemu", "--qemu", _fake_qemu(tmp_path, "7.2.0"),
                                     "--cache-dir", str(tmp_path / "cache"),
                                     "--json", str(tmp_path / "q.json")])
    assert res.exit_code == 1
    assert "QEMU 7.2.0; 9.0 or newer is needed" in res.output


def test_command_runs_qemu_then_every_mode(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    """The command's flow with both sides stubbed: JSON, log, plot and table written."""
    modes: list[Batching] = []
    monkeypatch.setattr(q, "missing_tools", lambda *a, **k: [])
    monkeypatch.setattr(q, "qemu_version", lambda *a: (10, 0, 2))
    monkeypatch.setattr(q, "build_guest", lambda cache, echo: q.Guest(Path("k"), Path("i")))
    monkeypatch.setattr(q, "run_qemu", lambda *a, **k: [
        q.Run("qemu", "precopy", "completed", total_ms=500, downtime_ms=200, verified=True)])

    def fake_cvmig(mode: Batching, memory: int) -> q.Run:
        assert memory == 512 * MiB
        modes.append(mode)
        return q.Run("cvmig", mode.value, "completed", total_ms=1000, downtime_ms=100,
                     verified=True)

    monkeypatch.setattr(q, "run_cvmig", fake_cvmig)
    out = tmp_path / "r" / "qemu.json"
    res = CliRunner().invoke(bench, ["qemu", "-m", "512M", "--plot", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert modes == list(Batching)
    doc = json.loads(out.read_text())
    assert doc["meta"]["memory_mib"] == 512 and doc["meta"]["qemu_fill_mib"] == 352
    assert {r["mode"] for r in doc["summary"]} == {"precopy", *(b.value for b in Batching)}
    assert all(r["time_vs_qemu"] == 2.0 for r in doc["summary"] if r["system"] == "cvmig")
    assert "machine:" in res.output and "time ×QEMU" in res.output
    assert out.with_suffix(".log").read_text().startswith("machine:")
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.skipif(shutil.which(q.QEMU_BIN) is None,
                    reason="qemu-system-x86_64 not installed (CI); run `cvmig bench qemu`")
def test_real_qemu_migration_verified() -> None:
    """QEMU's side for real: a 256 MiB guest, 32 MiB filled, migrated and checked."""
    v = q.qemu_version()
    if v is None or v[:2] < q.QEMU_MIN:
        pytest.skip(f"QEMU {v} is older than 9.0")
    if q.missing_tools(q.QEMU_BIN, need_build=not q.guest_cached(q.CACHE_DIR)):
        pytest.skip("the guest cannot be built here (busybox-static, gcc or apt missing)")
    guest = q.build_guest(q.CACHE_DIR, print)
    runs = q.run_qemu(q.QEMU_BIN, guest, 256 * MiB, 32 * MiB, 1, print)
    assert [r.status for r in runs] == ["completed"]
    assert runs[0].verified and runs[0].transferred > 32 * MiB and runs[0].total_ms > 0


def test_default_fill_leaves_the_kernel_room() -> None:
    assert q.default_fill(1024 * MiB) == 768 * MiB
    assert q.default_fill(512 * MiB) == 352 * MiB
    for m in (256, 300, 512, 1024, 4096):
        q.check_sizes(m * MiB, q.default_fill(m * MiB))
