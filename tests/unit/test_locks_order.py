"""SETLKW with POSIX semantics through FuseServer + PassthroughFs, driven by threads:
EDEADLK when waiting would close a cycle of guest lock owners (fcntl(2)), conflicting
waiters granted in arrival order, independent waiters not held back, cancellation of a
queued waiter, host-held locks outside the wait-for graph."""
from __future__ import annotations

import errno
import fcntl
import os
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_fuse_fakes import FakeReader, FakeWriter
from test_passthrough_locks import LockClient, _flock
from vhostfs.fs.api import EventCancel, FileLock
from vhostfs.fs.passthrough.locks import apply_range
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer

O = abi.Opcode
EOF_ = (1 << 63) - 1
W, R, U = fcntl.F_WRLCK, fcntl.F_RDLCK, fcntl.F_UNLCK
A, B, C, D, E = 0xA, 0xB, 0xC, 0xD, 0xE


@pytest.fixture
def c(fs):
    cl = LockClient(FuseServer(fs))
    cl.init()
    return cl


def _file(c, share, name="f"):
    (share / name).write_bytes(b"x" * 1000)
    node = c.lookup(1, name.encode())[0]
    return node, c.open(node)


@pytest.fixture
def f(c, share):
    return _file(c, share)


class Wait:
    """A SETLKW sent on its own thread with its own cancel token; ``result`` is 0 or
    -errno once answered, ``granted_at`` the monotonic time of the answer."""

    def __init__(self, c, node, fh, owner, start, end, typ, then=None):
        self.cancel = EventCancel()
        self.result = None
        self.granted_at = None
        body = abi.fuse_lk_in.pack(fh, owner, start, end, typ, owner & 0xFFFF, 0, 0)
        req = abi.fuse_in_header.pack(40 + len(body), O.SETLKW, 1000 + owner, node, 0, 0,
                                      owner & 0xFFFF, 0, 0) + body

        def run():
            w = FakeWriter(4096)
            c.server.handle(FakeReader(req), w, cancel=self.cancel)
            self.granted_at = time.monotonic()
            self.result = abi.fuse_out_header.unpack_from(w.buf)[1]
            if then is not None and self.result == 0:
                then()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout=5.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "SETLKW still waiting"
        self.cancel.close()
        return self.result


def queue_len(fs, n, timeout=5.0):
    """Wait until ``n`` SETLKW requests are queued (arrival order is what is tested)."""
    deadline = time.monotonic() + timeout
    while len(fs.posix_locks.queued()) != n:
        assert time.monotonic() < deadline, fs.posix_locks.queued()
        time.sleep(0.002)


def still_waiting(*waits, for_s=0.1):
    time.sleep(for_s)
    return all(w.thread.is_alive() and w.result is None for w in waits)


def setlkw(c, node, fh, owner, start, end, typ):
    """A SETLKW expected to be answered at once (granted or refused): 0 or the errno;
    a wait is cancelled and fails the test instead of hanging it."""
    w = Wait(c, node, fh, owner, start, end, typ)
    w.thread.join(5)
    if w.thread.is_alive():
        w.cancel.set()
        w.join()
        pytest.fail("SETLKW waited instead of being answered")
    return -w.join()


# --- EDEADLK --------------------------------------------------------------------------

def test_two_owner_cycle_is_edeadlk_and_the_first_waiter_still_gets_its_lock(c, fs, f):
    node, fh = f
    c.lk(O.SETLK, node, fh, A, 0, 9, W)
    c.lk(O.SETLK, node, fh, B, 10, 19, W)
    a = Wait(c, node, fh, A, 10, 19, W)            # A waits for B
    queue_len(fs, 1)
    assert setlkw(c, node, fh, B, 0, 9, W) == errno.EDEADLK   # B would wait for A
    assert still_waiting(a)
    assert fs.posix_locks.queued() == [(A, FileLock(10, 19, W, A))]
    c.lk(O.SETLK, node, fh, B, 10, 19, U)          # B backs off
    assert a.join() == 0
    # A holds both now; B waiting on A is no cycle any more
    b = Wait(c, node, fh, B, 0, 9, W)
    assert still_waiting(b)
    c.lk(O.SETLK, node, fh, A, 0, EOF_, U)
    assert b.join() == 0


