"""The ``sqlite`` workload: a SQLite database kept in private guest pages, under TPC-B.

Each vCPU owns one database stored in its own part of guest RAM through an apsw VFS: file
page k is guest frame ``ram[k]``, read and written through the VEK (decrypt on read,
encrypt on write), so the database exists only as ciphertext at rest. The file size lives
in the vCPU state blob. The connection runs with ``locking_mode=EXCLUSIVE`` and
``journal_mode=MEMORY``: a transaction is all written to the file at COMMIT, and a vCPU is
paused only between slices, so no transaction straddles a pause and the file in memory is
always a committed database.

Transaction i (1, 2, ...) is a pure function of (seed, vCPU, i): account, teller, branch,
delta. The ledger is the ``history`` table (hid = i) plus the count of committed
transactions in the state blob; `check` runs ``PRAGMA integrity_check`` and replays all of
them: every one present and exact, and every balance equal to the sum of its deltas.

So that the database stays bounded however long the guest runs, the oldest history rows
are folded, in a transaction of their own, into ``ledger(upto, hash)``: the sum (mod 2**64)
of a 64-bit hash of each folded row. `check` recomputes that sum from the replay, so folded
transactions are still each accounted for.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import apsw
import numpy as np

from cvmig.guest.workloads import _GOLDEN, PAGE_SIZE, Workload, WorkloadSpec, mix64

if TYPE_CHECKING:
    from cvmig.guest.vcpu import VcpuContext

DB_NAME = "guest.db"
# Plaintext in every database (also SQLite's own header): tests search ciphertext for it.
CANARY = "CVMIG-SECRET-LEDGER"
_FILLER = (CANARY + "-") * 4
_ACCOUNTS_PER_BRANCH = 100_000  # TPC-B scaling
_TELLERS_PER_BRANCH = 10

_TXN = (
    "BEGIN;"
    "UPDATE accounts SET abalance = abalance + :d WHERE aid = :a;"
    "SELECT abalance FROM accounts WHERE aid = :a;"
    "UPDATE tellers SET tbalance = tbalance + :d WHERE tid = :t;"
    "UPDATE branches SET bbalance = bbalance + :d WHERE bid = :b;"
    "INSERT INTO history(hid, tid, bid, aid, delta, mtime) VALUES (:i, :t, :b, :a, :d, :i);"
    "COMMIT;"
)


_H = (np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9), np.uint64(0x27D4EB2F165667C5),
      np.uint64(0x85EBCA77C2B2AE63))


def row_hash(hid: np.ndarray, tid: np.ndarray, bid: np.ndarray, aid: np.ndarray, delta: np.ndarray) -> int:
    """Sum mod 2**64 of a hash of each history row (order-free, vectorised), as int64."""
    u = np.uint64
    x = hid.astype(u) * _GOLDEN
    x ^= aid.astype(u) * _H[0]
    x ^= tid.astype(u) * _H[1]
    x ^= bid.astype(u) * _H[2]
    x ^= (delta + 2**32).astype(u) * _H[3]
    total = mix64(x).sum(dtype=u) if len(x) else u(0)
    return int(np.array(total, dtype=u).view(np.int64))


def _add64(a: int, b: int) -> int:
    """a + b mod 2**64, as a signed 64-bit value (SQLite's INTEGER)."""
    r = (a + b) & (2**64 - 1)
    return r - 2**64 if r >= 2**63 else r


def pages_needed(accounts: int) -> int:
    """Database pages for ``accounts`` rows (about 150 B each) plus room for a ledger."""
    return accounts * 150 // PAGE_SIZE + 512


def _scale(accounts: int) -> tuple[int, int]:
    branches = max(1, -(-accounts // _ACCOUNTS_PER_BRANCH))
    return branches, branches * _TELLERS_PER_BRANCH


class GuestFile:
    """An apsw VFS file whose bytes are private guest pages (encrypted at rest)."""

    def __init__(self, owner: SqliteWorkload) -> None:
        self.w = owner

    def xRead(self, amount: int, offset: int) -> bytes:
        size = self.w.file_size
        if offset >= size:
            return b""
        end = min(offset + amount, size)
        p0, p1 = offset // PAGE_SIZE, (end - 1) // PAGE_SIZE + 1
        plain = self.w.ctx.read_private(self.w.ctx.ram[p0:p1])
        # a short read: SQLite zero-fills the rest
        return plain.reshape(-1)[offset - p0 * PAGE_SIZE : end - p0 * PAGE_SIZE].tobytes()

    def xWrite(self, data: bytes, offset: int) -> None:
        ctx = self.w.ctx
        end = offset + len(data)
        p0, p1 = offset // PAGE_SIZE, (end - 1) // PAGE_SIZE + 1
        if p1 > len(ctx.ram):
            raise apsw.FullError(f"guest database full: {p1} pages > {len(ctx.ram)} of guest RAM")
        pfns = ctx.ram[p0:p1]
        src = np.frombuffer(data, dtype=np.uint8)
        if offset % PAGE_SIZE == 0 and len(data) % PAGE_SIZE == 0:
            plain = src.reshape(-1, PAGE_SIZE)
        else:
            # read-modify-write of partial pages (pages past EOF start as zeros)
            plain = np.zeros((p1 - p0, PAGE_SIZE), dtype=np.uint8)
            have = max(0, min(p1, -(-self.w.file_size // PAGE_SIZE)) - p0)
            if have:
                ctx.read_private(pfns[:have], plain[:have])
            plain.reshape(-1)[offset - p0 * PAGE_SIZE : end - p0 * PAGE_SIZE] = src
        ctx.write_private(pfns, plain)
        self.w.file_size = max(self.w.file_size, end)

    def xFileSize(self) -> int:
        return self.w.file_size

    def xTruncate(self, newsize: int) -> None:
        self.w.file_size = min(self.w.file_size, newsize)

    def xSync(self, flags: int) -> None:
        pass  # guest memory is the medium: a write is durable as soon as it is done

    def xLock(self, level: int) -> None:
        pass  # one process per database (locking_mode=EXCLUSIVE)

    def xUnlock(self, level: int) -> None:
        pass

    def xCheckReservedLock(self) -> bool:
        return False

    def xFileControl(self, op: int, ptr: int) -> bool:
        return False

    def xSectorSize(self) -> int:
        return PAGE_SIZE

    def xDeviceCharacteristics(self) -> int:
        return int(apsw.mapping_device_characteristics["SQLITE_IOCAP_ATOMIC4K"]) | int(
            apsw.mapping_device_characteristics["SQLITE_IOCAP_SAFE_APPEND"]
        )

    def xClose(self) -> None:
        pass


class GuestVFS(apsw.VFS):
    """Opens the database in guest memory; anything else (temp files) goes to the default
    VFS — with temp_store=MEMORY and journal_mode=MEMORY there should be none."""

    def __init__(self, name: str, owner: SqliteWorkload) -> None:
        self.owner = owner
        super().__init__(name, "")

    def xOpen(self, name: Any, flags: list[int]) -> Any:
        fname = name.filename() if isinstance(name, apsw.URIFilename) else name
        if fname is not None and fname.endswith(DB_NAME):
            return GuestFile(self.owner)
        return super().xOpen(name, flags)

    def xAccess(self, pathname: str, flags: int) -> bool:
        if pathname.endswith(DB_NAME):
            return self.owner.file_size > 0
        if pathname.endswith((DB_NAME + "-journal", DB_NAME + "-wal")):
            return False
        return bool(super().xAccess(pathname, flags))

    def xDelete(self, filename: str, syncdir: bool) -> None:
        if filename.endswith(DB_NAME):
            self.owner.file_size = 0
            return
        if filename.endswith((DB_NAME + "-journal", DB_NAME + "-wal")):
            return
        super().xDelete(filename, syncdir)

    def xFullPathname(self, name: str) -> str:
        return name if name.startswith("/") else "/" + name


class SqliteWorkload(Workload):
    def __init__(self, spec: WorkloadSpec, ctx: VcpuContext) -> None:
        super().__init__(spec, ctx)
        p = spec.as_dict()
        self.accounts = int(p["accounts"])
        self.branches, self.tellers = _scale(self.accounts)
        self.rate = float(p["rate"]) / ctx.nvcpus  # transactions/s of run time, this vCPU
        self.seed = np.uint64((int(p["seed"]) * 0x100000001B3 + 7919 * (ctx.index + 1)) % 2**64)
        self.committed = 0  # the ledger's length: transactions known committed
        self.keep = int(p["keep"])  # history rows kept unfolded (at least)
        self.folded = 0  # history rows 1..folded live on only in ledger.hash
        self.file_size = 0
        self.vfs_name = f"cvmig-guest-{ctx.index}-{id(self):x}"
        self.vfs = GuestVFS(self.vfs_name, self)
        self.db: apsw.Connection | None = None

    # -- deterministic transactions
    def txns(self, i0: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(aid, tid, bid, delta) of transactions i0 .. i0+n-1 (1-based ids)."""
        i = np.arange(i0, i0 + n, dtype=np.uint64)
        u = mix64(i * _GOLDEN + self.seed)
        aid = (u % np.uint64(self.accounts)).astype(np.int64) + 1
        tid = ((u >> np.uint64(24)) % np.uint64(self.tellers)).astype(np.int64) + 1
        bid = (tid - 1) // _TELLERS_PER_BRANCH + 1
        delta = ((u >> np.uint64(40)) % np.uint64(10001)).astype(np.int64) - 5000
        return aid, tid, bid, delta

    def _open(self) -> apsw.Connection:
        db = apsw.Connection(DB_NAME, vfs=self.vfs_name)
        # exhaust the cursor: apsw runs later statements only as earlier rows are read
        for _ in db.execute(
            "PRAGMA locking_mode=EXCLUSIVE; PRAGMA journal_mode=MEMORY; PRAGMA synchronous=OFF;"
            "PRAGMA temp_store=MEMORY; PRAGMA cache_size=-16384;"
        ):
            pass
        return db

    def boot(self) -> None:
        db = self.db = self._open()
        a, b, t = self.accounts, self.branches, self.tellers
        db.execute(
            "PRAGMA page_size=4096;"
            "CREATE TABLE branches(bid INTEGER PRIMARY KEY, bbalance INTEGER NOT NULL, filler TEXT);"
            "CREATE TABLE tellers(tid INTEGER PRIMARY KEY, bid INTEGER NOT NULL, tbalance INTEGER NOT NULL, filler TEXT);"
            "CREATE TABLE accounts(aid INTEGER PRIMARY KEY, bid INTEGER NOT NULL, abalance INTEGER NOT NULL, filler TEXT);"
            "CREATE TABLE history(hid INTEGER PRIMARY KEY, tid INTEGER, bid INTEGER, aid INTEGER, delta INTEGER, mtime INTEGER);"
            "CREATE TABLE ledger(id INTEGER PRIMARY KEY CHECK (id = 1), upto INTEGER NOT NULL, hash INTEGER NOT NULL);"
            "INSERT INTO ledger VALUES(1, 0, 0);"
        )
        with db:
            db.executemany("INSERT INTO branches VALUES(?, 0, ?)", ((i, _FILLER) for i in range(1, b + 1)))
            db.executemany(
                "INSERT INTO tellers VALUES(?, ?, 0, ?)",
                ((i, (i - 1) // _TELLERS_PER_BRANCH + 1, _FILLER) for i in range(1, t + 1)),
            )
            db.executemany(
                "INSERT INTO accounts VALUES(?, ?, 0, ?)",
                ((i, (i - 1) // _ACCOUNTS_PER_BRANCH + 1, _FILLER) for i in range(1, a + 1)),
            )

    def step(self, vtime: float, deadline: float, quota: int | None) -> None:
        db = self.db
        assert db is not None
        if self.rate > 0:
            want = int(self.rate * (vtime + 0.010)) - self.committed
            budget = max(0, min(want, int(self.rate * 0.020) + 1))
        else:
            budget = 1 << 62
        start_pages = self.ctx.pages_written
        if self.committed - self.folded >= 2 * self.keep:
            self._fold(self.committed - self.keep)
        chunk = 64
        while budget > 0:
            n = min(chunk, budget)
            aid, tid, bid, delta = self.txns(self.committed + 1, n)
            for k in range(n):
                if quota is not None and self.ctx.pages_written - start_pages >= quota:
                    budget = 0
                    break
                i = self.committed + 1
                args = {"d": int(delta[k]), "a": int(aid[k]), "t": int(tid[k]), "b": int(bid[k]), "i": i}
                try:
                    for _ in db.execute(_TXN, args):
                        pass
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")  # nothing half-done stays in the database
                    raise
                self.committed = i  # COMMIT returned: the transaction is in the ledger
                self.ctx.ops += 1
                budget -= 1
                if time.monotonic() >= deadline:
                    budget = 0
                    break
        self.ctx.io_write()

    def _fold(self, upto: int) -> None:
        """Fold history rows folded+1 .. upto into the ledger hash, in one transaction."""
        db = self.db
        assert db is not None
        with db:
            rows = np.array(
                list(db.execute("SELECT hid, tid, bid, aid, delta FROM history WHERE hid <= ?", (upto,))),
                dtype=np.int64,
            ).reshape(-1, 5)
            (old,) = db.execute("SELECT hash FROM ledger WHERE id = 1").fetchone()  # type: ignore[misc]
            new = _add64(int(old), row_hash(*rows.T))
            db.execute("UPDATE ledger SET upto = ?, hash = ? WHERE id = 1", (upto, new))
            db.execute("DELETE FROM history WHERE hid <= ?", (upto,))
        self.folded = upto

    def export_state(self) -> dict[str, Any]:
        return {"committed": self.committed, "file_size": self.file_size}

    def import_state(self, state: dict[str, Any]) -> None:
        self.committed = int(state["committed"])
        self.file_size = int(state["file_size"])
        self.db = self._open()
        (self.folded,) = self.db.execute("SELECT upto FROM ledger WHERE id = 1").fetchone()  # type: ignore[misc]

    def check(self) -> dict[str, Any]:
        db = self.db
        assert db is not None
        problems: list[str] = []
        integrity = [r[0] for r in db.execute("PRAGMA integrity_check")]
        if integrity != ["ok"]:
            problems.append(f"integrity_check: {integrity[:5]}")
        n = self.committed
        upto, lhash = db.execute("SELECT upto, hash FROM ledger WHERE id = 1").fetchone()  # type: ignore[misc]
        rows = np.array(list(db.execute("SELECT hid, tid, bid, aid, delta FROM history ORDER BY hid")), dtype=np.int64)
        rows = rows.reshape(-1, 5)
        aid, tid, bid, delta = self.txns(1, n)
        hid = np.arange(1, n + 1, dtype=np.int64)
        if not 0 <= upto <= n:
            problems.append(f"ledger folded up to {upto} but only {n} transactions were committed")
        elif lhash != row_hash(hid[:upto], tid[:upto], bid[:upto], aid[:upto], delta[:upto]):
            problems.append(f"ledger hash over transactions 1..{upto} does not match the replay")
        elif len(rows) != n - upto:
            problems.append(f"history has {len(rows)} rows; {n - upto} expected ({n} committed, {upto} folded)")
        else:
            expect = np.stack([hid, tid, bid, aid, delta], axis=1)[upto:]
            wrong = np.flatnonzero(np.any(rows != expect, axis=1))
            if len(wrong):
                problems.append(f"{len(wrong)} history rows differ, first hid {int(rows[wrong[0], 0])}")
        for table, key, col, ids, count in (
            ("accounts", "aid", "abalance", aid, self.accounts),
            ("tellers", "tid", "tbalance", tid, self.tellers),
            ("branches", "bid", "bbalance", bid, self.branches),
        ):
            bal = np.zeros(count + 1, dtype=np.int64)
            np.add.at(bal, ids, delta)
            got = np.zeros(count + 1, dtype=np.int64)
            for k, v in db.execute(f"SELECT {key}, {col} FROM {table}"):
                got[k] = v
            if not np.array_equal(bal, got):
                problems.append(f"{table}: {int(np.count_nonzero(bal != got))} balances wrong")
        return {"ok": not problems, "committed": n, "folded": upto, "integrity": integrity[:5], "problems": problems}

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        self.vfs.unregister()
