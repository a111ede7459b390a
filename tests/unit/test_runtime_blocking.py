"""QueueRunner: blocking requests on dedicated threads, INTERRUPT cancellation, stop.

The fake ring of test_runtime_queue records every add_used.  Requests are 4-byte
little-endian ids; the test's ``may_block`` says which ids may block (their key is the
id), the handler decides what each id does.  Every wait in these tests is bounded and
fails loudly: a deadlock shows up as a failed assertion, never as a hung run.
"""
from __future__ import annotations

import select
import threading

import pytest

from tests.unit.test_runtime_queue import FakeChain, FakeQueue, kick, wait_for
from vhostfs.runtime.cancel import CancelToken, InterruptRegistry
from vhostfs.runtime.queue import QueueRunner

EINTR_REPLY = 0xE1    # what the fake handler writes when its wait was cancelled
GRANTED = 0x60
BOUND = 20.0          # seconds: any wait longer than this is a failure


def readable(fd: int, timeout_ms: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(timeout_ms))


def ident(reader) -> int:
    return int.from_bytes(reader.read(4), "little")


class LockWorld:
    """Ids >= 1000 are waiters (SETLKW-like: wait until released or cancelled); id 1
    releases them; anything else is a quick request."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.waiting = 0
        self.lock = threading.Lock()
        self.threads: dict[int, str] = {}

    def may_block(self, reader):
        i = ident(reader)
        return i if i >= 1000 else None

    def handle(self, reader, writer, cancel=None) -> int:
        i = ident(reader)
        with self.lock:
            self.threads[i] = threading.current_thread().name
        if i == 1:
            self.released.set()
        elif i >= 1000:
            with self.lock:
                self.waiting += 1
            if cancel is None:   # not dedicated: block like a pool thread would
                granted = self.released.wait(BOUND)
            else:
                # poll, not select: the test process may hold fds >= 1024
                rfds = readable(cancel.fileno(), 0)
                while not rfds and not self.released.is_set():
                    rfds = readable(cancel.fileno(), 10)
                granted = not cancel.is_set()
            writer.write(bytes([GRANTED if granted else EINTR_REPLY]))
            return 1
        writer.write(b"\0")
        return 1


def results(q) -> dict[int, int]:
    return dict(q.used)


@pytest.mark.parametrize("pool", [0, 1, 4])
def test_n_plus_2_waiters_do_not_starve_the_release(fds, pool):
    kick_fd, call_fd = fds
    q, world = FakeQueue(), LockWorld()
    runner = QueueRunner(1, q, kick_fd, call_fd, world.handle, pool, may_block=world.may_block)
    runner.start()
    waiters = [1000 + i for i in range(pool + 2)]
    with runner.lock:
        for w in waiters:
            q.push(FakeChain(w))
    kick(kick_fd)
    wait_for(lambda: world.waiting == len(waiters), BOUND)
    assert runner.blocking_inflight == len(waiters)
    # quick requests still flow while every waiter waits
    with runner.lock:
        for i in range(10, 20):
            q.push(FakeChain(i))
    kick(kick_fd)
    wait_for(lambda: len(q.used) == 10, BOUND)
    assert not world.released.is_set()
    with runner.lock:
        q.push(FakeChain(1))   # the unlock, queued behind N+2 waiters
    kick(kick_fd)
    wait_for(lambda: len(q.used) == 10 + 1 + len(waiters), BOUND)
    assert runner.stop() == 10 + 1 + len(waiters)
    assert sorted(h for h, _ in q.used) == sorted(list(range(10, 20)) + [1] + waiters)
    # every waiter ran on a dedicated thread, never on the pool or the queue thread
    assert all(world.threads[w] == "vq1-blocking" for w in waiters)


def test_interrupt_cancels_a_waiter_with_eintr(fds):
    kick_fd, call_fd = fds
    q, world = FakeQueue(), LockWorld()
    reg = InterruptRegistry()
    runner = QueueRunner(1, q, kick_fd, call_fd, world.handle, 2, may_block=world.may_block,
                         interrupts=reg)
    runner.start()
    with runner.lock:
        q.push(FakeChain(1000))
        q.push(FakeChain(1001))
    kick(kick_fd)
    wait_for(lambda: world.waiting == 2, BOUND)
    assert len(reg) == 2
    assert reg.interrupt(1001) is True
    wait_for(lambda: len(q.used) == 1, BOUND)
    assert q.used[0][0] == 1001
    # the reply the handler wrote: cancelled
    assert len(reg) == 1
    with runner.lock:
        q.push(FakeChain(1))
    kick(kick_fd)
    wait_for(lambda: len(q.used) == 3, BOUND)
    runner.stop()
    assert len(reg) == 0


def test_interrupt_reply_bytes(fds):
    kick_fd, call_fd = fds
    q, world = FakeQueue(), LockWorld()
    reg = InterruptRegistry()
    runner = QueueRunner(1, q, kick_fd, call_fd, world.handle, 1, may_block=world.may_block,
                         interrupts=reg)
    runner.start()
    a, b = FakeChain(1000), FakeChain(1001)
    with runner.lock:
        q.push(a)
        q.push(b)
    kick(kick_fd)
    wait_for(lambda: world.waiting == 2, BOUND)
    reg.interrupt(1000)
    wait_for(lambda: len(q.used) == 1, BOUND)
    assert a.writable[0][0] == EINTR_REPLY
    with runner.lock:
        q.push(FakeChain(1))
    kick(kick_fd)
    wait_for(lambda: len(q.used) == 3, BOUND)
    assert b.writable[0][0] == GRANTED
    runner.stop()


def test_interrupt_that_overtakes_its_request(fds):
    """INTERRUPT (hiprio) may be served before its request is popped: remembered."""
    kick_fd, call_fd = fds
    q, world = FakeQueue(), LockWorld()
    reg = InterruptRegistry()
    assert reg.interrupt(1005) is False
    runner = QueueRunner(1, q, kick_fd, call_fd, world.handle, 1, may_block=world.may_block,
                         interrupts=reg)
    runner.start()
    c = FakeChain(1005)
    with runner.lock:
        q.push(c)
    kick(kick_fd)
    wait_for(lambda: len(q.used) == 1, BOUND)
    assert c.writable[0][0] == EINTR_REPLY
    runner.stop()


def test_pending_interrupts_are_bounded():
    reg = InterruptRegistry(pending_max=4)
    for k in range(10):
        reg.interrupt(k)
    early, late = CancelToken(), CancelToken()
    reg.register(0, early)      # forgotten: too old
    reg.register(9, late)       # remembered
    assert not early.is_set() and late.is_set()
    assert readable(late.fileno(), 0)
    for t in (early, late):
        t.close()


def test_stop_cancels_blocking_requests_and_drains(fds):
    """GET_VRING_BASE must not hang on a lock wait: stop() cancels it, waits for every
    popped chain to be used, then reports last_avail_idx."""
    kick_fd, call_fd = fds
    q, world = FakeQueue(), LockWorld()
    runner = QueueRunner(1, q, kick_fd, call_fd, world.handle, 2, may_block=world.may_block)
    runner.start()
    chains = [FakeChain(1000 + i) for i in range(5)]
    with runner.lock:
        for c in chains:
            q.push(c)
        q.push(FakeChain(7))
    kick(kick_fd)
    wait_for(lambda: world.waiting == 5 and len(q.used) == 1, BOUND)
    assert runner.stop() == 6
    assert len(q.used) == 6
    assert all(c.writable[0][0] == EINTR_REPLY for c in chains)


def test_handler_without_cancel_parameter_still_gets_dedicated_threads(fds):
    kick_fd, call_fd = fds
    q, world = FakeQueue(), LockWorld()

    def plain(reader, writer):      # an older server: no cancel token
        return world.handle(reader, writer)

    runner = QueueRunner(1, q, kick_fd, call_fd, plain, 1, may_block=world.may_block)
    runner.start()
    with runner.lock:
        for i in range(3):
            q.push(FakeChain(1000 + i))
        q.push(FakeChain(1))
    kick(kick_fd)
    wait_for(lambda: len(q.used) == 4, BOUND)
    runner.stop()


def test_too_many_blocking_requests_are_not_allowed_to_wait(fds):
    kick_fd, call_fd = fds
    q, world = FakeQueue(), LockWorld()
    runner = QueueRunner(1, q, kick_fd, call_fd, world.handle, 1, may_block=world.may_block,
                         max_dedicated=2)
    runner.start()
    chains = [FakeChain(1000 + i) for i in range(3)]
    with runner.lock:
        for c in chains:
            q.push(c)
    kick(kick_fd)
    wait_for(lambda: len(q.used) == 1, BOUND)     # the third was refused the wait
    assert chains[2].writable[0][0] == EINTR_REPLY
    with runner.lock:
        q.push(FakeChain(1))
    kick(kick_fd)
    wait_for(lambda: len(q.used) == 4, BOUND)
    runner.stop()
    assert chains[0].writable[0][0] == chains[1].writable[0][0] == GRANTED


def test_memory_change_while_workers_hold_guest_buffers(fds):
    """attach_memory swaps the ring's snapshot under the queue lock; a worker still
    reading its chain's views keeps the old mapping alive (no use-after-unmap)."""
    import mmap
    kick_fd, call_fd = fds
    q = FakeQueue()
    started, go = threading.Event(), threading.Event()
    seen = []

    def handler(reader, writer):
        started.set()
        assert go.wait(BOUND)
        seen.append(reader.read(8))
        return 0

    region = mmap.mmap(-1, 4096)
    region[:8] = b"old data"
    chain = FakeChain(3)
    chain.readable = [memoryview(region)[:8]]
    runner = QueueRunner(1, q, kick_fd, call_fd, handler, 1)
    runner.start()
    with runner.lock:
        q.push(chain)
    kick(kick_fd)
    assert started.wait(BOUND)
    runner.attach_memory("new snapshot")
    del region         # the device dropped its snapshot; the chain's view keeps the mmap
    go.set()
    wait_for(lambda: len(q.used) == 1, BOUND)
    runner.stop()
    assert q.attached == "new snapshot" and seen == [b"old data"]