def test_three_owner_cycle(c, fs, f):
    node, fh = f
    for owner, start in ((A, 0), (B, 10), (C, 20)):
        c.lk(O.SETLK, node, fh, owner, start, start + 9, W)
    a = Wait(c, node, fh, A, 10, 19, W)            # A -> B
    queue_len(fs, 1)
    b = Wait(c, node, fh, B, 20, 29, W)            # B -> C
    queue_len(fs, 2)
    assert setlkw(c, node, fh, C, 0, 9, R) == errno.EDEADLK   # C -> A closes the cycle
    assert still_waiting(a, b)
    c.lk(O.SETLK, node, fh, C, 20, 29, U)
    assert b.join() == 0                           # B holds 10-29
    assert still_waiting(a)
    c.lk(O.SETLK, node, fh, B, 0, EOF_, U)
    assert a.join() == 0


def test_cycle_across_two_files(c, fs, share):
    n1, fh1 = _file(c, share, "f1")
    n2, fh2 = _file(c, share, "f2")
    c.lk(O.SETLK, n1, fh1, A, 0, EOF_, W)
    c.lk(O.SETLK, n2, fh2, B, 0, EOF_, W)
    a = Wait(c, n2, fh2, A, 0, 0, W)
    queue_len(fs, 1)
    assert setlkw(c, n1, fh1, B, 0, 0, W) == errno.EDEADLK
    c.flush(n2, fh2, B)                            # B closes f2: its lock goes
    assert a.join() == 0


def test_read_locks_make_no_cycle_between_readers(c, fs, f):
    node, fh = f
    c.lk(O.SETLK, node, fh, A, 0, 9, R)
    c.lk(O.SETLK, node, fh, B, 10, 19, W)
    a = Wait(c, node, fh, A, 10, 19, R)            # A waits for B's write lock
    queue_len(fs, 1)
    assert setlkw(c, node, fh, B, 0, 9, R) == 0    # shares A's read lock: granted
    c.lk(O.SETLK, node, fh, B, 10, 19, U)
    assert a.join() == 0


def test_a_host_holder_is_no_false_deadlock(c, fs, f, share):
    node, fh = f
    host = os.open(share / "f", os.O_RDWR)
    try:
        fcntl.fcntl(host, fcntl.F_OFD_SETLK, _flock.pack(W, 0, 10, 10, 0))
        c.lk(O.SETLK, node, fh, A, 0, 9, W)
        a = Wait(c, node, fh, A, 10, 19, W)        # A waits for the host process
        queue_len(fs, 1)
        b = Wait(c, node, fh, B, 0, 9, W)          # B waits for A: no cycle we can see
        queue_len(fs, 2)
        assert still_waiting(a, b)
        fcntl.fcntl(host, fcntl.F_OFD_SETLK, _flock.pack(U, 0, 10, 10, 0))
        assert a.join() == 0
        assert still_waiting(b)
        c.lk(O.SETLK, node, fh, A, 0, EOF_, U)
        assert b.join() == 0
    finally:
        os.close(host)


# --- fair order -----------------------------------------------------------------------

def test_conflicting_waiters_are_granted_in_arrival_order(c, fs, f):
    node, fh = f
    c.lk(O.SETLK, node, fh, A, 0, 99, W)
    order = []

    def holder(owner, start, end):
        def then():
            order.append(owner)
            time.sleep(0.02)
            c.lk(O.SETLK, node, fh, owner, start, end, U)
        return then

    # overlapping ranges, every pair conflicting (all write locks on byte 50)
    ranges = [(0, 99), (50, 59), (40, 50), (50, EOF_), (0, 50)]
    waits = []
    for i, (start, end) in enumerate(ranges):
        owner = 0x100 + i
        waits.append(Wait(c, node, fh, owner, start, end, W, then=holder(owner, start, end)))
        queue_len(fs, i + 1)
    assert [o for o, _l in fs.posix_locks.queued()] == [0x100 + i for i in range(5)]
    assert still_waiting(*waits)
    c.lk(O.SETLK, node, fh, A, 0, 99, U)
    assert [w.join() for w in waits] == [0] * 5
    assert order == [0x100 + i for i in range(5)]


