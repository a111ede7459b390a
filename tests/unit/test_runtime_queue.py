"""QueueRunner: the queue thread + worker pool, against a fake ring.

The fake ring records every add_used so the tests can check that each popped chain is
completed exactly once, whatever the completion order, and that stop() waits for the
work in flight before it reports last_avail_idx.
"""
from __future__ import annotations

import os
import random
import select
import threading
import time

import pytest

from vhostfs.errors import ChainError, QueueBroken
from vhostfs.fuse.blocking import BULK
from vhostfs.runtime.queue import QueueRunner


def to_pool(reader):
    """A may_block that routes every request to the worker pool (a quick one would be
    served inline on the queue thread)."""
    return BULK


class FakeChain:
    def __init__(self, head: int) -> None:
        self.head = head
        self.readable: list[memoryview] = [memoryview(head.to_bytes(4, "little"))]
        self.writable: list[memoryview] = [memoryview(bytearray(8))]

    # What DescriptorChain carries: the walk's sums of the view lengths.
    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)


class FakeQueue:
    """A ring whose avail side is a Python list; thread-safety comes from the runner's lock."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.pending: list[object] = []
        self.used: list[tuple[int, int]] = []
        self.last_avail_idx = 0
        self.notifications_enabled = True
        self.attached = None

    def push(self, item) -> None:
        self.pending.append(item)

    def pop(self):
        if not self.pending:
            return None
        item = self.pending.pop(0)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if isinstance(item, Exception):
            raise item
        return item

    def has_available(self) -> bool:
        return bool(self.pending)

    def add_used(self, head: int, written: int) -> None:
        self.used.append((head, written))

    def needs_notification(self) -> bool:
        return True

    def enable_notification(self) -> None:
        self.notifications_enabled = True

    def disable_notification(self) -> None:
        self.notifications_enabled = False

    def attach(self, memory) -> None:
        self.attached = memory


def echo_handler(delay: float = 0.0):
    def handle(reader, writer) -> int:
        data = reader.read(4)
        if delay:
            time.sleep(random.random() * delay)
        writer.write(data)
        return len(data)

    return handle


def kick(fd: int) -> None:
    os.eventfd_write(fd, 1)


def wait_for(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("pool", [0, 1, 8])
def test_every_chain_completed_exactly_once(fds, pool):
    kick_fd, call_fd = fds
    q = FakeQueue()
    runner = QueueRunner(1, q, kick_fd, call_fd, echo_handler(0.002), pool, may_block=to_pool)
    runner.start()
    for batch in range(10):
        with runner.lock:
            for i in range(50):
                q.push(FakeChain(batch * 50 + i))
        kick(kick_fd)
    wait_for(lambda: len(q.used) == 500)
    assert runner.stop() == 500
    assert sorted(h for h, _ in q.used) == list(range(500))
    assert all(n == 4 for _, n in q.used)
    # the call eventfd was signalled
    p = select.poll()
    p.register(call_fd, select.POLLIN)
    assert p.poll(0)


def test_chains_already_available_at_start_are_served(fds):
    kick_fd, call_fd = fds
    q = FakeQueue()
    for i in range(3):
        q.push(FakeChain(i))
    runner = QueueRunner(1, q, kick_fd, call_fd, echo_handler(), 2)
    runner.start()
    wait_for(lambda: len(q.used) == 3)
    runner.stop()


def test_stop_waits_for_inflight_requests(fds):
    kick_fd, call_fd = fds
    q = FakeQueue()
    release = threading.Event()

    def slow(reader, writer) -> int:
        release.wait(5)
        return 0

    runner = QueueRunner(1, q, kick_fd, call_fd, slow, 4, may_block=to_pool)
    runner.start()
    with runner.lock:
        for i in range(4):
            q.push(FakeChain(i))
    kick(kick_fd)
    wait_for(lambda: runner._inflight == 4)
    threading.Timer(0.2, release.set).start()
    assert runner.stop() == 4
    assert len(q.used) == 4


def test_malformed_chain_returned_with_zero_length(fds):
    kick_fd, call_fd = fds
    q = FakeQueue()
    bad = ChainError("descriptor loop")
    bad.head = 7
    q.push(FakeChain(1))
    q.push(bad)
    q.push(FakeChain(2))
    runner = QueueRunner(1, q, kick_fd, call_fd, echo_handler(), 0)
    runner.start()
    wait_for(lambda: len(q.used) == 3)
    runner.stop()
    assert (7, 0) in q.used and (1, 4) in q.used and (2, 4) in q.used


def test_broken_queue_stops_serving_but_thread_survives(fds):
    kick_fd, call_fd = fds
    q = FakeQueue()
    q.push(QueueBroken("avail idx jumped"))
    runner = QueueRunner(1, q, kick_fd, call_fd, echo_handler(), 0)
    runner.start()
    wait_for(lambda: runner.broken)
    q.push(FakeChain(1))
    kick(kick_fd)
    time.sleep(0.05)
    assert q.used == []
    runner.stop()


def test_handler_exception_does_not_kill_worker(fds):
    kick_fd, call_fd = fds
    q = FakeQueue()
    calls = []

    def flaky(reader, writer) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return 0

    runner = QueueRunner(1, q, kick_fd, call_fd, flaky, 1, may_block=to_pool)
    runner.start()
    with runner.lock:
        q.push(FakeChain(1))
        q.push(FakeChain(2))
    kick(kick_fd)
    wait_for(lambda: len(q.used) == 2)
    runner.stop()
    assert sorted(q.used) == [(1, 0), (2, 0)]


def test_notification_owed_without_call_fd_is_sent_on_the_new_one(fds):
    """A ring started before its SET_VRING_CALL (the frontend enables it first) completes
    requests with no call fd: the interrupt they were due arrives with the fd.  Dropping
    it left the driver asleep on a used ring that already held its reply (the 5 s stall
    test_end_to_end_requests_through_rings met now and then)."""
    kick_fd, call_fd = fds
    q = FakeQueue()
    q.push(FakeChain(7))
    runner = QueueRunner(1, q, kick_fd, None, echo_handler(), 2)
    runner.start()
    try:
        wait_for(lambda: len(q.used) == 1)
        p = select.poll()
        p.register(call_fd, select.POLLIN)
        assert not p.poll(0)
        runner.set_call_fd(call_fd)
        assert p.poll(0), "the owed used-buffer notification was dropped"
        assert os.eventfd_read(call_fd) == 1
        runner.set_call_fd(call_fd)            # nothing owed any more: no spurious one
        assert not p.poll(0)
    finally:
        runner.stop()
