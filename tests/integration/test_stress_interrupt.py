"""Blocking requests through the whole daemon, driven like a guest would: real SETLKW
waits on host OFD/flock locks, FUSE_INTERRUPT on the hiprio queue, ring stop with
waiters in flight.

Linux's virtio-fs driver never sends FUSE_INTERRUPT (fs/fuse/virtio_fs.c:
``virtio_fs_wake_interrupt_and_unlock`` is a TODO), so INTERRUPT cancellation can only
be tested here, through the simulated frontend.  The pool has ONE thread: the waiters
would starve everything if they ran on it.  Every wait is bounded and fails loudly.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select

import pytest

from tests.integration.test_stress import BOUND, DRIVER, Backend
from tests.support import fuse_client as fc
from tests.support.driver import Driver, FakeGuestMemory
from tests.support.frontend import Frontend
from vhostfs.fuse import abi

O = abi.Opcode
FLOCK_LOCKS = 1 << 10
OFFSET_MAX = (1 << 63) - 1


def lk(opcode: int, nodeid: int, fh: int, owner: int, typ: int, *, flock: bool = False,
       start: int = 0, end: int = 99) -> fc.Op:
    args = abi.fuse_lk_in.pack(fh, owner, start, end, typ, 4242, abi.FUSE_LK_FLOCK if flock else 0, 0)
    return fc.Op(opcode, nodeid, args, abi.fuse_lk_out.size if opcode == O.GETLK else 0)


class Device:
    """hiprio as a plain Driver (INTERRUPT has no reply), one request queue as a RingChannel."""

    def __init__(self, tmp_path, pool: int = 1) -> None:
        share = tmp_path / "share"
        share.mkdir()
        (share / "f").write_bytes(b"\0" * 100)
        self.share = share
        sock = str(tmp_path / "intr.sock")
        self.backend = Backend(share, sock, None, pool=pool, queues=1)
        self.fe = Frontend.connect(sock)
        self.fe.init(2)
        self.mem = FakeGuestMemory([(0, 16 << 20)])
        self.fe.set_memory(self.mem)
        self.hiprio = Driver(self.mem, 64, event_idx=True)
        self.hvring = self.fe.start_vring(0, 64, self.hiprio.desc_uva, self.hiprio.avail_uva,
                                          self.hiprio.used_uva)
        self.hiprio.set_used_event(0)
        self.drv = DRIVER(self.mem, 256, event_idx=True)
        vring = self.fe.start_vring(1, 256, self.drv.desc_uva, self.drv.avail_uva, self.drv.used_uva)
        self.drv.set_used_event(0)
        self.ch = fc.RingChannel(self.drv, vring.call_fd, vring.kick, depth=32, data_size=4096,
                                 body_size=4096, uid=os.getuid(), gid=os.getgid(), pid=os.getpid())
        self.pending: dict[int, fc.Reply] = {}

    def call(self, op: fc.Op) -> fc.Reply:
        """One request and its reply; replies to other requests that come back in the
        same batch are kept for later (RingChannel.call would drop them)."""
        unique = self.submit(op)
        r = self.collect([unique])[unique]
        assert r.error == 0, (op.opcode, r.error)
        return r

    def submit(self, op: fc.Op) -> int:
        return self.ch.submit(op)

    def collect(self, uniques, *, bound: float = BOUND) -> dict[int, fc.Reply]:
        """Wait (bounded) until every unique in ``uniques`` has its reply."""
        import time
        want = set(uniques)
        deadline = time.monotonic() + bound
        while not want <= self.pending.keys():
            for r in self.ch.reap():
                assert r.unique not in self.pending, f"second reply for {r.unique}"
                self.pending[r.unique] = r
            if want <= self.pending.keys():
                break
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no reply within {bound} s for {sorted(want - self.pending.keys())}")
            self.ch.wait(min(left, 1.0))
        return {u: self.pending.pop(u) for u in want}

    def next_reply(self, uniques) -> int:
        """Wait (bounded) until one of ``uniques`` has its reply; return which."""
        import time
        deadline = time.monotonic() + BOUND
        while True:
            for r in self.ch.reap():
                assert r.unique not in self.pending, f"second reply for {r.unique}"
                self.pending[r.unique] = r
            for u in uniques:
                if u in self.pending:
                    return u
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"none of {sorted(uniques)} was answered within {BOUND} s; "
                            f"host locks: {open('/proc/locks').read()}")
            self.ch.wait(min(left, 1.0))

    def no_reply_yet(self, uniques) -> bool:
        for r in self.ch.reap():
            self.pending[r.unique] = r
        return not (set(uniques) & self.pending.keys())

    def interrupt(self, unique: int) -> None:
        """FUSE_INTERRUPT on the hiprio queue; waits (bounded) until the device used it."""
        body = abi.fuse_interrupt_in.pack(unique)
        hdr = fc.in_header(O.INTERRUPT, unique | (1 << 63), 0, abi.fuse_in_header.size + len(body))
        head = self.hiprio.add_chain([hdr + body])
        if self.hiprio.kick_needed():
            self.hvring.kick()
        ready = select.select([self.hvring.call_fd], [], [], BOUND)[0]
        assert ready, "INTERRUPT was not completed on the hiprio queue"
        os.eventfd_read(self.hvring.call_fd)
        done = self.hiprio.used()
        assert [(c.head, c.length) for c in done] == [(head, 0)]
        self.hiprio.set_used_event(self.hiprio.last_used)

    def close(self) -> None:
        self.fe.close()
        self.backend.join()
        self.mem.close()


@pytest.fixture
def dev(tmp_path):
    d = Device(tmp_path)
    try:
        init = fc.decode_init(d.call(fc.encode_init(flags=fc.INIT_FLAGS | FLOCK_LOCKS)).body)
        assert init.flags & abi.FUSE_POSIX_LOCKS and init.flags & FLOCK_LOCKS
        d.nodeid = fc.decode_entry(d.call(fc.encode_lookup(abi.ROOT_ID, "f")).body).nodeid
        yield d
    finally:
        d.close()


def host_can_lock(path) -> bool:
    with open(path, "r+b") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)
        except OSError:
            return False
        return True


@pytest.mark.parametrize("flock", [False, True], ids=["posix", "flock"])
def test_interrupt_cancels_one_waiter_and_the_rest_get_the_lock_in_turn(dev, flock):
    waiters = 3     # pool of 1: N+2
    fhs = [fc.decode_open(dev.call(fc.encode_open(dev.nodeid, os.O_RDWR)).body)[0]
           for _ in range(waiters + 2)]
    holder, victim, rest = fhs[0], fhs[1], fhs[2:]
    dev.call(lk(O.SETLK, dev.nodeid, holder, 100, fcntl.F_WRLCK, flock=flock))
    if not flock:
        assert not host_can_lock(dev.share / "f"), "the lock is not a host lock"
    u_victim = dev.submit(lk(O.SETLKW, dev.nodeid, victim, 101, fcntl.F_WRLCK, flock=flock))
    u_rest = [dev.submit(lk(O.SETLKW, dev.nodeid, fh, 102 + i, fcntl.F_WRLCK, flock=flock))
              for i, fh in enumerate(rest)]
    # the single pool thread still serves quick requests while all waiters wait
    for _ in range(5):
        dev.call(fc.encode_getattr(dev.nodeid))
    assert dev.no_reply_yet([u_victim] + u_rest)
    dev.interrupt(u_victim)
    r = dev.collect([u_victim])[u_victim]
    assert r.error == -errno.EINTR
    assert dev.no_reply_yet(u_rest)           # the others still wait: the holder holds
    # the unlock, queued behind the waiters, is served; then each waiter in turn
    dev.call(lk(O.SETLK, dev.nodeid, holder, 100, fcntl.F_UNLCK, flock=flock))
    outstanding = {u: (fh, 102 + i) for i, (u, fh) in enumerate(zip(u_rest, rest))}
    while outstanding:
        got = dev.next_reply(outstanding)
        r = dev.pending.pop(got)
        assert r.error == 0, r.error
        fh, owner = outstanding.pop(got)
        # one holder at a time: everyone else still waits
        assert dev.no_reply_yet(list(outstanding))
        dev.call(lk(O.SETLK, dev.nodeid, fh, owner, fcntl.F_UNLCK, flock=flock))
    assert host_can_lock(dev.share / "f")


def test_interrupt_before_the_request_arrives(dev):
    """INTERRUPT may overtake its request (hiprio vs request queue): remembered."""
    fh1, fh2 = (fc.decode_open(dev.call(fc.encode_open(dev.nodeid, os.O_RDWR)).body)[0]
                for _ in range(2))
    dev.call(lk(O.SETLK, dev.nodeid, fh1, 1, fcntl.F_WRLCK))
    unique = dev.ch._next_unique          # the unique the next submit will use
    dev.interrupt(unique)
    assert dev.submit(lk(O.SETLKW, dev.nodeid, fh2, 2, fcntl.F_WRLCK)) == unique
    assert dev.collect([unique])[unique].error == -errno.EINTR


def test_ring_stop_with_waiters_in_flight(dev):
    """GET_VRING_BASE must not hang on lock waits: they are cancelled (EINTR, which the
    Linux client turns into a restarted syscall), and every popped chain is in the used
    ring before the base is reported."""
    fhs = [fc.decode_open(dev.call(fc.encode_open(dev.nodeid, os.O_RDWR)).body)[0]
           for _ in range(4)]
    dev.call(lk(O.SETLK, dev.nodeid, fhs[0], 1, fcntl.F_WRLCK))
    us = [dev.submit(lk(O.SETLKW, dev.nodeid, fh, 2 + i, fcntl.F_WRLCK)) for i, fh in enumerate(fhs[1:])]
    dev.call(fc.encode_getattr(dev.nodeid))       # all three were popped before this reply
    assert dev.no_reply_yet(us)
    base = dev.fe.stop_vring(1)
    assert base == dev.drv.used_idx == dev.drv.avail_idx
    replies = dev.collect(us)
    assert all(r.error == -errno.EINTR for r in replies.values())