def test_a_later_waiter_does_not_barge_past_a_conflicting_earlier_one(c, fs, f):
    node, fh = f
    c.lk(O.SETLK, node, fh, A, 0, 9, W)
    b = Wait(c, node, fh, B, 0, 19, W)             # blocked by A
    queue_len(fs, 1)
    cw = Wait(c, node, fh, C, 10, 19, W)           # free, but conflicts with B's request
    assert still_waiting(b, cw, for_s=0.2)
    c.lk(O.SETLK, node, fh, A, 0, 9, U)
    assert b.join() == 0
    assert still_waiting(cw)
    c.lk(O.SETLK, node, fh, B, 0, 19, U)
    assert cw.join() == 0


def test_a_non_conflicting_waiter_is_not_held_behind(c, fs, f):
    node, fh = f
    c.lk(O.SETLK, node, fh, A, 0, 9, W)
    c.lk(O.SETLK, node, fh, A, 20, 29, W)
    b = Wait(c, node, fh, B, 0, 9, W)
    queue_len(fs, 1)
    cw = Wait(c, node, fh, C, 20, 29, W)           # disjoint from B's request
    queue_len(fs, 2)
    t0 = time.monotonic()
    c.lk(O.SETLK, node, fh, A, 20, 29, U)
    assert cw.join() == 0 and cw.granted_at - t0 < 2.0
    assert still_waiting(b)
    # readers waiting for the same write lock share it once it goes
    d = Wait(c, node, fh, D, 0, 9, R)
    e = Wait(c, node, fh, E, 0, 9, R)
    queue_len(fs, 3)
    c.lk(O.SETLK, node, fh, A, 0, 9, U)
    assert b.join() == 0                           # B was first
    c.lk(O.SETLK, node, fh, B, 0, 9, U)
    assert d.join() == 0 and e.join() == 0


def test_an_upgrade_is_not_queued_behind_a_waiter_it_blocks(c, fs, f):
    """A holds a read lock, B waits for a write lock on it, A upgrades: yielding to B
    would deadlock (B waits for A), so A is granted at once, as Linux does."""
    node, fh = f
    c.lk(O.SETLK, node, fh, A, 0, 9, R)
    b = Wait(c, node, fh, B, 0, 9, W)
    queue_len(fs, 1)
    assert setlkw(c, node, fh, A, 0, 9, W) == 0
    assert still_waiting(b)
    c.lk(O.SETLK, node, fh, A, 0, 9, U)
    assert b.join() == 0


def test_no_yield_to_a_waiter_queued_behind_one_this_owner_blocks(c, fs, f):
    """F waits for A; E (free range) queues behind F; A then asks for bytes E wants:
    E waits for A through F, so A yielding to E would close a cycle: A is granted."""
    node, fh = f
    c.lk(O.SETLK, node, fh, A, 100, 109, R)
    fw = Wait(c, node, fh, 0xF, 100, 119, W)       # hard: F -> A
    queue_len(fs, 1)
    ew = Wait(c, node, fh, E, 110, 119, W)         # free, but behind F: E -> F
    queue_len(fs, 2)
    assert still_waiting(fw, ew)
    assert setlkw(c, node, fh, A, 110, 115, W) == 0
    c.lk(O.SETLK, node, fh, A, 0, EOF_, U)
    assert fw.join() == 0
    assert still_waiting(ew)
    c.lk(O.SETLK, node, fh, 0xF, 0, EOF_, U)
    assert ew.join() == 0


def test_non_blocking_setlk_is_not_queued(c, fs, f):
    node, fh = f
    c.lk(O.SETLK, node, fh, A, 0, 9, W)
    b = Wait(c, node, fh, B, 0, 19, W)
    queue_len(fs, 1)
    c.lk(O.SETLK, node, fh, C, 10, 19, W)          # F_SETLK: no conflicting lock held
    c.lk(O.SETLK, node, fh, A, 0, 9, U)
    assert still_waiting(b)
    c.lk(O.SETLK, node, fh, C, 10, 19, U)
    assert b.join() == 0


# --- cancellation ---------------------------------------------------------------------

