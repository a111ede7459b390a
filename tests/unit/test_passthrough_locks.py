"""GETLK/SETLK/SETLKW and flock through FuseServer + PassthroughFs: host-visible locks,
release on FLUSH / RELEASE, SETLKW waiting and cancellation, INTERRUPT."""
from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time

import pytest

from test_fuse_fakes import FakeReader, FakeWriter
from test_passthrough_roundtrip import Client, err
from vhostfs.fs.api import EventCancel
from vhostfs.fs.passthrough import PassthroughFs
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer

O = abi.Opcode
EOF_ = (1 << 63) - 1
_flock = struct.Struct("hhqqi4x")


class LockClient(Client):
    def lk(self, op, nodeid, fh, owner, start, end, typ, pid=100, flock=False):
        body = abi.fuse_lk_in.pack(fh, owner, start, end, typ, pid,
                                   abi.FUSE_LK_FLOCK if flock else 0, 0)
        return self.request(op, nodeid, body)

    def getlk(self, nodeid, fh, owner, start, end, typ):
        return abi.fuse_lk_out.unpack(self.lk(O.GETLK, nodeid, fh, owner, start, end, typ))

    def flush(self, nodeid, fh, owner):
        assert self.request(O.FLUSH, nodeid, abi.fuse_flush_in.pack(fh, 0, 0, owner)) == b""

    def release_flock(self, nodeid, fh, owner):
        body = abi.fuse_release_in.pack(fh, 0, abi.FUSE_RELEASE_FLOCK_UNLOCK, owner)
        assert self.request(O.RELEASE, nodeid, body) == b""


@pytest.fixture
def c(share):
    cl = LockClient(FuseServer(PassthroughFs(str(share))))
    cl.init()
    return cl


@pytest.fixture
def f(c, share):
    """A file with two guest handles: (nodeid, fh1, fh2)."""
    (share / "f").write_bytes(b"x" * 1000)
    node = c.lookup(1, b"f")[0]
    return node, c.open(node), c.open(node)


def host_conflict(path, start, length, typ=fcntl.F_WRLCK) -> bool:
    """Would a host process's OFD lock conflict?"""
    fd = os.open(path, os.O_RDWR)
    try:
        out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock.pack(typ, 0, start, length, 0))
        return _flock.unpack(out)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def test_init_offers_locks(share):
    s = LockClient(FuseServer(PassthroughFs(str(share))))
    flags = s.init()[3]
    assert flags & abi.FUSE_POSIX_LOCKS and flags & abi.FUSE_FLOCK_LOCKS


def test_posix_locks_conflict_between_owners_and_are_host_visible(c, f, share):
    node, fh1, fh2 = f
    c.lk(O.SETLK, node, fh1, 0xA, 0, 99, fcntl.F_WRLCK, pid=11)
    assert host_conflict(share / "f", 0, 100)
    assert not host_conflict(share / "f", 100, 0)
    assert err(c.lk, O.SETLK, node, fh2, 0xB, 50, EOF_, fcntl.F_WRLCK) == errno.EAGAIN
    # owner B sees A's lock, with A's guest pid; owner A sees no conflict with itself
    assert c.getlk(node, fh2, 0xB, 50, EOF_, fcntl.F_RDLCK) == (0, 99, fcntl.F_WRLCK, 11)
    assert c.getlk(node, fh1, 0xA, 0, EOF_, fcntl.F_WRLCK)[2] == fcntl.F_UNLCK
    # a non-overlapping range and shared read locks are fine
    c.lk(O.SETLK, node, fh2, 0xB, 100, 199, fcntl.F_WRLCK)
    c.lk(O.SETLK, node, fh1, 0xA, 0, 99, fcntl.F_RDLCK)        # A downgrades
    c.lk(O.SETLK, node, fh2, 0xB, 0, 49, fcntl.F_RDLCK)
    c.lk(O.SETLK, node, fh1, 0xA, 0, 99, fcntl.F_UNLCK)
    c.lk(O.SETLK, node, fh2, 0xB, 0, 99, fcntl.F_WRLCK)


def test_host_lock_blocks_guest(c, f, share):
    node, fh1, _ = f
    fd = os.open(share / "f", os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock.pack(fcntl.F_WRLCK, 0, 10, 1, 0))
        assert err(c.lk, O.SETLK, node, fh1, 0xA, 0, EOF_, fcntl.F_RDLCK) == errno.EAGAIN
        start, end, typ, pid = c.getlk(node, fh1, 0xA, 0, EOF_, fcntl.F_RDLCK)
        assert (start, end, typ, pid) == (10, 10, fcntl.F_WRLCK, 0)  # not a guest owner
    finally:
        os.close(fd)
    c.lk(O.SETLK, node, fh1, 0xA, 0, EOF_, fcntl.F_RDLCK)


def test_flush_releases_the_owners_locks_only(c, f, share):
    node, fh1, fh2 = f
    c.lk(O.SETLK, node, fh1, 0xA, 0, 9, fcntl.F_WRLCK)
    c.lk(O.SETLK, node, fh2, 0xB, 20, 29, fcntl.F_WRLCK)
    c.flush(node, fh2, 0xA)          # A closed some descriptor of the file
    assert not host_conflict(share / "f", 0, 10)
    assert host_conflict(share / "f", 20, 10)  # B's lock stays
    c.flush(node, fh1, 0xC)          # an owner without locks: nothing happens
    assert host_conflict(share / "f", 20, 10)


