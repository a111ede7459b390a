"""QueueRunner: quick requests served inline on the queue thread; bulk and large ones on
the pool, blocking ones on a dedicated thread."""
from __future__ import annotations

import os
import threading
import time

import pytest

from tests.unit.test_runtime_queue import FakeChain, FakeQueue, kick, wait_for
from vhostfs.fuse.blocking import BULK
from vhostfs.runtime import queue as rq
from vhostfs.runtime.queue import QueueRunner


class Recorder:
    def __init__(self, delay: float = 0.0, blocking=(), bulk=(), hold=None) -> None:
        self.delay = delay
        self.hold = hold or {}      # id -> Event the request waits for
        self.blocking = set(blocking)
        self.bulk = set(bulk)
        self.threads: dict[int, str] = {}
        self.lock = threading.Lock()

    def may_block(self, reader):
        i = int.from_bytes(reader.read(4), "little")   # consumes: the runtime rewinds
        return i if i in self.blocking else BULK if i in self.bulk else None

    def handle(self, reader, writer, cancel=None) -> int:
        i = int.from_bytes(reader.read(4), "little")
        with self.lock:
            self.threads[i] = threading.current_thread().name
        if self.delay:
            time.sleep(self.delay)
        if i in self.hold:
            assert self.hold[i].wait(10), f"request {i} never released"
        writer.write(b"\1")
        return 1


def test_lone_request_is_served_inline_on_the_queue_thread(fds):
    kick_fd, call_fd = fds
    q, rec = FakeQueue(), Recorder()
    runner = QueueRunner(1, q, kick_fd, call_fd, rec.handle, 2, may_block=rec.may_block)
    runner.start()
    for i in range(3):                       # depth 1: one at a time
        with runner.lock:
            q.push(FakeChain(10 + i))
        kick(kick_fd)
        wait_for(lambda: len(q.used) == i + 1)
    runner.stop()
    assert set(rec.threads.values()) == {"vq1"} and runner.served_inline == 3
    assert q.used == [(10, 1), (11, 1), (12, 1)]


def test_quick_requests_are_served_inline_with_others_waiting(fds):
    kick_fd, call_fd = fds
    q, rec = FakeQueue(), Recorder(delay=0.001)
    runner = QueueRunner(1, q, kick_fd, call_fd, rec.handle, 2, may_block=rec.may_block)
    with runner.lock:
        for i in range(8):
            q.push(FakeChain(100 + i))
    runner.start()
    wait_for(lambda: len(q.used) == 8)
    runner.stop()
    assert all(rec.threads[100 + i] == "vq1" for i in range(8))
    assert runner.served_inline == 8
    assert [h for h, _ in q.used] == [100 + i for i in range(8)]    # served in ring order


def test_bulk_requests_go_to_the_bulk_lane_and_do_not_hold_up_quick_ones(fds):
    """A bulk request (SETATTR, READDIRPLUS...) is served on the queue's bulk lane: a slow
    one does not delay the quick requests popped after it."""
    kick_fd, call_fd = fds
    release = threading.Event()
    q, rec = FakeQueue(), Recorder(bulk={1, 2}, hold={1: release})
    runner = QueueRunner(1, q, kick_fd, call_fd, rec.handle, 2, may_block=rec.may_block)
    with runner.lock:
        q.push(FakeChain(1))                 # bulk, held until released
        for i in range(3):
            q.push(FakeChain(10 + i))        # quick
        q.push(FakeChain(2))                 # bulk
    runner.start()
    wait_for(lambda: len(q.used) == 3)       # the quick ones; bulk 2 waits behind 1
    assert sorted(h for h, _ in q.used) == [10, 11, 12]
    release.set()
    wait_for(lambda: len(q.used) == 5)
    runner.stop()
    assert rec.threads[1] == rec.threads[2] == "vq1-bulk-0"     # one lane, in order
    assert all(rec.threads[10 + i] == "vq1" for i in range(3))


def test_blocking_requests_never_run_inline(fds):
    kick_fd, call_fd = fds
    q, rec = FakeQueue(), Recorder(blocking={7})
    runner = QueueRunner(1, q, kick_fd, call_fd, rec.handle, 2, may_block=rec.may_block)
    runner.start()
    with runner.lock:
        q.push(FakeChain(7))
    kick(kick_fd)
    wait_for(lambda: len(q.used) == 1)
    runner.stop()
    assert rec.threads[7] == "vq1-blocking" and runner.served_inline == 0


def big_chain(head: int) -> FakeChain:
    c = FakeChain(head)
    c.writable = [memoryview(bytearray(rq.INLINE_MAX_BYTES))]
    return c


def test_large_chains_go_to_the_pool_unless_alone(fds):
    """A large chain goes to the pool when others wait behind it or the pool is busy;
    alone (depth 1) it is served inline: nobody waits for its copy."""
    kick_fd, call_fd = fds
    q, rec = FakeQueue(), Recorder()
    runner = QueueRunner(1, q, kick_fd, call_fd, rec.handle, 1, may_block=rec.may_block)
    for c in (big_chain(5), FakeChain(6)):
        q.push(c)
    runner.start()
    wait_for(lambda: len(q.used) == 2)
    with runner.lock:
        q.push(big_chain(7))
    kick(kick_fd)
    wait_for(lambda: len(q.used) == 3)
    runner.stop()
    assert rec.threads[5].startswith("vq1-worker")      # chain 6 waited behind it
    assert rec.threads[6] == "vq1" and rec.threads[7] == "vq1"
    assert runner._pool_busy == 0