def test_cancelling_a_queued_waiter_lets_the_next_one_go(c, fs, f):
    node, fh = f
    c.lk(O.SETLK, node, fh, A, 0, 9, W)            # A keeps this throughout
    b = Wait(c, node, fh, B, 0, 19, W)
    queue_len(fs, 1)
    cw = Wait(c, node, fh, C, 10, 19, W)           # behind B
    queue_len(fs, 2)
    assert still_waiting(b, cw)
    t0 = time.monotonic()
    b.cancel.set()
    assert b.join() == -errno.EINTR
    assert cw.join() == 0 and cw.granted_at - t0 < 2.0
    assert fs.posix_locks.queued() == []


def test_cancelled_waiter_leaves_no_edge(c, fs, f):
    """A cancelled SETLKW is out of the graph: no EDEADLK from a wait it no longer does."""
    node, fh = f
    c.lk(O.SETLK, node, fh, A, 0, 9, W)
    c.lk(O.SETLK, node, fh, B, 10, 19, W)
    a = Wait(c, node, fh, A, 10, 19, W)
    queue_len(fs, 1)
    a.cancel.set()
    assert a.join() == -errno.EINTR
    b = Wait(c, node, fh, B, 0, 9, W)
    assert still_waiting(b)
    c.lk(O.SETLK, node, fh, A, 0, 9, U)
    assert b.join() == 0


# --- the held-range table -------------------------------------------------------------

@pytest.mark.parametrize("held,lock,after", [
    ([], (0, 9, W), [(0, 9, W)]),
    ([(0, 9, W)], (10, 19, W), [(0, 19, W)]),                      # adjacent: merged
    ([(0, 9, W)], (3, 5, R), [(0, 2, W), (3, 5, R), (6, 9, W)]),   # split by type
    ([(0, 9, W)], (3, 5, U), [(0, 2, W), (6, 9, W)]),
    ([(0, 2, W), (6, 9, W)], (0, EOF_, U), []),
    ([(0, 2, R), (6, 9, R)], (3, 5, R), [(0, 9, R)]),
    ([(5, EOF_, W)], (0, 4, W), [(0, EOF_, W)]),
])
def test_apply_range_mirrors_the_kernel(held, lock, after):
    out = apply_range([(s, e, t, 1) for s, e, t in held], FileLock(*lock, 2))
    assert [(s, e, t) for s, e, t, _p in out] == after


def test_getlk_names_the_holder_of_a_merged_range(c, f):
    node, fh = f
    c.lk(O.SETLK, node, fh, A, 0, 9, W, pid=11)
    c.lk(O.SETLK, node, fh, A, 10, 19, W, pid=12)      # the kernel merges to 0-19
    c.lk(O.SETLK, node, fh, B, 30, 39, R, pid=13)
    c.lk(O.SETLK, node, fh, C, 30, 39, R, pid=14)
    assert c.getlk(node, fh, D, 0, EOF_, R) == (0, 19, W, 12)
    assert c.getlk(node, fh, D, 30, 30, W)[3] in (13, 14)


_ops = st.lists(st.tuples(st.integers(0, 40), st.one_of(st.integers(1, 12), st.just(0)),
                          st.sampled_from([R, W, U])), max_size=25)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_the_table_holds_what_the_kernel_holds(tmp_path_factory, ops):
    """The deadlock check trusts the table: after any sequence of one owner's locks, the
    kernel's locks on the OFD are exactly the table's ranges (split and merged alike)."""
    path = tmp_path_factory.mktemp("ofd") / "f"
    path.write_bytes(b"")
    mine, probe = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    try:
        held = []
        for start, length, typ in ops:
            end = EOF_ if length == 0 else start + length - 1
            fcntl.fcntl(mine, fcntl.F_OFD_SETLK, _flock.pack(typ, 0, start, length, 0))
            held = apply_range(held, FileLock(start, end, typ, 1))
        for byte in [*range(0, 56), 1 << 40]:
            out = fcntl.fcntl(probe, fcntl.F_OFD_GETLK, _flock.pack(W, 0, byte, 1, 0))
            typ, _w, start, length, _pid = _flock.unpack(out)
            kernel = None if typ == U else (start, EOF_ if length == 0 else start + length - 1, typ)
            table = next(((s, e, t) for s, e, t, _p in held if s <= byte <= e), None)
            assert kernel == table, (byte, held)
    finally:
        os.close(mine)
        os.close(probe)
