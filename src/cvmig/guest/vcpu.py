"""A vCPU: one OS process inside the guest's trust boundary.

It fetches the guest's VEK from the PSP itself (emulating the memory controller: only
vCPUs ever hold it), maps guest memory, and runs its workload in 10 ms timeslices. Between
slices, and only there, it serves the hypervisor's commands (pause, resume, measure, digest,
check, stop), so a paused vCPU never has a write in flight. At pause it saves its state
blob into its VMSA page, encrypted like any private page (SEV-ES: the hypervisor never
sees registers); `restore` starts from that blob.

Work that grows with memory (measure, check) stamps the control block's ``busy`` field
every chunk: the hypervisor waits for it as long as the stamp moves, not for a fixed time.
A digest is computed by every vCPU measuring its share of the frames; the shares' values
travel sealed under a VEK-derived key through the hypervisor to one vCPU, which hashes them.

Throttle is QEMU's: after each 10 ms slice of run time, sleep p/(1-p) x 10 ms (less any
oversleep of earlier slices, so the run fraction stays 1 - p on a loaded box). Workload
rates are per second of *run time*, so throttle p cuts a dirtier's rate to (1-p) x rate.
The dirty limit is a wall-clock quota of pages/s (QEMU dirty-limit), a token bucket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cvmig.guest import control as ctl
from cvmig.guest.memory import PAGE_SIZE, PRIVATE, SHARED, GuestMemory
from cvmig.guest.workloads import MAGIC_IO, WorkloadSpec, bad_pages, make_pages, make_workload
from cvmig.psp.measure import compose, page_measure
from cvmig.psp.memcrypt import MemoryCipher

SLICE = 0.010
VMSA_MAGIC = b"CVMIGVMSA\x00"
_CHUNK = 2048  # pages per vectorised decrypt when walking memory
# a digest's walk: ~1 MiB buffers stay in a core's L2, so vCPUs measuring side by side do
# not contend for memory bandwidth (2048 pages cost 15-20 % more CPU with two at once)
_MEASURE_CHUNK = 256


def fetch_vek(psp_socket: str, handle: int) -> bytes:
    """The memory controller's key fetch, straight from the PSP: only vCPU processes call
    this, so the key never passes through the hypervisor."""
    from cvmig.psp.mailbox import fetch_memory_key

    return bytes(fetch_memory_key(psp_socket, handle))


@dataclass(frozen=True)
class VcpuSpec:
    """Everything a vCPU process needs (picklable, no secrets)."""

    index: int
    nvcpus: int
    mem_name: str
    npages: int
    ctl_name: str
    psp_socket: str
    handle: int
    tracker: str  # "uffd" | "dmap"
    mode: str  # "boot" | "restore" | "standby" (a restore that waits for "go")
    workload: WorkloadSpec
    ram_start: int
    ram_count: int
    io_pfns: tuple[int, ...]
    vmsa_pfn: int


def _nothing() -> None:
    pass


class VcpuContext:
    """A workload's window on guest memory: private pages go through the VEK."""

    def __init__(self, spec: VcpuSpec, mem: GuestMemory, cipher: MemoryCipher, dmap: np.ndarray | None) -> None:
        self.index = spec.index
        self.nvcpus = spec.nvcpus
        self.mem = mem
        self.pages = mem.pages
        self.cipher = cipher
        self.dmap = dmap  # byte-per-page dirty map, marked after each write (dmap tracker)
        self.ram = np.arange(spec.ram_start, spec.ram_start + spec.ram_count, dtype=np.int64)
        self.io = np.asarray(spec.io_pfns, dtype=np.int64)
        self.vmsa_pfn = spec.vmsa_pfn
        self.ops = 0
        self.pages_written = 0
        self.io_count = 0
        self._ct = np.empty((0, PAGE_SIZE), dtype=np.uint8)
        # called as reads go by; the vCPU points it at its progress stamp while it serves
        # long work (a check), so the hypervisor's wait can tell busy from hung
        self.tick: Callable[[], None] = _nothing

    def _buf(self, n: int) -> np.ndarray:
        if len(self._ct) < n:
            self._ct = np.empty((max(n, 256), PAGE_SIZE), dtype=np.uint8)
        return self._ct[:n]

    def _mark(self, pfns: np.ndarray | slice) -> None:
        # writer marks after writing (the harvester clears before reading)
        if self.dmap is not None:
            self.dmap[pfns] = 1

    def write_private(self, pfns: np.ndarray, plain: np.ndarray) -> None:
        """Encrypt ``plain`` (n, 4096) under the VEK into private frames ``pfns``."""
        n = len(pfns)
        if n == 0:
            return
        first = int(pfns[0])
        if int(pfns[-1]) - first == n - 1 and (n == 1 or bool(np.all(np.diff(pfns) == 1))):
            # contiguous: encrypt straight into guest memory
            self.cipher.encrypt_pages(pfns, plain, self.pages[first : first + n])
            self._mark(slice(first, first + n))
        else:
            ct = self._buf(n)
            self.cipher.encrypt_pages(pfns, plain, ct)
            self.pages[pfns] = ct
            self._mark(pfns)
        self.pages_written += n

    def read_private(self, pfns: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        n = len(pfns)
        if out is None:
            out = np.empty((n, PAGE_SIZE), dtype=np.uint8)
        first = int(pfns[0]) if n else 0
        if n and int(pfns[-1]) - first == n - 1:
            src = self.pages[first : first + n]
        else:
            src = self.pages[pfns]
        self.cipher.decrypt_pages(pfns, src, out)
        self.tick()
        return out

    def iter_private(self, pfns: np.ndarray, chunk: int = _CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        buf = np.empty((min(chunk, max(1, len(pfns))), PAGE_SIZE), dtype=np.uint8)
        for i in range(0, len(pfns), chunk):
            p = pfns[i : i + chunk]
            yield p, self.read_private(p, buf[: len(p)])

    # -- shared "I/O buffer" pages: plaintext, like a virtio ring the guest exposes
    def io_write(self) -> None:
        m = len(self.io)
        if m == 0:
            return
        pfn = self.io[self.io_count % m : self.io_count % m + 1]
        buf = self._buf(1)
        make_pages(MAGIC_IO, pfn, np.array([self.io_count + 1], dtype=np.uint64), self.index, buf)
        self.pages[pfn] = buf
        self._mark(pfn)
        self.io_count += 1
        self.pages_written += 1

    def io_check(self) -> dict[str, Any]:
        m = len(self.io)
        if m == 0:
            return {"ok": True, "io_pages": 0}
        k = np.arange(m, dtype=np.int64)
        c = self.io_count
        # page k holds the last I/O record number v (1-based) with (v - 1) % m == k
        ver = np.where(k < c, c - 1 - ((c - 1 - k) % m) + 1, 0)
        mask = bad_pages(MAGIC_IO, self.io, ver, self.index, self.pages[self.io])
        states_ok = bool(np.all(self.mem.page_state[self.io] == SHARED))
        return {"ok": (not mask.any()) and states_ok, "io_pages": m, "io_bad": int(mask.sum())}

    # -- the VMSA page: the vCPU state blob, encrypted as a private page
    def save_vmsa(self, state: dict[str, Any]) -> None:
        body = json.dumps(state, sort_keys=True).encode()
        page = np.zeros((1, PAGE_SIZE), dtype=np.uint8)
        head = VMSA_MAGIC + len(body).to_bytes(4, "little")
        if len(head) + len(body) > PAGE_SIZE:
            raise ValueError(f"vCPU state blob of {len(body)} bytes does not fit the VMSA page")
        page[0, : len(head) + len(body)] = np.frombuffer(head + body, dtype=np.uint8)
        self.write_private(np.array([self.vmsa_pfn], dtype=np.int64), page)

    def load_vmsa(self) -> dict[str, Any]:
        page = self.read_private(np.array([self.vmsa_pfn], dtype=np.int64))[0].tobytes()
        if not page.startswith(VMSA_MAGIC):
            raise ValueError(f"VMSA page {self.vmsa_pfn} holds no vCPU state (wrong key or never saved)")
        n = int.from_bytes(page[len(VMSA_MAGIC) : len(VMSA_MAGIC) + 4], "little")
        start = len(VMSA_MAGIC) + 4
        state: dict[str, Any] = json.loads(page[start : start + n])
        return state


def share(npages: int, parts: int, k: int) -> tuple[int, int]:
    """Frames [lo, hi) that vCPU ``k`` of ``parts`` measures: the whole memory (RAM, shared
    and VMSA pages alike) split evenly."""
    return k * npages // parts, (k + 1) * npages // parts


def measure_frames(mem: GuestMemory, cipher: MemoryCipher, lo: int, hi: int,
                   tick: Callable[[], None] = lambda: None) -> np.ndarray:
    """(hi - lo, 2) uint64 per-page values (`cvmig.psp.measure.page_measure`) of frames
    [lo, hi): private pages measured from their plaintext, shared pages zero. ``tick`` runs
    after every chunk, so a waiter can tell this long walk from a hung vCPU."""
    values = np.zeros((hi - lo, 2), dtype=np.uint64)
    buf = np.empty((_MEASURE_CHUNK, PAGE_SIZE), dtype=np.uint8)
    for i in range(lo, hi, _MEASURE_CHUNK):
        j = min(i + _MEASURE_CHUNK, hi)
        pfns = np.arange(i, j, dtype=np.int64)
        out = buf[: j - i]
        cipher.decrypt_pages(pfns, mem.pages[i:j], out)
        private = mem.page_state[i:j] == PRIVATE
        values[i - lo : j - lo][private] = page_measure(out[private], pfns[private])
        tick()
    return values


class Sealer:
    """Messages between vCPUs, relayed by the hypervisor: AES-256-GCM under a key derived
    from the VEK, so the relay sees ciphertext only and cannot alter, reorder or replay
    them. (Real vCPUs would talk through private memory, encrypted under the VEK.)"""

    def __init__(self, vek: bytes) -> None:
        self._aead = AESGCM(hmac.new(vek, b"cvmig vCPU-to-vCPU messages", hashlib.sha256).digest())

    def seal(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        return self._aead.decrypt(blob[:12], blob[12:], aad)


def _part_aad(tag: bytes, lo: int, hi: int) -> bytes:
    return b"measure" + tag + lo.to_bytes(8, "little") + hi.to_bytes(8, "little")


def combine_digest(mem: GuestMemory, sealer: Sealer, tag: bytes, parts: list[tuple[int, int, bytes]]) -> str:
    """The guest's memory digest (`cvmig.psp.measure`) from sealed per-share values that
    must tile every frame in order. SHA-256 is sequential, so the shares' values (16 bytes
    a page) are hashed here, one after the other; the expensive part, decrypting and
    measuring the pages, was done by every vCPU in parallel. A destination's PSP computes
    the same while importing pages, so the two can be compared."""
    h = hashlib.sha256()
    at = 0
    for lo, hi, blob in parts:
        if lo != at or hi < lo:
            raise ValueError(f"measured shares do not tile the memory: [{lo}, {hi}) after frame {at}")
        try:
            raw = sealer.open(blob, _part_aad(tag, lo, hi))
        except InvalidTag:
            raise ValueError(f"the measurement of frames [{lo}, {hi}) was altered in transit") from None
        if len(raw) != (hi - lo) * 16:
            raise ValueError(f"the measurement of frames [{lo}, {hi}) has {len(raw)} bytes")
        h.update(raw)
        at = hi
    if at != mem.npages:
        raise ValueError(f"measured shares cover frames [0, {at}) of {mem.npages}")
    return compose(h.digest(), mem.pages, mem.page_state)


def _attach(spec: VcpuSpec, populate: bool = True) -> GuestMemory:
    mem = GuestMemory.attach(spec.mem_name, spec.npages)
    if populate:
        mem.populate()  # our page tables, now: no first-touch faults while running
    return mem


class _Vcpu:
    def __init__(self, spec: VcpuSpec, conn: Connection, mem: GuestMemory | None = None,
                 block: ctl.ControlBlock | None = None) -> None:
        self.spec = spec
        self.conn = conn
        self.block = block or ctl.ControlBlock.attach(spec.ctl_name, spec.nvcpus, spec.npages)
        self.me = self.block.vcpu[spec.index : spec.index + 1]
        self.ring = self.block.ring[spec.index]
        self.mem = mem if mem is not None else _attach(spec)
        vek = fetch_vek(spec.psp_socket, spec.handle)
        self.cipher = MemoryCipher(vek)
        self.sealer = Sealer(vek)
        del vek
        self.writer = None
        if spec.tracker == "uffd":
            from cvmig.guest.uffd import UffdWriter

            # our own registration of our own mapping; the fd stays open until we exit
            self.writer = UffdWriter(self.mem.address, self.mem.size)
        self.ctx = VcpuContext(spec, self.mem, self.cipher, self.block.dmap if spec.tracker == "dmap" else None)
        self.workload = make_workload(spec.workload, self.ctx)
        self.run_time = 0.0
        self.throttle_time = 0.0
        self.last_hb = 0.0
        self.paused = False
        self.paused_at = 0.0
        self.paused_time = 0.0  # total time spent paused: not run time, not throttle
        self.stop = False
        self.tokens = 0.0
        self.tokens_at = time.monotonic()
        self.thr_p = 0.0  # throttle in force, and run/sleep seconds since it was set
        self.thr_run = 0.0
        self.thr_slept = 0.0
        self.error: str | None = None

    # -- state
    def export_state(self) -> dict[str, Any]:
        return {
            "index": self.spec.index,
            "workload": str(self.spec.workload),
            "wl": self.workload.export_state(),
            "ops": self.ctx.ops,
            "pages_written": self.ctx.pages_written,
            "io_count": self.ctx.io_count,
            "run_time": self.run_time,
            "throttle_time": self.throttle_time,
            "last_heartbeat": self.last_hb,
        }

    def import_state(self, st: dict[str, Any]) -> None:
        if st.get("index") != self.spec.index or st.get("workload") != str(self.spec.workload):
            raise ValueError(
                f"VMSA of vCPU {st.get('index')} running {st.get('workload')!r} does not match "
                f"vCPU {self.spec.index} running {str(self.spec.workload)!r}"
            )
        self.ctx.ops = int(st["ops"])
        self.ctx.pages_written = int(st["pages_written"])
        self.ctx.io_count = int(st["io_count"])
        self.run_time = float(st["run_time"])
        self.throttle_time = float(st["throttle_time"])
        self.workload.import_state(st["wl"])
        # the source's last heartbeat opens our ring: the first gap is the switchover gap
        self.last_hb = float(st["last_heartbeat"])
        if self.last_hb > 0:
            self._heartbeat(self.last_hb)

    def _publish(self) -> None:
        m = self.me
        m["ops"] = self.ctx.ops
        m["pages_written"] = self.ctx.pages_written
        m["run_time"] = self.run_time
        m["throttle_time"] = self.throttle_time

    def _tick(self) -> None:
        self.me["busy"] = time.monotonic()

    def _heartbeat(self, now: float) -> None:
        n = int(self.me["hb_count"][0])
        self.ring[n % ctl.RING] = now
        self.me["heartbeat"] = now
        self.me["hb_count"] = n + 1
        self.last_hb = now

    # -- commands (served only between slices)
    def _serve(self, cmd: tuple[Any, ...]) -> None:
        op = cmd[0]
        if op == "pause":
            if not self.paused:
                self.ctx.save_vmsa(self.export_state())
                self.paused = True
                self.paused_at = time.monotonic()
                self._publish()
                self.me["state"] = ctl.PAUSED
            self.conn.send(("paused", None))
        elif op == "resume":
            if self.paused:
                self.paused = False
                now = time.monotonic()
                self.paused_time += now - self.paused_at
                self.tokens_at = now
                self.me["state"] = ctl.RUNNING
            self.conn.send(("ok", None))
        elif op == "measure":
            _, lo, hi, tag = cmd
            self._tick()
            values = measure_frames(self.mem, self.cipher, lo, hi, self._tick)
            self.conn.send(("ok", self.sealer.seal(values.tobytes(), _part_aad(tag, lo, hi))))
        elif op == "digest":
            _, tag, parts = cmd
            self._tick()
            try:
                self.conn.send(("ok", combine_digest(self.mem, self.sealer, tag, parts)))
            except ValueError as e:
                self.conn.send(("error", str(e)))
        elif op == "check":
            self._tick()
            self.ctx.tick = self._tick
            try:
                res = self.workload.check()
            except Exception as e:  # a check that cannot run is a failed check
                res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            finally:
                self.ctx.tick = _nothing
            io = self.ctx.io_check()
            res["io"] = io
            res["ok"] = bool(res["ok"]) and bool(io["ok"]) and self.error is None
            if self.error is not None:
                res["error"] = self.error
            self.conn.send(("ok", res))
        elif op == "unprotect":
            if self.writer is not None:
                self.writer.unprotect()
            self.conn.send(("ok", None))
        elif op == "stop":
            self.stop = True
            self.conn.send(("ok", None))
        else:
            self.conn.send(("error", f"unknown vCPU command {op!r}"))

    def _wait(self, until: float, throttle: float | None = None) -> None:
        """Sleep until ``until`` but serve commands meanwhile (pause interrupts the wait).
        A throttle sleep (``throttle`` = the p it was computed for) also ends early when
        the hypervisor changes the throttle."""
        while not self.stop:
            if self.paused:
                self._serve(self.conn.recv())
                continue
            rem = max(0.0, until - time.monotonic())
            if throttle is not None:
                if float(self.me["throttle"][0]) != throttle:
                    return
                rem = min(rem, 0.05)
            # poll even when the time is up: commands are served at every slice boundary
            if self.conn.poll(rem):
                self._serve(self.conn.recv())
            elif throttle is None or time.monotonic() >= until:
                return

    def run(self) -> None:
        spec = self.spec
        if spec.mode == "boot":
            if len(self.ctx.io):
                # the guest converts its I/O buffers to shared (plaintext) pages
                self.mem.pages[self.ctx.io] = 0
                self.mem.page_state[self.ctx.io] = SHARED
            self.workload.boot()
            self.me["state"] = ctl.RUNNING
        else:
            self.import_state(self.ctx.load_vmsa())
            self.paused = True
            self.paused_at = time.monotonic()
            self.me["state"] = ctl.PAUSED
        self.me["pid"] = os.getpid()
        self._publish()
        self.conn.send(("ready", {"pid": os.getpid(), "addr": self.mem.address, "len": self.mem.size}))
        while not self.stop:
            self._wait(0)  # commands, blocking while paused
            if self.stop:
                break
            self.slice()
        self.me["state"] = ctl.STOPPED

    def slice(self) -> None:
        t0 = time.monotonic()
        # the beat is where the guest reads its clock to begin work: after a resume that
        # is at once, so a switchover's gap ends when the vCPU runs, not a slice later
        self._heartbeat(t0)
        paused0 = self.paused_time
        me = self.me[0]
        limit = float(me["dirty_limit"])
        quota: int | None = None
        if limit >= 0:
            # wall-clock token bucket, at most 100 ms of burst
            self.tokens = min(self.tokens + limit * (t0 - self.tokens_at), max(1.0, limit * 0.1))
            self.tokens_at = t0
            quota = int(self.tokens)
        else:
            self.tokens, self.tokens_at = 0.0, t0
        deadline = t0 + SLICE
        before = self.ctx.pages_written
        if self.error is None:
            try:
                self.workload.step(self.run_time, deadline, quota)
            except Exception:
                self.error = traceback.format_exc(limit=4)
                self.me["failed"] = 1
        if quota is not None:
            self.tokens -= self.ctx.pages_written - before
        self._publish()
        self._wait(deadline)  # idle for the rest of the slice
        t1 = time.monotonic()
        ran = t1 - t0 - (self.paused_time - paused0)  # a pause inside the slice is not run time
        self.run_time += ran
        p = float(me["throttle"])
        if p != self.thr_p:
            self.thr_p, self.thr_run, self.thr_slept = p, 0.0, 0.0
        if p > 0:
            # QEMU cpu-throttle: sleep p/(1-p) of each timeslice. Sleeping on a loaded box
            # overshoots (the wake-up waits for a core), so sleep what is *due* since p was
            # set: the run fraction stays 1 - p, with at most 100 ms of overshoot credit.
            self.thr_run += ran
            due = self.thr_run * p / (1.0 - p) - self.thr_slept
            if due < -0.1:
                self.thr_slept += due + 0.1
                due = -0.1
            if due > 0:
                paused1 = self.paused_time
                self._wait(t1 + due, throttle=p)
                slept = time.monotonic() - t1 - (self.paused_time - paused1)
                self.thr_slept += slept
                self.throttle_time += slept
        self._publish()


def _where(e: BaseException) -> str:
    """``Type: message (at file:line in function)`` of the innermost frame."""
    frames = traceback.extract_tb(e.__traceback__)
    at = ""
    if frames:
        f = frames[-1]
        at = f" (at {os.path.basename(f.filename)}:{f.lineno} in {f.name})"
    return f"{type(e).__name__}: {e}{at}"


def _orphaned(spec: VcpuSpec, parent: int) -> None:
    """The hypervisor died without stopping us (kill -9): remove the shm names it would
    have removed, in case it died before it could. Harmless if they are gone already; the
    mappings (ours, the PSP's) stay valid until they are closed."""
    # a dying process closes its descriptors a moment before we are re-parented
    deadline = time.monotonic() + 1.0
    while os.getppid() == parent:
        if time.monotonic() > deadline:
            return  # it only closed our connection: it lives and cleans up itself
        time.sleep(0.01)
    for name in (spec.mem_name, spec.ctl_name):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join("/dev/shm", name))


def vcpu_main(spec: VcpuSpec, conn: Connection, parent: int | None = None) -> None:
    """Entry point of a vCPU process. ``parent``: the hypervisor's pid (our parent's at
    start); when it is gone we exit, since our connection to it reads end of file."""
    parent = os.getppid() if parent is None else parent
    try:
        _vcpu_main(spec, conn, parent)
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        _orphaned(spec, parent)  # the hypervisor went away


def _vcpu_main(spec: VcpuSpec, conn: Connection, parent: int) -> None:
    mem = None
    block = None
    if spec.mode == "standby":
        # a destination's vCPU, started while pages still arrive: the interpreter, the
        # imports and the page tables cost the downtime nothing. The key can only be had
        # after RECEIVE_FINISH, so it waits for "go" to restore.
        try:
            mem = _attach(spec, populate=False)
            block = ctl.ControlBlock.attach(spec.ctl_name, spec.nvcpus, spec.npages)
        except BaseException as e:
            conn.send(("error", f"vCPU {spec.index} failed to attach: {type(e).__name__}: {e}"))
            return
        # what "go" runs imports this: import it now, not in the downtime
        if spec.tracker == "uffd":
            import cvmig.guest.uffd  # noqa: F401
        conn.send(("standby", None))
        # our page tables fill on a thread while pages arrive (seconds for a large guest):
        # neither the first page nor "go" waits for it; it runs on until done
        mem.populate_in_background()
        if conn.recv() != ("go",):
            return
        spec = dataclasses.replace(spec, mode="restore")
    try:
        vcpu = _Vcpu(spec, conn, mem, block)
    except BaseException as e:
        conn.send(("error", f"vCPU {spec.index} failed to start: {type(e).__name__}: {e}"))
        return
    try:
        vcpu.run()
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        raise  # the hypervisor went away
    except BaseException as e:
        try:  # one line for whoever reports it: where and what, not the whole traceback
            conn.send(("error", f"vCPU {spec.index} crashed: {_where(e)}"))
        except OSError:
            pass
    finally:
        vcpu.workload.close()
        if vcpu.writer is not None:
            vcpu.writer.close()


if __name__ == "__main__":
    import faulthandler
    import signal
    import sys

    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <vcpu pid> dumps its stacks

    # the hypervisor's pid, from it: it may have died before we got here to ask
    _parent = int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid()
    _conn = Connection(int(sys.argv[1]))
    # what every mode runs: imported before we say we are warm, so that a vCPU started
    # ahead (cvmig.guest.pool) costs the migration that takes it nothing more
    import cvmig.psp.mailbox  # noqa: F401
    try:
        _conn.send(("warm", None))
        _spec = _conn.recv()
    except (EOFError, OSError, KeyboardInterrupt):
        sys.exit(0)  # the hypervisor was gone before it told us what to run
    vcpu_main(_spec, _conn, _parent)