# -- which requests may block (fuse/blocking.py, FuseServer.may_block) -----------------------
def fuse_request(opcode: int, nodeid: int, unique: int = 77, body: bytes = b"") -> list:
    from vhostfs.fuse import abi
    hdr = abi.fuse_in_header.pack(abi.fuse_in_header.size + len(body), opcode, unique, nodeid,
                                  0, 0, 0, 0, 0)
    return [memoryview(hdr + body)]


class TypedFs:
    """Just enough FileSystem for FuseServer.may_block: node 5 is a FIFO, 6 a char
    device, 7 a regular file, 8 unknown."""

    def node_type(self, nodeid):
        import stat
        return {5: stat.S_IFIFO, 6: stat.S_IFCHR, 7: stat.S_IFREG}.get(nodeid)


@pytest.mark.parametrize("opcode,nodeid,route", [
    ("SETLKW", 7, "wait"), ("FSYNC", 7, "wait"), ("FSYNCDIR", 1, "wait"), ("SYNCFS", 1, "wait"),
    ("SETLK", 7, "quick"), ("GETLK", 7, "quick"), ("FLUSH", 7, "quick"), ("RELEASE", 5, "quick"),
    ("OPEN", 5, "wait"), ("READ", 5, "wait"), ("WRITE", 6, "wait"), ("OPEN", 6, "wait"),
    ("OPEN", 7, "quick"), ("READ", 7, "quick"), ("WRITE", 7, "quick"), ("READ", 8, "quick"),
    ("GETATTR", 5, "quick"), ("LOOKUP", 1, "quick"), ("INTERRUPT", 0, "quick"),
    ("FORGET", 5, "quick"), ("UNLINK", 1, "quick"), ("RENAME2", 1, "quick"),
    ("READDIRPLUS", 1, "bulk"), ("FALLOCATE", 7, "bulk"), ("SETATTR", 7, "bulk"),
])
def test_may_block_classification(opcode, nodeid, route):
    from vhostfs.fuse import abi
    from vhostfs.fuse.blocking import BULK
    from vhostfs.fuse.server import FuseServer
    from vhostfs.virtqueue.iov import Reader
    server = FuseServer(TypedFs())
    key = server.may_block(Reader(fuse_request(abi.Opcode[opcode], nodeid, unique=1234)))
    assert key == {"wait": 1234, "bulk": BULK, "quick": None}[route]


def test_may_block_without_node_types_and_on_short_requests():
    from vhostfs.fuse import abi, blocking
    from vhostfs.fuse.server import FuseServer
    from vhostfs.virtqueue.iov import Reader
    assert blocking.may_block(abi.Opcode.READ, 5, None) is False          # no node_type: opcode only
    assert blocking.may_block(abi.Opcode.SETLKW, 5, None) is True

    def failing(nodeid):
        raise OSError(2, "gone")
    assert blocking.may_block(abi.Opcode.OPEN, 5, failing) is False
    server = FuseServer(TypedFs())
    assert server.may_block(Reader([memoryview(b"short")])) is None
