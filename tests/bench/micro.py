"""`python3 -m tests.bench.micro`: micro-benchmarks of the vhostfs request path (issue 7).

Each item times one piece of the path in-process with the real vhostfs modules (nothing
is patched) and reports CPU ns per call (``time.process_time`` over many calls, the best
of ``REPEAT`` rounds, so other users' load on the machine inflates it least):

  ring      pop() of a 2-descriptor chain, add_used(), needs_notification(),
            the cffi atomics, translate() with 1 vs 8 regions
  decode    FUSE header: Reader.unpack vs Struct.unpack_from on the view
  server    FuseServer.handle() with the real PassthroughFs: GETATTR, LOOKUP(+FORGET),
            READ 4 KiB (preadv into guest memory)
  syscall   the bare syscalls those make (fstat, open(O_PATH)+statx+close, preadv 4 KiB)
  handoff   queue thread -> worker pool (SimpleQueue) -> back, vs an inline call;
            eventfd kick + poll wake-up between two threads
  gil       the cffi helper releases the GIL around every call: its cost with one
            other Python thread busy
  readdir   the READDIRPLUS directory snapshot: time and memory per 10,000 entries
  floor     a minimal Python request loop: eventfd read + header unpack + pread +
            reply pack + used-ring store + eventfd write (what any Python design pays)

Output: a Markdown table on stdout and ``out/bench/micro.json``.
"""
from __future__ import annotations

import json
import os
import select
import struct
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from queue import SimpleQueue

REPEAT = 5