def test_requests_arriving_during_an_inline_one_are_all_served(fds):
    """A slow inline request holds back the ring only for its own duration."""
    kick_fd, call_fd = fds
    q, rec = FakeQueue(), Recorder(delay=0.05)
    runner = QueueRunner(1, q, kick_fd, call_fd, rec.handle, 2, may_block=rec.may_block)
    runner.start()
    with runner.lock:
        q.push(FakeChain(1))
    kick(kick_fd)
    wait_for(lambda: 1 in rec.threads)
    with runner.lock:
        for i in range(2, 7):
            q.push(FakeChain(i))
    kick(kick_fd)
    wait_for(lambda: len(q.used) == 6)
    runner.stop()
    assert rec.threads[1] == "vq1"
    assert sorted(h for h, _ in q.used) == [1, 2, 3, 4, 5, 6]
    assert runner.inflight == 0


def test_pool_size_zero_serves_everything_inline(fds):
    kick_fd, call_fd = fds
    q, rec = FakeQueue(), Recorder()
    runner = QueueRunner(0, q, kick_fd, call_fd, rec.handle, 0, may_block=rec.may_block)
    with runner.lock:
        for i in range(4):
            q.push(FakeChain(i))
    runner.start()
    wait_for(lambda: len(q.used) == 4)
    runner.stop()
    assert set(rec.threads.values()) == {"vq0"}


class CountingQueue(FakeQueue):
    """Records how many replies were in the used ring at each notification check."""

    def __init__(self) -> None:
        super().__init__()
        self.checks: list[int] = []

    def needs_notification(self) -> bool:
        self.checks.append(len(self.used))
        return True


def test_inline_completions_are_notification_checked_per_batch(fds):
    """A backlog served inline is notification-checked every NOTIFY_BATCH replies, and
    the last reply always is (a driver asleep on it is woken)."""
    kick_fd, call_fd = fds
    q, rec = CountingQueue(), Recorder()
    n = 3 * rq.NOTIFY_BATCH + 3
    for i in range(n):                      # all there before the queue thread starts
        q.push(FakeChain(i))
    runner = QueueRunner(1, q, kick_fd, call_fd, rec.handle, 2, may_block=rec.may_block)
    runner.start()
    wait_for(lambda: len(q.used) == n and q.checks and q.checks[-1] == n)
    runner.stop()
    assert q.checks == [rq.NOTIFY_BATCH, 2 * rq.NOTIFY_BATCH, 3 * rq.NOTIFY_BATCH, n]
    assert os.eventfd_read(call_fd) == 4


def test_lone_inline_completion_is_notified_at_once(fds):
    kick_fd, call_fd = fds
    q, rec = CountingQueue(), Recorder()
    runner = QueueRunner(1, q, kick_fd, call_fd, rec.handle, 2, may_block=rec.may_block)
    runner.start()
    for i in range(3):
        with runner.lock:
            q.push(FakeChain(i))
        kick(kick_fd)
        wait_for(lambda: len(q.checks) == i + 1)
        assert q.checks[-1] == i + 1
    runner.stop()


def test_fast_path_serves_inline_and_falls_back_to_the_handler(fds):
    """``fast(chain)`` is tried first, inline for small chains and on a pool thread for
    large ones: an int is the reply length (the handler is not called), None or an
    exception hands the chain to the general path; never while a dirty log is active."""
    from vhostfs.virtqueue import iov
    kick_fd, call_fd = fds
    q, rec = FakeQueue(), Recorder()
    tried = []

    def fast(chain):
        tried.append((chain.head, threading.current_thread().name))
        if chain.head == 2:
            raise RuntimeError("fast path bug")
        return 9 if chain.head == 1 else None

    runner = QueueRunner(1, q, kick_fd, call_fd, rec.handle, 2, may_block=rec.may_block,
                         fast=fast)
    big = FakeChain(4)
    big.writable = [memoryview(bytearray(rq.INLINE_MAX_BYTES))]
    for c in (big, FakeChain(1), FakeChain(2), FakeChain(3)):     # big: others behind it
        q.push(c)
    runner.start()
    wait_for(lambda: len(q.used) == 4)
    assert sorted(tried) == [(1, "vq1"), (2, "vq1"), (3, "vq1"), (4, tried_on(tried, 4))]
    assert tried_on(tried, 4).startswith("vq1-worker")
    assert dict(q.used) == {1: 9, 2: 1, 3: 1, 4: 1}
    assert sorted(rec.threads) == [2, 3, 4] and rec.threads[4].startswith("vq1-worker")
    iov.set_dirty_log(object())
    try:
        with runner.lock:
            q.push(FakeChain(5))
        kick(kick_fd)
        wait_for(lambda: len(q.used) == 5)
    finally:
        iov.set_dirty_log(None)
    runner.stop()
    assert len(tried) == 4 and 5 in rec.threads


def tried_on(tried, head):
    return next(name for h, name in tried if h == head)
