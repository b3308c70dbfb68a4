"""`cvmig bench qemu`: QEMU's own pre-copy beside cvmig's, measured in one run.

QEMU (TCG, >= 9.0: 7.2 loses dirty pages of a TCG guest) migrates a tiny Linux guest of the
same size over loopback: a Debian kernel and a busybox initramfs whose init fills most of
guest RAM with non-zero data and then idles. Then cvmig migrates an idle guest of the same
size in each batching mode. The table gives each mode's total time and downtime as a ratio
to QEMU's, all measured here, now.

The guest is built from distribution packages at run time and cached: the kernel image from
the linux-image-amd64 .deb (downloaded and unpacked, not installed), /bin/busybox from
busybox-static, and a small C program compiled with gcc -static.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import click

from cvmig.bench.machine import machine_info, machine_line
from cvmig.psp.api import Batching

MiB = 1 << 20
QEMU_MIN = (9, 0)
QEMU_BIN = "qemu-system-x86_64"
MIN_MEMORY = 256 * MiB  # the Debian kernel, its page tables and the initramfs need ~100 MiB
HEADROOM = 160 * MiB  # guest RAM the fill must leave to the kernel
# QEMU's default max-bandwidth (128 MiB/s) would throttle a loopback migration; cvmig's
# default is unlimited, so QEMU gets (practically) unlimited too.
MAX_BANDWIDTH = 100 << 30  # bytes/s
DOWNTIME_LIMIT_MS = 300  # QEMU's default, set explicitly; cvmig's default is the same
VCPUS = 2  # cvmig's default guest has 2 vCPUs; the QEMU guest gets as many
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cvmig" / "qemu-guest"
MARK_FILLED = "CVMIG-FILLED"
MARK_VERIFY = "CVMIG-VERIFY"

INSTALL_HELP = """\
On Debian 12 (bookworm), as root: QEMU >= 9.0 is in bookworm-backports.
  cat > /etc/apt/sources.list.d/bookworm-backports.sources <<EOF
  Types: deb
  URIs: http://deb.debian.org/debian
  Suites: bookworm-backports
  Components: main
  Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
  EOF
  apt-get update
  apt-get install -y --no-install-recommends -t bookworm-backports qemu-system-x86
  apt-get install -y --no-install-recommends busybox-static gcc libc6-dev
(use the URIs: of /etc/apt/sources.list.d/debian.sources if it names a mirror),
or rerun with --install to do exactly that."""

# PID 1 of the guest: mount /proc, read the fill size and dirty rate from the kernel
# command line, hand the console to the fill program (which must never exit).
INIT_SH = """\
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
FILL=768
RATE=0
for a in $(/bin/busybox cat /proc/cmdline); do
  case "$a" in
    cvmig_fill=*) FILL="${a#*=}" ;;
    cvmig_rate=*) RATE="${a#*=}" ;;
  esac
done
exec /fill "$FILL" "$RATE" </dev/console >/dev/console 2>&1
"""

# Fills MiB of anonymous memory with a non-zero, address-dependent pattern (so no page is
# a zero page QEMU could skip), prints the marker, then idles or re-stores rate pages/s
# (the same value stored again still dirties the page). A line with 'v' on the console
# checks the whole pattern: how we know QEMU's destination got every page.
FILL_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/select.h>
#include <unistd.h>

static uint64_t val(uint64_t i) { return ((i * 0x9E3779B97F4A7C15ull) ^ (i >> 9)) | 1; }

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 768;
    long rate = argc > 2 ? strtol(argv[2], 0, 10) : 0;
    size_t words = mib << 17, pages = mib << 8, next = 0;
    uint64_t *p = mmap(0, mib << 20, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) {
        printf("\nCVMIG-ERROR cannot map %zu MiB\n", mib);
        fflush(stdout);
        for (;;) pause();
    }
    for (size_t i = 0; i < words; i++) p[i] = val(i);
    printf("\nCVMIG-FILLED %zu MiB rate %ld\n", mib, rate);
    fflush(stdout);
    for (;;) {
        fd_set r;
        FD_ZERO(&r);
        FD_SET(0, &r);
        struct timeval tv = {0, 10000};
        if (select(1, &r, 0, 0, rate > 0 ? &tv : NULL) > 0) {
            char buf[64];
            ssize_t k = read(0, buf, sizeof buf);
            if (k <= 0) { sleep(1); continue; }
            if (memchr(buf, 'v', (size_t)k)) {
                size_t bad = 0;
                for (size_t i = 0; i < words; i++) bad += p[i] != val(i);
                printf("\nCVMIG-VERIFY %s %zu\n", bad ? "bad" : "ok", bad);
                fflush(stdout);
            }
        }
        for (long j = 0; j < (rate + 99) / 100; j++, next++) {
            volatile uint64_t *q = &p[(next % pages) * 512];
            *q = *q;
        }
    }
}
"""


