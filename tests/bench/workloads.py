"""Benchmark workloads: the data set on the host, and the request streams per workload.

Every in-flight slot runs one *stream*: ``first(sid)`` gives its first request and
``next(sid, reply)`` checks the reply and gives the following one (``None`` ends the
stream).  Independent workloads ignore the previous reply except to check it; dependent
ones (CREATE -> RELEASE -> UNLINK, READDIRPLUS offsets) carry state per stream.  An op is
one FUSE request on a request queue; FORGETs go to the hiprio queue (``forgets``) and are
not counted, as the kernel sends them there.
"""
from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass

from tests.support import fuse_client as fc
from tests.support.fuse_client import Op, Reply, VirtioFsConnection

MiB = 1 << 20
KiB = 1 << 10
ROOT = 1

READ_FILE = "read.bin"           # each 4 KiB block starts with its block number (u64)
WRITE_FILE = "write.bin"
READ_SIZE = 256 * MiB
WRITE_SIZE = 256 * MiB
RAND_SPAN = 64 * MiB             # 4 KiB random I/O stays in the first 64 MiB
LOOKUP_DIR, LOOKUP_FILES = "lookup", 1000
BIG_DIR, BIG_DIR_ENTRIES = "dir10k", 10_000
CREATE_DIR = "create"
RSS_DIR = "rss"
_U64 = struct.Struct("<Q")
_DIRENTPLUS_HDR = fc.abi.fuse_direntplus.size          # 152
_DP_OFF = struct.Struct("<QI")                           # off, namelen at +136 of a direntplus
_DP_OFF_POS = fc.abi.fuse_entry_out.size + 8


class BenchError(Exception):
    """A backend answered a benchmark request wrongly."""


def _fail(r: Reply, what: str = "") -> BenchError:
    name = fc._opname(r.opcode)
    if r.error:
        return BenchError(f"{name}{what}: {os.strerror(-r.error)} ({-r.error})")
    return BenchError(f"{name}{what}: unexpected reply ({r.length} bytes)")