def test_setlkw_waits_until_granted(c, f):
    node, fh1, fh2 = f
    c.lk(O.SETLK, node, fh1, 0xA, 0, EOF_, fcntl.F_WRLCK)
    done = []
    t = threading.Thread(target=lambda: done.append(c.lk(O.SETLKW, node, fh2, 0xB, 0, 0, fcntl.F_WRLCK)))
    t.start()
    time.sleep(0.1)
    assert t.is_alive() and not done
    c.lk(O.SETLK, node, fh1, 0xA, 0, EOF_, fcntl.F_UNLCK)
    t.join(5)
    assert done == [b""]
    assert err(c.lk, O.SETLK, node, fh1, 0xA, 0, 0, fcntl.F_RDLCK) == errno.EAGAIN


def test_setlkw_cancelled_replies_eintr(c, f):
    node, fh1, fh2 = f
    c.lk(O.SETLK, node, fh1, 0xA, 0, EOF_, fcntl.F_WRLCK)
    cancel = EventCancel()
    body = abi.fuse_lk_in.pack(fh2, 0xB, 0, EOF_, fcntl.F_WRLCK, 7, 0, 0)
    req = abi.fuse_in_header.pack(40 + len(body), O.SETLKW, 77, node, 0, 0, 7, 0, 0) + body
    out = []

    def run():
        w = FakeWriter(4096)
        n = c.server.handle(FakeReader(req), w, cancel=cancel)
        out.append(abi.fuse_out_header.unpack_from(w.buf)[:2] + (n,))

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.1)
    assert t.is_alive()
    t0 = time.monotonic()
    cancel.set()
    t.join(5)
    assert out == [(16, -errno.EINTR, 16)]
    assert time.monotonic() - t0 < 1
    cancel.close()
    # the cancelled waiter holds nothing: after A unlocks, a third owner gets it at once
    c.lk(O.SETLK, node, fh1, 0xA, 0, EOF_, fcntl.F_UNLCK)
    c.lk(O.SETLK, node, fh1, 0xC, 0, EOF_, fcntl.F_WRLCK)


def test_flock_between_handles_and_release_unlocks(c, f, share):
    node, fh1, fh2 = f
    c.lk(O.SETLK, node, fh1, 1, 0, EOF_, fcntl.F_WRLCK, flock=True)
    assert err(c.lk, O.SETLK, node, fh2, 2, 0, EOF_, fcntl.F_RDLCK, flock=True) == errno.EAGAIN
    with open(share / "f") as hf:  # host-visible
        with pytest.raises(BlockingIOError):
            fcntl.flock(hf, fcntl.LOCK_SH | fcntl.LOCK_NB)
    # flock and POSIX locks are separate: a POSIX lock on the same bytes is granted
    c.lk(O.SETLK, node, fh2, 0xB, 0, EOF_, fcntl.F_WRLCK)
    done = []
    t = threading.Thread(target=lambda: done.append(
        c.lk(O.SETLKW, node, fh2, 2, 0, EOF_, fcntl.F_RDLCK, flock=True)))
    t.start()
    time.sleep(0.05)
    assert not done
    c.release_flock(node, fh1, 1)
    t.join(5)
    assert done == [b""]
    c.lk(O.SETLK, node, fh2, 2, 0, EOF_, fcntl.F_UNLCK, flock=True)
    with open(share / "f") as hf:
        fcntl.flock(hf, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize("start,end,typ", [(10, 5, fcntl.F_WRLCK), (0, 1 << 63, fcntl.F_WRLCK),
                                           (0, 10, 7)])
def test_bad_locks_einval(c, f, start, end, typ):
    node, fh1, _ = f
    assert err(c.lk, O.SETLK, node, fh1, 1, start, end, typ) == errno.EINVAL


def test_locks_on_directories_refused(c):
    assert err(c.lk, O.SETLK, 1, 0, 1, 0, 10, fcntl.F_WRLCK) == errno.EINVAL


def test_flock_unknown_handle(c, f):
    node, _, _ = f
    assert err(c.lk, O.SETLK, node, 999, 1, 0, EOF_, fcntl.F_WRLCK, flock=True) == errno.EBADF


def test_interrupt_calls_hook_without_reply(c):
    seen = []
    c.server.interrupt_hook = seen.append
    assert c.request(O.INTERRUPT, 0, abi.fuse_interrupt_in.pack(1234)) is None
    assert seen == [1234]
    c.server.interrupt_hook = None
    assert c.request(O.INTERRUPT, 0, abi.fuse_interrupt_in.pack(1)) is None


def test_node_type(c, f):
    import stat as st
    node, _, _ = f
    assert c.server.fs.node_type(node) == st.S_IFREG
    assert c.server.fs.node_type(1) == st.S_IFDIR
    assert c.server.fs.node_type(10 ** 9) is None