# ---------------------------------------------------------------- pure pieces


def parse_qemu_version(text: str) -> tuple[int, int, int] | None:
    """`qemu-system-x86_64 --version` output -> (major, minor, micro), or None."""
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return int(m[1]), int(m[2]), int(m[3] or 0)


def is_static_elf(data: bytes) -> bool:
    """True for a 64-bit little-endian ELF without a PT_INTERP (no dynamic loader)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            return False
        if struct.unpack_from("<I", data, off)[0] == 3:  # PT_INTERP
            return False
    return True


@dataclass(frozen=True)
class CpioEntry:
    """One member of an initramfs: a directory, a regular file or a character device."""

    name: str
    mode: int  # st_mode, type bits included
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def newc_archive(entries: Iterable[CpioEntry], mtime: int = 0) -> bytes:
    """An uncompressed cpio archive in the "newc" format the kernel unpacks as initramfs.

    Written here rather than with `cpio` so that /dev/console can be a device node without
    mknod on the host (the kernel needs it to give init a console), and so that it is
    byte-for-byte reproducible (mtime 0).
    """
    out = bytearray()
    all_entries = [*entries, CpioEntry("TRAILER!!!", 0)]
    for ino, e in enumerate(all_entries, start=1):
        name = e.name.encode() + b"\0"
        fields = (ino if e.name != "TRAILER!!!" else 0, e.mode, 0, 0,
                  2 if e.mode & 0o170000 == 0o040000 else 1, mtime, len(e.data), 0, 0,
                  e.rdev[0], e.rdev[1], len(name), 0)
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += hdr + name + _pad4(len(hdr) + len(name))
        out += e.data + _pad4(len(e.data))
    return bytes(out)


def parse_modes(text: str | None) -> list[Batching]:
    """'page,sg' -> [Batching.PAGE, Batching.SG]; None -> every mode cvmig has now."""
    if text is None:
        return list(Batching)
    allowed = [b.value for b in Batching]
    out: list[Batching] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part not in allowed:
            raise ValueError(f"unknown batching mode {part!r}; allowed: {', '.join(allowed)}")
        if Batching(part) not in out:
            out.append(Batching(part))
    if not out:
        raise ValueError(f"no batching mode given; allowed: {', '.join(allowed)}")
    return out


def default_fill(memory: int) -> int:
    """3/4 of the guest (as in platform.md's QEMU figures), less on small guests."""
    return max(MiB, min(memory * 3 // 4, memory - HEADROOM) // MiB * MiB)


def check_sizes(memory: int, fill: int) -> None:
    """Raise ValueError when the guest or its fill cannot work, before anything starts."""
    if memory % MiB:
        raise ValueError(f"memory must be a whole number of MiB, got {memory} bytes")
    if memory < MIN_MEMORY:
        raise ValueError(f"memory must be at least {MIN_MEMORY // MiB} MiB for the Linux "
                         f"guest, got {memory // MiB} MiB")
    if fill % MiB or fill < MiB:
        raise ValueError(f"fill must be a whole number of MiB, at least 1, got {fill} bytes")
    if fill > memory - HEADROOM:
        raise ValueError(f"fill of {fill // MiB} MiB leaves the guest kernel less than "
                         f"{HEADROOM // MiB} MiB of {memory // MiB} MiB; at most "
                         f"{(memory - HEADROOM) // MiB} MiB")


@dataclass
class Run:
    """One migration's figures, in query-migrate's units."""

    system: str  # "qemu" or "cvmig"
    mode: str  # "precopy" for QEMU, the batching mode for cvmig
    status: str
    total_ms: float = 0.0
    downtime_ms: float = 0.0
    setup_ms: float = 0.0
    transferred: int = 0  # bytes
    rounds: int = 0
    mbps: float = 0.0
    verified: bool = False
    error: str = ""
    load: float = 0.0  # 1-minute load average at the start: others' work skews a run
    extra: dict[str, Any] = field(default_factory=dict)


def compare(runs: list[Run]) -> list[dict[str, Any]]:
    """Medians per (system, mode) over completed runs, with ratios to QEMU's medians."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.system, r.mode), [])
        if r.status == "completed":
            groups[(r.system, r.mode)].append(r)
    rows: list[dict[str, Any]] = []
    for (system, mode), ok in groups.items():
        n = sum(1 for r in runs if (r.system, r.mode) == (system, mode))
        row: dict[str, Any] = {"system": system, "mode": mode, "runs": n, "completed": len(ok)}
        if ok:
            row.update(
                total_ms=statistics.median(r.total_ms for r in ok),
                downtime_ms=statistics.median(r.downtime_ms for r in ok),
                transferred_mib=round(statistics.median(r.transferred for r in ok) / MiB, 1),
                verified=all(r.verified for r in ok),
            )
        rows.append(row)
    q = next((r for r in rows if r["system"] == "qemu" and "total_ms" in r), None)
    for row in rows:
        if q is not None and "total_ms" in row:
            row["time_vs_qemu"] = round(row["total_ms"] / max(q["total_ms"], 1e-9), 2)
            row["downtime_vs_qemu"] = round(row["downtime_ms"] / max(q["downtime_ms"], 1e-9), 2)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The plain-text table the command prints."""
    head = ("system", "mode", "runs ok", "total ms", "downtime ms", "MiB sent", "time ×QEMU",
            "downtime ×QEMU", "verified")
    lines = [head]
    for r in rows:
        if "total_ms" not in r:
            lines.append((r["system"], r["mode"], f"0/{r['runs']}", "failed", "", "", "", "", ""))
            continue
        lines.append((  # medians over the completed runs only: "runs ok" says how many
            r["system"], r["mode"], f"{r['completed']}/{r['runs']}", f"{r['total_ms']:.0f}", f"{r['downtime_ms']:.0f}",
            f"{r['transferred_mib']:.1f}",
            f"{r['time_vs_qemu']:.2f}" if "time_vs_qemu" in r else "-",
            f"{r['downtime_vs_qemu']:.2f}" if "downtime_vs_qemu" in r else "-",
            "yes" if r["verified"] else "NO",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(line, widths, strict=True))).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# ---------------------------------------------------------------- tools on this machine


def qemu_version(binary: str = QEMU_BIN) -> tuple[int, int, int] | None:
    path = shutil.which(binary)
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    return parse_qemu_version(out.stdout)


def missing_tools(binary: str, need_build: bool) -> list[str]:
    """What this machine lacks for the QEMU side, each in words; empty when all is here."""
    problems = []
    v = qemu_version(binary)
    if shutil.which(binary) is None:
        problems.append(f"{binary} not found (QEMU {QEMU_MIN[0]}.{QEMU_MIN[1]} or newer is needed)")
    elif v is None:
        problems.append(f"cannot read the version of {binary}")
    elif v[:2] < QEMU_MIN:
        problems.append(f"{binary} is QEMU {'.'.join(map(str, v))}; {QEMU_MIN[0]}.{QEMU_MIN[1]} or "
                        "newer is needed (older TCG loses dirty pages during migration)")
    if need_build:
        bb = Path("/bin/busybox")
        if not bb.exists() or not is_static_elf(bb.read_bytes()[:65536]):
            problems.append("a static /bin/busybox (package busybox-static) is needed for the guest")
        if shutil.which("gcc") is None or not any(
                Path(d, "libc.a").exists() for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib")):
            problems.append("gcc and a static libc (packages gcc, libc6-dev) are needed to build "
                            "the guest's fill program")
        for tool in ("apt-get", "apt-cache", "dpkg-deb"):
            if shutil.which(tool) is None:
                problems.append(f"{tool} is needed to fetch the guest kernel (linux-image-amd64)")
    return problems


def _debian_uri() -> str:
    """The Debian mirror this machine already uses (deb822 sources), or deb.debian.org."""
    src = Path("/etc/apt/sources.list.d/debian.sources")
    with contextlib.suppress(OSError):
        for line in src.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split(":", 1)[1].split()[0]
    return "http://deb.debian.org/debian"


def install(echo: Callable[[str], None]) -> None:
    """The apt-get steps of INSTALL_HELP, as root."""
    if os.geteuid() != 0:
        raise click.ClickException("--install runs apt-get and needs root; rerun as root, or:\n"
                                   + INSTALL_HELP)
    codename = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                codename = line.split("=", 1)[1].strip().strip('"')
    target: list[str] = []
    if codename == "bookworm":  # QEMU 7.2 in main; >= 9.0 only in backports
        src = Path("/etc/apt/sources.list.d/bookworm-backports.sources")
        if not src.exists():
            src.write_text(f"Types: deb\nURIs: {_debian_uri()}\nSuites: bookworm-backports\n"
                           "Components: main\n"
                           "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
            echo(f"wrote {src}")
        target = ["-t", "bookworm-backports"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [["apt-get", "update", "-q"],
             ["apt-get", "install", "-y", "-q", "--no-install-recommends", *target,
              "qemu-system-x86"],
             ["apt-get", "install", "-y", "-q", "--no-install-recommends", "busybox-static",
              "gcc", "libc6-dev"]]
    for cmd in steps:
        echo("$ " + " ".join(cmd))
        if subprocess.run(cmd, env=env).returncode != 0:
            raise click.ClickException(f"{' '.join(cmd)} failed")


# ---------------------------------------------------------------- the guest


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initrd: Path


def _sh(cmd: list[str], cwd: Path | None = None) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed:\n{(r.stderr or r.stdout)[-2000:]}")
    return r.stdout


def _kernel(cache: Path, echo: Callable[[str], None]) -> Path:
    """vmlinuz from the linux-image-amd64 .deb, unpacked, never installed."""
    have = sorted(cache.glob("vmlinuz-*"))
    if have:
        return have[-1]
    deps = _sh(["apt-cache", "depends", "linux-image-amd64"])
    m = re.search(r"Depends: (linux-image-[\w.+-]+)", deps)
    if not m:
        raise click.ClickException("apt-cache knows no linux-image-amd64; run apt-get update")
    pkg = m[1]
    echo(f"fetching the guest kernel: apt-get download {pkg}")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        _sh(["apt-get", "download", pkg], cwd=t)
        deb = next(t.glob("*.deb"))
        _sh(["dpkg-deb", "-x", str(deb), str(t / "x")])
        src = next((t / "x" / "boot").glob("vmlinuz-*"))
        dst = cache / src.name
        shutil.copyfile(src, dst)
    return dst


def initramfs_entries(busybox: bytes, fill: bytes) -> list[CpioEntry]:
    """busybox, the fill program as the only work, and /init that starts it."""
    d, f, x = 0o040755, 0o100755, 0o020600
    return [CpioEntry("bin", d), CpioEntry("dev", d), CpioEntry("proc", d),
            CpioEntry("sys", d), CpioEntry("dev/console", x, rdev=(5, 1)),
            CpioEntry("bin/busybox", f, busybox), CpioEntry("bin/sh", f, busybox),
            CpioEntry("fill", f, fill), CpioEntry("init", f, INIT_SH.encode())]


def _initramfs(cache: Path, echo: Callable[[str], None]) -> Path:
    busybox = Path("/bin/busybox").read_bytes()
    key = hashlib.sha256(INIT_SH.encode() + FILL_C.encode() + busybox).hexdigest()[:12]
    out = cache / f"initramfs-{key}.cpio"
    if out.exists():
        return out
    echo("building the guest initramfs: busybox-static + fill.c (gcc -static)")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "fill.c").write_text(FILL_C)
        _sh(["gcc", "-static", "-O2", "-o", "fill", "fill.c"], cwd=t)
        fill = (t / "fill").read_bytes()
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_bytes(newc_archive(initramfs_entries(busybox, fill)))
    tmp_out.rename(out)  # atomic: a crash never leaves a half-written cached guest
    return out


def build_guest(cache: Path, echo: Callable[[str], None]) -> Guest:
    cache.mkdir(parents=True, exist_ok=True)
    return Guest(_kernel(cache, echo), _initramfs(cache, echo))


def guest_cached(cache: Path) -> bool:
    return any(cache.glob("vmlinuz-*")) and Path("/bin/busybox").exists() and any(
        cache.glob("initramfs-*.cpio"))


# ---------------------------------------------------------------- QEMU


class Console:
    """The guest's serial port as a UNIX socket: output kept in a buffer, input sent."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = _connect_unix(path, timeout)
        self.buf = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.buf += data

    def text(self) -> str:
        with self._lock:
            return self.buf.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float, alive: Callable[[], bool]) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.text()):
                return m
            if not alive():
                break
            time.sleep(0.2)
        tail = self.text()[-1500:]
        raise click.ClickException(f"QEMU guest: no {pattern!r} on the console within "
                                   f"{timeout:.0f} s; console ends:\n{tail}")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _connect_unix(path: Path, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class QemuVM:
    """One qemu-system-x86_64 process: TCG, the cached guest, QMP and console on sockets."""

    def __init__(self, binary: str, guest: Guest, memory: int, fill: int, rate: int,
                 workdir: Path, name: str, incoming_port: int | None = None) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.name = name
        qmp_path, con_path = workdir / f"{name}.qmp", workdir / f"{name}.con"
        cmd = [binary, "-accel", "tcg", "-smp", str(VCPUS), "-m", f"{memory // MiB}M",
               "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
               "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
               "-append", f"console=ttyS0 panic=-1 quiet cvmig_fill={fill // MiB} "
                          f"cvmig_rate={rate}",
               "-chardev", f"socket,id=con,path={con_path},server=on,wait=off",
               "-serial", "chardev:con",
               "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if incoming_port is not None:
            # destination RAM populated before pages arrive: first-touch faults cost more
            # than the copy here (platform.md section 7)
            cmd += ["-mem-prealloc", "-incoming", f"tcp:127.0.0.1:{incoming_port}"]
        self.cmdline = cmd
        self.stderr = (workdir / f"{name}.stderr").open("w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.stderr,
                                     stderr=subprocess.STDOUT)
        try:
            self.console = Console(con_path, timeout=120)
            _connect_unix(qmp_path, 120).close()  # the socket exists: QEMU is up
            self.qmp = QEMUMonitorProtocol(str(qmp_path))
            self.qmp.connect()
        except BaseException:
            self.kill()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cmd(self, name: str, **args: Any) -> Any:
        return self.qmp.cmd(name, **args)

    def failure(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-1500:]

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(Exception):
                self.qmp.cmd("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(Exception):
            self.qmp.close()
        with contextlib.suppress(Exception):
            self.console.close()
        self.stderr.close()


def _migrate_qemu(src: QemuVM, dst: QemuVM, port: int, timeout: float) -> dict[str, Any]:
    """QEMU's plain pre-copy from src to dst; query-migrate's final MigrationInfo."""
    src.cmd("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH,
                                         "downtime-limit": DOWNTIME_LIMIT_MS})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = src.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if time.monotonic() > deadline:
            src.cmd("migrate_cancel")
            raise click.ClickException(f"QEMU migration did not finish within {timeout:.0f} s")
        time.sleep(0.02)


def run_qemu(binary: str, guest: Guest, memory: int, fill: int, reps: int,
             echo: Callable[[str], None], boot_timeout: float = 600.0) -> list[Run]:
    """Boot once, then migrate reps times: each destination becomes the next source."""
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="cvmig-qemu-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        src = QemuVM(binary, guest, memory, fill, 0, work, "vm0")
        vms = [src]
        try:
            src.console.wait_for(MARK_FILLED, boot_timeout, src.alive)
            echo(f"  qemu: guest booted and filled {fill // MiB} MiB in "
                 f"{time.monotonic() - t0:.0f} s")
            time.sleep(1.0)  # let the guest settle into idle, as cvmig's warm-up does
            for rep in range(reps):
                port = _free_port()
                dst = QemuVM(binary, guest, memory, fill, 0, work, f"vm{rep + 1}", port)
                vms.append(dst)
                _wait_status(dst, "inmigrate", 300)
                load = os.getloadavg()[0]
                info = _migrate_qemu(src, dst, port, timeout=600)
                run = _qemu_run(info)
                run.load = load
                if run.status == "completed":
                    _wait_status(dst, "running", 60)
                    dst.console.send(b"v\n")
                    m = dst.console.wait_for(MARK_VERIFY + r" (\w+) (\d+)", 300, dst.alive)
                    run.verified = m[1] == "ok"
                    if not run.verified:
                        run.error = f"{m[2]} words differ at the destination"
                runs.append(run)
                echo(f"  qemu   precopy  rep {rep}: {run.status}, total {run.total_ms:.0f} ms, "
                     f"downtime {run.downtime_ms:.0f} ms, {run.transferred / MiB:.1f} MiB, "
                     f"verified {run.verified}, load {run.load:.1f}")
                if run.status != "completed":
                    break
                src.kill()
                src = dst
        except BaseException:
            for vm in vms:
                if not vm.alive() and vm.proc.returncode not in (0, None):
                    echo(f"  {vm.name} exited {vm.proc.returncode}: {vm.failure()}")
            raise
        finally:
            for vm in vms:
                vm.kill()
    return runs


def _wait_status(vm: QemuVM, status: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not vm.alive():
            raise click.ClickException(f"QEMU {vm.name} exited: {vm.failure()}")
        if vm.cmd("query-status").get("status") == status:
            return
        time.sleep(0.1)
    raise click.ClickException(f"QEMU {vm.name} not {status!r} within {timeout:.0f} s")


def _qemu_run(info: dict[str, Any]) -> Run:
    ram = info.get("ram", {})
    return Run(system="qemu", mode="precopy", status=str(info.get("status")),
               total_ms=float(info.get("total-time", 0)),
               downtime_ms=float(info.get("downtime", 0)),
               setup_ms=float(info.get("setup-time", 0)),
               transferred=int(ram.get("transferred", 0)),
               rounds=int(ram.get("dirty-sync-count", 0)), mbps=float(ram.get("mbps", 0)),
               error=str(info.get("error-desc", "")), extra={"query-migrate": info})


# ---------------------------------------------------------------- cvmig


def run_cvmig(mode: Batching, memory: int) -> Run:
    """An idle guest of the same size, this batching mode, no throttle, QEMU's rule."""
    from cvmig.guest.vm import GuestConfig
    from cvmig.guest.workloads import parse_workload
    from cvmig.migration.driver import MigrationParams
    from cvmig.migration.session import MigrateOptions, migrate_local_or_remote
    from cvmig.migration.source import MigrationFailed
    from cvmig.migration.throttle import ThrottleKind

    opts = MigrateOptions(
        guest=GuestConfig(memory=memory, vcpus=VCPUS, workload=parse_workload("idle")),
        params=MigrationParams(batching=mode, throttle=ThrottleKind.NONE,
                               downtime_limit_ms=DOWNTIME_LIMIT_MS))
    load = os.getloadavg()[0]
    try:
        rep = migrate_local_or_remote(opts)
    except MigrationFailed as e:
        return Run(system="cvmig", mode=mode.value, status="failed", error=str(e), load=load)
    ram = rep.get("ram", {})
    verify = rep.get("verify", {})
    return Run(system="cvmig", mode=mode.value, status=str(rep.get("status")),
               total_ms=float(rep.get("total-time", 0)),
               downtime_ms=float(rep.get("downtime", 0)),
               setup_ms=float(rep.get("setup-time", 0)),
               transferred=int(ram.get("transferred", 0)),
               rounds=int(ram.get("dirty-sync-count", 0)), mbps=float(ram.get("mbps", 0)),
               verified=verify.get("memory") == "match", load=load,
               extra={"psp": rep.get("psp"), "x-switchover": rep.get("x-switchover")})


# ---------------------------------------------------------------- plot


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Total time per system/mode (log scale), each bar labelled with its ratio to QEMU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cvmig.bench.plots import _save

    sel = [r for r in rows if "total_ms" in r]
    labels = [("QEMU\nprecopy" if r["system"] == "qemu" else f"cvmig\n{r['mode']}")
              + (f"\n({r['completed']}/{r['runs']} ok)" if r["completed"] < r["runs"] else "")
              for r in sel]
    colors = ["tab:gray" if r["system"] == "qemu" else "tab:blue" for r in sel]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, ratio, title in ((a, "total_ms", "time_vs_qemu", "total time (ms)"),
                                  (b, "downtime_ms", "downtime_vs_qemu", "downtime (ms)")):
        bars = ax.bar(range(len(sel)), [r[key] for r in sel], color=colors)
        ax.set_xticks(range(len(sel)), labels, fontsize=8)
        if key == "total_ms":  # cvmig's modes span more than a decade above QEMU
            ax.set_yscale("log")
        else:
            ax.axhline(DOWNTIME_LIMIT_MS, color="tab:red", lw=0.8, ls="--",
                       label="downtime-limit")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        for bar, r in zip(bars, sel, strict=True):
            if ratio in r:
                ax.annotate(f"×{r[ratio]:.2f}", (bar.get_x() + bar.get_width() / 2,
                                                 bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    fig.suptitle("cvmig bench qemu — idle guest, loopback; ×: ratio to QEMU (gray)",
                 fontsize=10)
    return Path(_save(fig, path))


# ---------------------------------------------------------------- the command


class _Tee:
    """Echo to the terminal and to the log file, line by line (a crash keeps the log)."""

    def __init__(self, log: IO[str]) -> None:
        self.log = log

    def __call__(self, line: str) -> None:
        click.echo(line)
        self.log.write(line + "\n")
        self.log.flush()


@contextlib.contextmanager
def _log(path: Path) -> Iterator[_Tee]:
    with path.open("w") as f:
        yield _Tee(f)


def _size(text: str, what: str) -> int:
    from cvmig.guest.cli import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=what) from None


@click.command()
@click.option("-m", "--memory", default="1G", show_default=True,
              help="Guest memory, both sides (e.g. 512M, 1G).")
@click.option("--fill", default=None,
              help="Non-zero data the QEMU guest writes (default: 3/4 of --memory, leaving "
                   "the kernel at least 160 MiB).")
@click.option("--reps", type=click.IntRange(1, 50), default=1, show_default=True,
              help="Migrations per system/mode; medians are reported.")
@click.option("--modes", default=None,
              help="Comma list of cvmig batching modes (default: every mode cvmig has).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("docs/results/qemu.json"), show_default=True,
              help="Results; the log (.log) and plot (.png) go beside it.")
@click.option("--plot", "want_plot", is_flag=True, help="Also write a bar chart (.png).")
@click.option("--qemu", "qemu_bin", default=QEMU_BIN, show_default=True,
              help="The QEMU binary (9.0 or newer).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=CACHE_DIR, show_default=True, help="Where the built guest is kept.")
@click.option("--install", "do_install", is_flag=True,
              help="First install QEMU >= 9.0, busybox-static and gcc with apt-get (root).")
def qemu(memory: str, fill: str | None, reps: int, modes: str | None, json_path: Path,
         want_plot: bool, qemu_bin: str, cache_dir: Path, do_install: bool) -> None:
    """QEMU's pre-copy and cvmig's batching modes, same guest size, measured side by side."""
    mem = _size(memory, "--memory")
    fill_b = _size(fill, "--fill") if fill is not None else default_fill(mem)
    try:
        check_sizes(mem, fill_b)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--memory/--fill") from None
    try:
        from cvmig.guest.memory import check_size

        check_size(mem)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--memory") from None
    try:
        batchings = parse_modes(modes)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--modes") from None
    if do_install:
        install(click.echo)
    problems = missing_tools(qemu_bin, need_build=not guest_cached(cache_dir))
    if problems:
        raise click.ClickException("cannot run QEMU's side here:\n  - " + "\n  - ".join(problems)
                                   + "\n" + INSTALL_HELP)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with _log(json_path.with_suffix(".log")) as echo:
        version = ".".join(map(str, qemu_version(qemu_bin) or ()))
        echo(machine_line())
        echo(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start "
             "(other work on this machine slows every run; each run's is in the JSON)")
        echo(f"QEMU {version} (TCG, {VCPUS} vCPUs, loopback, destination -mem-prealloc, "
             f"max-bandwidth {MAX_BANDWIDTH >> 30} GiB/s, downtime-limit {DOWNTIME_LIMIT_MS} ms); "
             f"guest {mem // MiB} MiB, {fill_b // MiB} MiB filled, idle")
        echo(f"cvmig: idle guest of {mem // MiB} MiB, {VCPUS} vCPUs, throttle none, "
             f"modes {', '.join(b.value for b in batchings)}; {reps} rep(s) each")
        guest = build_guest(cache_dir, echo)
        echo(f"guest: {guest.kernel}, {guest.initrd}")
        runs = run_qemu(qemu_bin, guest, mem, fill_b, reps, echo)
        for b in batchings:
            for rep in range(reps):
                r = run_cvmig(b, mem)
                runs.append(r)
                echo(f"  cvmig  {b.value:8} rep {rep}: {r.status}, total {r.total_ms:.0f} ms, "
                     f"downtime {r.downtime_ms:.0f} ms, {r.transferred / MiB:.1f} MiB, "
                     f"verified {r.verified}, load {r.load:.1f}"
                     + (f" ({r.error})" if r.error else ""))
        rows = compare(runs)
        echo("")
        echo(format_table(rows))
        meta = {"machine": machine_info(), "qemu_version": version, "memory_mib": mem // MiB,
                "qemu_fill_mib": fill_b // MiB, "vcpus": VCPUS, "reps": reps,
                "qemu_max_bandwidth": MAX_BANDWIDTH, "downtime_limit_ms": DOWNTIME_LIMIT_MS,
                "modes": [b.value for b in batchings], "kernel": guest.kernel.name}
        json_path.write_text(json.dumps({"meta": meta, "summary": rows,
                                         "runs": [asdict(r) for r in runs]}, indent=1) + "\n")
        echo(f"wrote {json_path}, {json_path.with_suffix('.log')}")
        if want_plot:
            echo(f"wrote {plot(rows, json_path.with_suffix('.png'))}")