# -- the data set --------------------------------------------------------------------------
def _write_pattern_file(path: str, size: int) -> None:
    chunk = bytearray(MiB)
    with open(path, "wb") as f:
        for mib in range(size // MiB):
            base = mib * (MiB // 4096)
            for b in range(MiB // 4096):
                _U64.pack_into(chunk, b * 4096, base + b)
            f.write(chunk)


def _touch_many(dirpath: str, prefix: str, count: int) -> None:
    os.makedirs(dirpath, exist_ok=True)
    have = len(os.listdir(dirpath))
    if have == count:
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    for i in range(count):
        os.close(os.open(os.path.join(dirpath, f"{prefix}{i:06d}"), flags, 0o644))


def make_dataset(root: str, *, rss_files: int) -> None:
    """Create (once) every file the workloads use under ``root``."""
    os.makedirs(root, exist_ok=True)
    p = os.path.join(root, READ_FILE)
    if not os.path.exists(p) or os.path.getsize(p) != READ_SIZE:
        _write_pattern_file(p, READ_SIZE)
    p = os.path.join(root, WRITE_FILE)
    if not os.path.exists(p):
        with open(p, "wb") as f:
            f.truncate(WRITE_SIZE)
    _touch_many(os.path.join(root, LOOKUP_DIR), "f", LOOKUP_FILES)
    _touch_many(os.path.join(root, BIG_DIR), "entry-with-a-longer-name-", BIG_DIR_ENTRIES)
    os.makedirs(os.path.join(root, CREATE_DIR), exist_ok=True)
    if rss_files:
        _touch_many(os.path.join(root, RSS_DIR), "n", rss_files)
    # the read file is hot in the page cache for every backend alike
    with open(os.path.join(root, READ_FILE), "rb") as f:
        while f.read(8 * MiB):
            pass


def reset_dataset(root: str) -> None:
    """Undo what an interrupted cell may have left: the CREATE directory is empty."""
    d = os.path.join(root, CREATE_DIR)
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))


# -- workloads -----------------------------------------------------------------------------
class Workload:
    name = ""
    title = ""
    bytes_per_op = 0            # for MiB/s (0: a metadata workload)
    data_size = 4096            # per-slot data buffer the connection needs

    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.forgets: dict[int, int] = {}    # nodeid -> lookups to forget (sent on hiprio)
        self.pending_forgets: list[tuple[int, int]] = []

    def setup(self, conn: VirtioFsConnection, streams: int) -> None:
        pass

    def first(self, sid: int) -> Op | None:
        raise NotImplementedError

    def next(self, sid: int, reply: Reply) -> Op | None:
        return self.first(sid)

    def teardown(self, conn: VirtioFsConnection) -> None:
        for nodeid, n in self.pending_forgets:
            self.forgets[nodeid] = self.forgets.get(nodeid, 0) + n
        self.pending_forgets.clear()
        items = sorted(self.forgets.items())
        per = 250
        for i in range(0, len(items), per):
            fc._check(conn.channels[0].call(fc.encode_batch_forget(items[i:i + per])))
        self.forgets.clear()

    def _looked_up(self, nodeid: int, n: int = 1) -> None:
        if nodeid and nodeid != ROOT:
            self.forgets[nodeid] = self.forgets.get(nodeid, 0) + n


class _FileIO(Workload):
    file = READ_FILE
    open_flags = os.O_RDONLY
    size = MiB
    span = READ_SIZE
    sequential = True
    write = False

    @property
    def bytes_per_op(self) -> int:        # type: ignore[override]
        return self.size

    @property
    def data_size(self) -> int:           # type: ignore[override]
        return max(self.size, 4096)

    def setup(self, conn: VirtioFsConnection, streams: int) -> None:
        e = conn.lookup(ROOT, self.file)
        self._looked_up(e.nodeid)
        conn.lookups.pop(e.nodeid, None)
        self.nodeid = e.nodeid
        self.fh = conn.open(e.nodeid, self.open_flags)
        self.pos = 0
        self.blocks = self.span // self.size
        if self.write:
            pattern = bytearray(self.size)
            for b in range(0, self.size, 4096):
                _U64.pack_into(pattern, b, 0xB0B0_0000 + b)
            for ch in conn.requests:
                for slot in ch.slots:
                    slot.data[:self.size] = pattern

    def _offset(self) -> int:
        if self.sequential:
            off = self.pos
            self.pos = (self.pos + self.size) % self.span
            return off
        return self.rng.randrange(self.blocks) * self.size

    def first(self, sid: int) -> Op:
        off = self._offset()
        if self.write:
            return fc.encode_write(self.nodeid, self.fh, off, self.size, flags=self.open_flags)
        return fc.encode_read(self.nodeid, self.fh, off, self.size)

    def next(self, sid: int, r: Reply) -> Op:
        if r.error:
            raise _fail(r)
        if self.write:
            if fc.decode_write(r.body) != self.size:
                raise BenchError(f"WRITE: short write {fc.decode_write(r.body)} of {self.size}")
        else:
            if r.data_length != self.size:
                raise BenchError(f"READ: {r.data_length} bytes of {self.size}")
            # the block number tag proves the offset was honoured (no copy of the data)
            self._check_block(_U64.unpack_from(r.data_view)[0])
        return self.first(sid)

    def _check_block(self, got: int) -> None:
        if got >= READ_SIZE // 4096 or (got * 4096) % self.size:
            raise BenchError(f"READ: data carries block tag {got}, not a {self.size}-aligned block")

    def teardown(self, conn: VirtioFsConnection) -> None:
        conn.release(self.nodeid, self.fh)
        super().teardown(conn)


class SeqRead(_FileIO):
    name, title = "seqread-1m", "1 MiB sequential read"


class SeqWrite(_FileIO):
    name, title = "seqwrite-1m", "1 MiB sequential write"
    file, open_flags, span, write = WRITE_FILE, os.O_RDWR, WRITE_SIZE, True


class RandRead(_FileIO):
    name, title = "randread-4k", "4 KiB random read"
    size, span, sequential = 4096, RAND_SPAN, False


class RandWrite(_FileIO):
    name, title = "randwrite-4k", "4 KiB random write"
    file, open_flags, size, span, sequential, write = WRITE_FILE, os.O_RDWR, 4096, RAND_SPAN, False, True


class LookupGetattr(Workload):
    """Alternating LOOKUP of a name and GETATTR of a node, over 1,000 files."""
    name, title = "lookup-getattr", "LOOKUP+GETATTR"

    def setup(self, conn: VirtioFsConnection, streams: int) -> None:
        d = conn.lookup(ROOT, LOOKUP_DIR)
        self.dir = d.nodeid
        self.names = [f"f{i:06d}".encode() for i in range(LOOKUP_FILES)]
        self.nodes = [conn.lookup(self.dir, n).nodeid for n in self.names]
        for nodeid, n in conn.lookups.items():
            self._looked_up(nodeid, n)
        conn.lookups.clear()
        self.counter = 0
        self.expect: dict[int, int] = {}

    def first(self, sid: int) -> Op:
        c = self.counter
        self.counter += 1
        k = (c >> 1) % LOOKUP_FILES
        if c & 1:
            return fc.encode_getattr(self.nodes[k])
        self.expect[sid] = self.nodes[k]
        return fc.encode_lookup(self.dir, self.names[k])

    def next(self, sid: int, r: Reply) -> Op:
        if r.error:
            raise _fail(r)
        if r.opcode == fc.O.LOOKUP:
            nodeid = fc.abi.fuse_entry_out.unpack_from(r.body)[0] if len(r.body) >= fc.ENTRY_OUT else -1
            if nodeid != self.expect.get(sid):
                raise BenchError(f"LOOKUP: node {nodeid}, expected {self.expect.get(sid)}")
            self._looked_up(nodeid)
        elif len(r.body) < fc.ATTR_OUT:
            raise _fail(r)
        return self.first(sid)


class CreateUnlink(Workload):
    """Per stream: CREATE name -> RELEASE fh -> UNLINK name (+ FORGET on hiprio)."""
    name, title = "create-release-unlink", "CREATE+RELEASE+UNLINK"

    def setup(self, conn: VirtioFsConnection, streams: int) -> None:
        d = conn.lookup(ROOT, CREATE_DIR)
        self.dir = d.nodeid
        for nodeid, n in conn.lookups.items():
            self._looked_up(nodeid, n)
        conn.lookups.clear()
        self.state: dict[int, tuple[int, bytes, int, int]] = {}   # sid -> (step, name, node, n)
        self.serial = [0] * streams

    def first(self, sid: int) -> Op:
        n = self.serial[sid]
        self.serial[sid] = n + 1
        name = f"s{sid}-{n}".encode()
        self.state[sid] = (0, name, 0, 0)
        return fc.encode_create(self.dir, name)

    def next(self, sid: int, r: Reply) -> Op:
        if r.error:
            raise _fail(r)
        step, name, node, _ = self.state[sid]
        if step == 0:
            entry, fh = fc.decode_create(r.body)
            self.state[sid] = (1, name, entry.nodeid, fh)
            return fc.encode_release(entry.nodeid, fh, os.O_RDWR)
        if step == 1:
            self.state[sid] = (2, name, node, 0)
            return fc.encode_unlink(self.dir, name)
        self.pending_forgets.append((node, 1))    # the kernel drops an unlinked inode at once
        return self.first(sid)

    def teardown(self, conn: VirtioFsConnection) -> None:
        """Finish the cycles the end of the window interrupted (the op ``next`` chose last
        was not sent), so the directory is empty again."""
        for step, name, node, fh in self.state.values():
            if step == 1:
                conn.release(node, fh)
            if step in (1, 2):
                conn.unlink(self.dir, name)
                self.pending_forgets.append((node, 1))
        self.state.clear()
        super().teardown(conn)


class ReaddirPlus(Workload):
    """Each stream scans the 10,000-entry directory with its own handle, 4 KiB per request."""
    name, title = "readdirplus-10k", "READDIRPLUS of 10,000 entries"
    buf = 4096

    def setup(self, conn: VirtioFsConnection, streams: int) -> None:
        d = conn.lookup(ROOT, BIG_DIR)
        self.dir = d.nodeid
        for nodeid, n in conn.lookups.items():
            self._looked_up(nodeid, n)
        conn.lookups.clear()
        self.handles = [conn.opendir(self.dir) for _ in range(streams)]
        self.offsets = [0] * streams
        self.entries = 0
        self.scans = 0

    def first(self, sid: int) -> Op:
        return fc.encode_readdirplus(self.dir, self.handles[sid], self.offsets[sid], self.buf)

    def next(self, sid: int, r: Reply) -> Op:
        if r.error:
            raise _fail(r)
        body = r.body
        n, pos, last, forgets = len(body), 0, None, self.forgets
        while pos < n:
            nodeid = _U64.unpack_from(body, pos)[0]
            last, namelen = _DP_OFF.unpack_from(body, pos + _DP_OFF_POS)
            if nodeid:
                forgets[nodeid] = forgets.get(nodeid, 0) + 1
            pos = (pos + _DIRENTPLUS_HDR + namelen + 7) & ~7
            self.entries += 1
        if last is None:                       # end of the directory: scan again
            self.offsets[sid] = 0
            self.scans += 1
        else:
            self.offsets[sid] = last
        return self.first(sid)

    def teardown(self, conn: VirtioFsConnection) -> None:
        for fh in self.handles:
            conn.release(self.dir, fh, dir=True)
        self.forgets.pop(ROOT, None)
        super().teardown(conn)


class LookupMany(Workload):
    """LOOKUP ``count`` distinct names once each (the RSS-at-N-inodes item); stops at the
    first error and records it instead of failing."""
    name, title = "lookup-many", "LOOKUP of N distinct files"

    SAMPLE_EVERY = 5000

    def __init__(self, count: int, sample=None) -> None:
        super().__init__()
        self.count = count
        self.sample = sample          # called with the number done every SAMPLE_EVERY lookups

    def setup(self, conn: VirtioFsConnection, streams: int) -> None:
        d = conn.lookup(ROOT, RSS_DIR)
        self.dir = d.nodeid
        for nodeid, n in conn.lookups.items():
            self._looked_up(nodeid, n)
        conn.lookups.clear()
        self.issued = 0
        self.done = 0
        self.error: str | None = None

    def first(self, sid: int) -> Op | None:
        if self.error is not None or self.issued >= self.count:
            return None
        i = self.issued
        self.issued += 1
        return fc.encode_lookup(self.dir, f"n{i:06d}")

    def next(self, sid: int, r: Reply) -> Op | None:
        if r.error:
            if self.error is None:
                self.error = f"LOOKUP #{self.done + 1}: {os.strerror(-r.error)}"
            return None
        self._looked_up(fc.abi.fuse_entry_out.unpack_from(r.body)[0])
        self.done += 1
        if self.sample is not None and self.done % self.SAMPLE_EVERY == 0:
            self.sample(self.done)
        return self.first(sid)


WORKLOADS: dict[str, type[Workload]] = {w.name: w for w in (
    SeqRead, SeqWrite, RandRead, RandWrite, LookupGetattr, CreateUnlink, ReaddirPlus)}


@dataclass(frozen=True)
class Cell:
    workload: str
    queues: int
    depth: int

    @property
    def key(self) -> str:
        return f"{self.workload}/q{self.queues}/d{self.depth}"