def cpu_ns(fn, n: int, repeat: int = REPEAT) -> float:
    """Best-of-``repeat`` process CPU ns per call of ``fn()`` over ``n`` calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time_ns() - t0) / n)
    return best


def batch_ns(setup, body, n: int, repeat: int = REPEAT) -> float:
    """Best-of CPU ns per item for ``body(k)`` doing ``n`` items after an untimed ``setup(n)``."""
    best = float("inf")
    for _ in range(repeat):
        setup(n)
        t0 = time.process_time_ns()
        body(n)
        best = min(best, (time.process_time_ns() - t0) / n)
    return best


RESULTS: list[dict] = []


def record(group: str, name: str, ns: float, note: str = "") -> None:
    RESULTS.append({"group": group, "item": name, "ns": ns, "note": note})
    print(f"{group:9s} {name:58s} {ns / 1000:9.2f} µs  {note}", file=sys.stderr, flush=True)


# -- ring ----------------------------------------------------------------------------------
def bench_ring() -> None:
    from tests.support.driver import Driver, FakeGuestMemory
    from vhostfs import hostsys
    from vhostfs.memory import GuestMemory
    from vhostfs.virtqueue.split import SplitQueue

    mem = FakeGuestMemory.default()
    real = GuestMemory.from_table(mem.table())
    drv = Driver(mem, size=1024, event_idx=True)
    q = SplitQueue(0, 1024, drv.desc_uva, drv.avail_uva, drv.used_uva, event_idx=True)
    q.attach(real)
    req = bytes(80)
    heads: list[int] = []

    def fill(n):
        for _ in range(n):
            drv.add_chain([req], [4096 + 16], publish=False)
        drv.publish()

    def pop_n(n):
        pop = q.pop
        for _ in range(n):
            heads.append(pop().head)

    def used_n(n):
        add = q.add_used
        for h in heads:
            add(h, 4112)

    def drain_used(n):
        drv.used()

    n = 512
    pop_ns = []
    used_ns = []
    for _ in range(REPEAT):
        heads.clear()
        fill(n)
        t0 = time.process_time_ns()
        pop_n(n)
        pop_ns.append((time.process_time_ns() - t0) / n)
        t0 = time.process_time_ns()
        used_n(n)
        used_ns.append((time.process_time_ns() - t0) / n)
        drain_used(n)
    record("ring", "SplitQueue.pop(): 2-descriptor chain (80 B + 4112 B)", min(pop_ns))
    record("ring", "SplitQueue.add_used()", min(used_ns))
    record("ring", "SplitQueue.needs_notification() (EVENT_IDX)", cpu_ns(q.needs_notification, 20000))
    record("ring", "enable_notification() (store + fence)", cpu_ns(q.enable_notification, 20000))
    addr = real.host_address(0, 8)
    record("ring", "hostsys.load_acquire_u16 (cffi call)", cpu_ns(lambda: hostsys.load_acquire_u16(addr), 50000))
    record("ring", "hostsys.fence_seq_cst (cffi call)", cpu_ns(hostsys.fence_seq_cst, 50000))
    u16 = struct.Struct("<H").unpack_from
    view = real.contiguous(0, 4096)
    record("ring", "Struct('<H').unpack_from(view) (plain load: acquire on x86)", cpu_ns(lambda: u16(view, 2), 50000))

    # a 1 MiB READ as the Linux virtio-fs driver sends it: one descriptor per guest page
    # (indirect table: in header+args, out header, 256 x 4 KiB).  The C walk merges pages
    # that are contiguous in guest memory into one view, so it is measured with the pages
    # contiguous and scattered (every other page: 257 views), and the Python reference
    # walk (walk_chain, what pop() ran before the C walk) alongside.
    from tests.support.driver import F_INDIRECT, F_NEXT, F_WRITE, Desc
    from vhostfs.virtqueue.iov import Writer

    def big_chain(drv2, mem2, stride):
        hdr, out = mem2.alloc(80), mem2.alloc(16)
        pages = mem2.alloc(256 * stride, align=4096)
        table = [Desc(hdr, 80, F_NEXT, 1), Desc(out, 16, F_WRITE | F_NEXT, 2)]
        table += [Desc(pages + stride * i, 4096, F_WRITE | (F_NEXT if i < 255 else 0), 3 + i)
                  for i in range(256)]
        tgpa, tlen = drv2.indirect_table(table)
        [head] = drv2.take_descriptors(1)
        drv2.write_desc(head, tgpa, tlen, F_INDIRECT, 0)
        drv2.push_head(head, publish=False, descriptors=[head])

    for label, stride, python in (("pages contiguous", 4096, False),
                                  ("pages scattered", 8192, False),
                                  ("pages scattered, Python reference walk", 8192, True)):
        big: list = []
        best = float("inf")
        wbest = float("inf")
        tbest = float("inf")
        nviews = 0
        for _ in range(REPEAT):
            mem2 = FakeGuestMemory.default()        # a bump allocator: fresh memory per round
            drv2 = Driver(mem2, size=256, event_idx=True)
            q2 = SplitQueue(0, 256, drv2.desc_uva, drv2.avail_uva, drv2.used_uva, event_idx=True)
            q2.attach(GuestMemory.from_table(mem2.table()))
            if python:
                q2._walker = None
            for _ in range(4):
                big_chain(drv2, mem2, stride)
            drv2.publish()
            t0 = time.process_time_ns()
            for _ in range(4):
                big.append(q2.pop())
            best = min(best, (time.process_time_ns() - t0) / 4)
            nviews = len(big[0].writable)
            t0 = time.process_time_ns()
            for c in big:
                Writer(c.writable)
            wbest = min(wbest, (time.process_time_ns() - t0) / 4)
            t0 = time.process_time_ns()
            for c in big:
                Writer(c.writable, c.writable_len)
            tbest = min(tbest, (time.process_time_ns() - t0) / 4)
            big.clear()
            mem2.close()
        record("ring", f"SplitQueue.pop(): 1 MiB READ chain, 258 descriptors (indirect), {label}",
               best, f"one descriptor per 4 KiB guest page, as a Linux guest sends it; {nviews} writable views")
        record("ring", f"Writer(chain.writable) over those {nviews} views", wbest)
        record("ring", f"Writer(chain.writable, chain.writable_len) over those {nviews} views "
                       "(trusted: what the runtime builds)", tbest)

    one = GuestMemory.from_table(mem.table()[:1])
    record("ring", "GuestMemory.translate(4 KiB) 1 region", cpu_ns(lambda: one.translate(0x10000, 4096), 50000))
    record("ring", "GuestMemory.translate(4 KiB) 8 regions, first region", cpu_ns(lambda: real.translate(0x10000, 4096), 50000))
    far = mem.table()[-1][0]
    record("ring", "GuestMemory.translate(4 KiB) 8 regions, last region", cpu_ns(lambda: real.translate(far + 0x1000, 4096), 50000))


# -- decode --------------------------------------------------------------------------------
def bench_decode() -> None:
    from vhostfs.fuse import abi
    from vhostfs.virtqueue.iov import Reader, Writer

    buf = bytearray(8192)
    abi.fuse_in_header.pack_into(buf, 0, 80, 15, 7, 1, 0, 0, 0, 0, 0)
    mv = memoryview(buf)
    views = [mv[0:80]]
    wviews = [mv[4096:8192]]
    hdr = abi.fuse_in_header
    record("decode", "Reader(views) construction", cpu_ns(lambda: Reader(views), 50000))
    record("decode", "Writer(views) construction", cpu_ns(lambda: Writer(wviews), 50000))
    record("decode", "Reader(views, length) construction (trusted chain views)",
           cpu_ns(lambda: Reader(views, 80), 50000))
    record("decode", "Reader(views).unpack(fuse_in_header)", cpu_ns(lambda: Reader(views).unpack(hdr), 50000))
    record("decode", "fuse_in_header.unpack_from(view) (direct)", cpu_ns(lambda: hdr.unpack_from(views[0]), 50000))
    out = abi.fuse_out_header
    record("decode", "Writer.write(fuse_out_header.pack(...))", cpu_ns(lambda: Writer(wviews).write(out.pack(16, 0, 7)), 50000))
    record("decode", "fuse_out_header.pack_into(view) (direct)", cpu_ns(lambda: out.pack_into(wviews[0], 0, 16, 0, 7), 50000))


# -- server + syscalls ---------------------------------------------------------------------
def bench_server(root: str) -> None:
    from vhostfs.fs.passthrough.filesystem import PassthroughFs
    from vhostfs.fuse import abi
    from vhostfs.fuse.server import FuseServer
    from vhostfs.virtqueue.iov import Reader, Writer

    with open(os.path.join(root, "f"), "wb") as f:
        f.write(os.urandom(1 << 20))
    fs = PassthroughFs(root)
    srv = FuseServer(fs)
    buf = bytearray(2 << 20)
    mv = memoryview(buf)
    H = abi.fuse_in_header

    def req(opcode, nodeid, body=b"", unique=[1]):
        unique[0] += 1
        data = H.pack(H.size + len(body), opcode, unique[0], nodeid, 0, 0, 0, 0, 0) + body
        return data

    init = bytearray(req(abi.Opcode.INIT, 0, abi.fuse_init_in.pack(7, 38, 1 << 20, 0x7FFFFFFF, 0,
                                                                  *([0] * 11))))
    srv.handle(Reader([memoryview(init)]), Writer([mv[0:4096]]))
    O = abi.fuse_out_header

    def check(what):
        err = O.unpack_from(mv, 0)[1]
        if err:
            raise RuntimeError(f"{what}: error {err}")
    check("INIT")

    def call(data, wlen=4096):
        return srv.handle(Reader([memoryview(data)]), Writer([mv[0:wlen]]))

    getattr_req = bytearray(req(abi.Opcode.GETATTR, 1, bytes(16)))
    call(getattr_req)
    check("GETATTR")
    record("server", "FuseServer.handle GETATTR(root) incl. statx", cpu_ns(lambda: call(getattr_req), 20000))
    lookup_req = bytearray(req(abi.Opcode.LOOKUP, 1, b"f\0"))
    E = abi.fuse_entry_out

    def lookup_forget():
        call(lookup_req)
        nodeid = E.unpack_from(mv, 16)[0]
        fs.forget(nodeid, 1)
    record("server", "FuseServer.handle LOOKUP(f) + fs.forget", cpu_ns(lookup_forget, 20000))
    call(lookup_req)
    check("LOOKUP")
    nodeid = E.unpack_from(mv, 16)[0]
    open_req = bytearray(req(abi.Opcode.OPEN, nodeid, struct.pack("<II", os.O_RDONLY, 0)))
    call(open_req)
    fh = struct.unpack_from("<Q", mv, 16)[0]
    check("OPEN")
    read_req = bytearray(req(abi.Opcode.READ, nodeid, abi.fuse_read_in.pack(fh, 8192, 4096, 0, 0, os.O_RDONLY, 0)))
    if call(read_req, 4096 + 16) != 4096 + 16:
        raise RuntimeError("READ did not return 4096 bytes")
    check("READ")
    record("server", "FuseServer.handle READ 4 KiB (preadv into the view)",
           cpu_ns(lambda: call(read_req, 4096 + 16), 20000))

    fd = os.open(os.path.join(root, "f"), os.O_RDONLY)
    dfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    dst = [mv[16:4112]]
    record("syscall", "os.preadv 4 KiB (page cache)", cpu_ns(lambda: os.preadv(fd, dst, 8192), 20000))
    record("syscall", "os.fstat", cpu_ns(lambda: os.fstat(fd), 20000))
    from vhostfs import hostsys

    def open_stat_close():
        x = os.open("f", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        hostsys.statx(x, b"", 0x1000 | 0x100, 0xFFF) if hasattr(hostsys, "statx") else os.fstat(x)
        os.close(x)
    try:
        open_stat_close()
        record("syscall", "open(O_PATH) + statx + close (a LOOKUP's syscalls)", cpu_ns(open_stat_close, 20000))
    except Exception as exc:   # noqa: BLE001 - signature differs: fall back
        def open_fstat_close():
            x = os.open("f", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            os.fstat(x)
            os.close(x)
        record("syscall", "open(O_PATH) + fstat + close (a LOOKUP's syscalls)", cpu_ns(open_fstat_close, 20000),
               f"statx wrapper: {exc}")
    os.close(fd)
    os.close(dfd)


# -- handoff and GIL -----------------------------------------------------------------------
def _thread_cpu_pair(fn_main, n: int) -> float:
    t0 = time.process_time_ns()
    fn_main(n)
    return (time.process_time_ns() - t0) / n


def bench_handoff() -> None:
    # inline: the handler is called on the queue thread
    def handler(item):
        return item
    record("handoff", "inline call of the handler", cpu_ns(lambda: handler(1), 100000))

    # pool: queue thread puts, a worker gets, serves, completes under a lock, signals back
    # (ping-pong, depth 1: every request pays a wake-up in both directions)
    q_in: SimpleQueue = SimpleQueue()
    q_back: SimpleQueue = SimpleQueue()
    lock = threading.Lock()

    def worker():
        get = q_in.get
        while True:
            item = get()
            if item is None:
                return
            with lock:
                pass
            q_back.put(item)
    t = threading.Thread(target=worker, daemon=True)
    t.start()

    def pingpong(n):
        for i in range(n):
            q_in.put(i)
            q_back.get()
    best = min(_thread_cpu_pair(pingpong, 5000) for _ in range(REPEAT))
    record("handoff", "SimpleQueue put -> worker get -> back (depth 1, both threads' CPU)", best)

    def burst(n):   # depth 32: 32 items queued, then 32 collected
        for _ in range(n // 32):
            for i in range(32):
                q_in.put(i)
            for i in range(32):
                q_back.get()
    best = min(_thread_cpu_pair(burst, 6400) for _ in range(REPEAT))
    record("handoff", "SimpleQueue handoff, bursts of 32 (per item)", best)
    q_in.put(None)
    t.join()

    # eventfd kick + poll wake-up (the frontend's kick to the queue thread)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    back = os.eventfd(0, os.EFD_NONBLOCK)
    stop = [False]

    def waiter():
        p = select.poll()
        p.register(efd, select.POLLIN)
        while not stop[0]:
            if p.poll(1000):
                try:
                    os.eventfd_read(efd)
                except BlockingIOError:
                    continue
                os.eventfd_write(back, 1)
    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    pb = select.poll()
    pb.register(back, select.POLLIN)

    def kicks(n):
        for _ in range(n):
            os.eventfd_write(efd, 1)
            pb.poll(1000)
            os.eventfd_read(back)
    best = min(_thread_cpu_pair(kicks, 3000) for _ in range(REPEAT))
    record("handoff", "eventfd kick + poll wake-up + eventfd reply (round trip, 2 threads)", best)
    stop[0] = True
    os.eventfd_write(efd, 1)
    t.join()
    os.close(efd)
    os.close(back)


def bench_gil() -> None:
    """cffi (API mode) releases the GIL around each call: with another runnable Python
    thread, re-acquiring it can wait for that thread's switch interval (5 ms)."""
    from vhostfs import hostsys
    buf = bytearray(64)
    import ctypes
    addr = ctypes.addressof((ctypes.c_char * 64).from_buffer(buf))
    spin = [True]

    def busy():
        x = 0
        while spin[0]:
            x += 1
    t = threading.Thread(target=busy, daemon=True)
    t.start()
    time.sleep(0.05)
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        hostsys.load_acquire_u16(addr)
    wall_cffi = (time.perf_counter() - t0) / n
    u16 = struct.Struct("<H").unpack_from
    t0 = time.perf_counter()
    for _ in range(n):
        u16(buf, 0)
    wall_struct = (time.perf_counter() - t0) / n
    spin[0] = False
    t.join()
    record("gil", "WALL per cffi atomic call, 1 other busy Python thread", wall_cffi * 1e9,
           f"sys.getswitchinterval()={sys.getswitchinterval() * 1e3:.0f} ms")
    record("gil", "WALL per Struct unpack_from, 1 other busy Python thread", wall_struct * 1e9)


def bench_convoy(root: str) -> None:
    """The GIL convoy: every os.* call releases the GIL and must win it back.  One thread
    making N short syscalls vs 5 threads (a queue thread + 4 workers) making N/5 each."""
    fd = os.open(os.path.join(root, "f"), os.O_RDONLY)
    buf = [memoryview(bytearray(4096))]
    n = 20000

    def loop(k):
        for _ in range(k):
            os.preadv(fd, buf, 8192)

    for threads in (1, 5):
        best = None
        for _ in range(3):
            t0, w0 = time.process_time_ns(), time.perf_counter_ns()
            ts = [threading.Thread(target=loop, args=(n // threads,)) for _ in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            cpu = (time.process_time_ns() - t0) / n
            wall = (time.perf_counter_ns() - w0) / n
            if best is None or cpu < best[0]:
                best = (cpu, wall)
        record("gil", f"os.preadv 4 KiB from {threads} Python thread(s): CPU per call", best[0],
               f"wall {best[1] / 1000:.2f} µs/call (2 CPUs, loaded machine)")
    # the convoy proper: an I/O thread re-acquiring the GIL after each syscall while
    # another thread runs Python without releasing it (a snapshot, a long READDIRPLUS)
    spin = [True]

    def busy():
        x = 0
        while spin[0]:
            x += 1
    t = threading.Thread(target=busy, daemon=True)
    t.start()
    time.sleep(0.02)
    k = 50
    w0 = time.perf_counter_ns()
    loop(k)
    wall = (time.perf_counter_ns() - w0) / k
    spin[0] = False
    t.join()
    record("gil", "WALL per os.preadv 4 KiB while 1 other thread runs pure Python", wall,
           f"the GIL comes back only at the busy thread's switch interval "
           f"({sys.getswitchinterval() * 1e3:.0f} ms)")
    os.close(fd)


# -- READDIRPLUS snapshot ------------------------------------------------------------------
def bench_readdir(root: str) -> None:
    d = os.path.join(root, "big")
    os.mkdir(d)
    for i in range(10000):
        os.close(os.open(os.path.join(d, f"file-{i:05d}"), os.O_CREAT | os.O_WRONLY, 0o644))
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)

    def snapshot():
        out = [(b".", 1, 4), (b"..", 1, 4)]
        os.lseek(fd, 0, os.SEEK_SET)
        with os.scandir(fd) as it:
            for e in it:
                out.append((os.fsencode(e.name), e.inode(), 8 if e.is_file(follow_symlinks=False) else 0))
        return out
    record("readdir", "directory snapshot of 10,000 entries (scandir + tuples), per snapshot",
           cpu_ns(snapshot, 20, 3), "held under the handle lock, with the GIL, in one request")
    tracemalloc.start()
    snaps = [snapshot() for _ in range(8)]
    cur, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del snaps
    import gc

    def full_gc() -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.process_time_ns()
            gc.collect()
            best = min(best, time.process_time_ns() - t0)
        return best
    base = full_gc()
    snaps = [snapshot() for _ in range(128)]
    record("readdir", "full gc.collect() with 128 open-handle snapshots alive", full_gc(),
           f"{base / 1e6:.1f} ms without: a stop-the-world pause holding the GIL")
    del snaps
    record("readdir", "memory per open directory handle's snapshot (bytes, not ns)", cur / 8,
           "x 128 handles at 4 queues x depth 32")
    os.close(fd)
    from vhostfs.fs.passthrough.filesystem import PassthroughFs
    fs = PassthroughFs(root)
    parent = fs.inodes.root
    names = [f"big/file-{i:05d}".encode() for i in range(0)]
    bigdir = fs._lookup_in(parent, b"big")
    big = fs.inodes.get(bigdir.nodeid)
    i = [0]

    def one_lookup():
        k = i[0] = (i[0] + 1) % 10000
        e = fs._lookup_in(big, b"file-%05d" % k)
        fs.forget(e.nodeid, 1)
    record("readdir", "per-entry LOOKUP inside READDIRPLUS (_lookup_in + forget)", cpu_ns(one_lookup, 5000))


# -- the floor -----------------------------------------------------------------------------
def bench_floor(root: str) -> None:
    """The least a Python request loop can do per 4 KiB read: no validation, no pool."""
    path = os.path.join(root, "f")
    fd = os.open(path, os.O_RDONLY)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    ring = bytearray(1 << 16)
    mv = memoryview(ring)
    hdr = struct.Struct("<IIQQIIIHH")
    rd = struct.Struct("<QQIIIII")
    out = struct.Struct("<IiQ")
    desc = struct.Struct("<QIHH")
    used = struct.Struct("<II")
    u16 = struct.Struct("<H")
    ld16 = u16.unpack_from
    hdr.pack_into(mv, 4096, 80, 15, 1, 2, 0, 0, 0, 0, 0)
    rd.pack_into(mv, 4096 + 40, 0, 8192, 4096, 0, 0, 0, 0)
    desc.pack_into(mv, 0, 4096, 80, 1, 1)
    desc.pack_into(mv, 16, 8192, 4112, 2, 0)

    def one():
        os.eventfd_write(kick, 1)          # (frontend's side, included: it is one syscall)
        os.eventfd_read(kick)
        ld16(mv, 2048)                      # avail idx
        ld16(mv, 2052)                      # head
        a1, l1, f1, n1 = desc.unpack_from(mv, 0)
        a2, l2, f2, n2 = desc.unpack_from(mv, 16)
        r = mv[a1:a1 + l1]
        w = mv[a2:a2 + l2]
        length, opcode, unique, nodeid, *_ = hdr.unpack_from(r)
        fh, off, size, *_ = rd.unpack_from(r, 40)
        n = os.preadv(fd, [w[16:16 + size]], off)
        out.pack_into(w, 0, 16 + n, 0, unique)
        used.pack_into(mv, 3000, 0, 16 + n)
        u16.pack_into(mv, 2998, 1)
        os.eventfd_write(call, 1)
        os.eventfd_read(call)               # (frontend's side)
    record("floor", "minimal Python 4 KiB READ: kick+pop+decode+preadv+reply+used+call", cpu_ns(one, 20000),
           "single thread, no pool, no validation; incl. 2 eventfd ops of the frontend side")

    def syscalls_only():
        os.eventfd_write(kick, 1)
        os.eventfd_read(kick)
        os.preadv(fd, [mv[8208:12304]], 8192)
        os.eventfd_write(call, 1)
        os.eventfd_read(call)
    record("floor", "the same 5 syscalls from Python, nothing else", cpu_ns(syscalls_only, 20000))
    os.close(fd)


def markdown() -> str:
    L = ["| group | item | CPU µs per call | note |", "|---|---|---|---|"]
    for r in RESULTS:
        v = f"{r['ns'] / 1000:.2f}" if "bytes" not in r["item"] else f"{r['ns'] / 1024:.0f} KiB"
        L.append(f"| {r['group']} | {r['item']} | {v} | {r['note']} |")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    want = set(argv) or {"ring", "decode", "server", "handoff", "gil", "readdir", "floor"}
    root = tempfile.mkdtemp(prefix="vhostfs-micro-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "f"), "wb") as f:
            f.write(os.urandom(1 << 20))
        steps = [("ring", bench_ring), ("decode", bench_decode),
                 ("server", lambda: bench_server(root)), ("handoff", bench_handoff),
                 ("gil", bench_gil), ("gil", lambda: bench_convoy(root)), ("readdir", lambda: bench_readdir(root)),
                 ("floor", lambda: bench_floor(root))]
        for name, fn in steps:
            if name in want:
                try:
                    fn()
                except Exception as exc:   # noqa: BLE001 - report and go on
                    record(name, "FAILED", float("nan"), f"{type(exc).__name__}: {exc}")
    finally:
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    out = Path("out/bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "micro.json").write_text(json.dumps(RESULTS, indent=1))
    print(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
