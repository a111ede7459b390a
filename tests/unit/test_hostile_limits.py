"""Resource limits against a guest that hoards: fd exhaustion is an ENFILE reply, the
inode table is bounded (--max-inodes) and exact (FORGET honoured), sizes are capped."""
from __future__ import annotations

import errno
import gc
import os
import resource
import tracemalloc

import pytest

from test_fuse_fakes import FuseError
from test_passthrough_roundtrip import Client, err
from vhostfs.fs.passthrough import PassthroughFs
from vhostfs.fs.passthrough.inodes import DEFAULT_MAX_INODES
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer

O = abi.Opcode


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    for i in range(40):
        (d / f"f{i}").write_bytes(b"x")
    return d


def client(share, **kw):
    fs = PassthroughFs(str(share))
    for k, v in kw.items():
        setattr(fs.inodes, k, v)
    c = Client(FuseServer(fs))
    c.init()
    return c, fs


@pytest.fixture
def low_nofile():
    """RLIMIT_NOFILE just above what is open now (restored afterwards).

    Objects left by earlier tests may hold fds; collected mid-test they would free fd
    numbers under the limit and let an open the test expects to fail succeed.  So the
    garbage is collected first and the collector stays off while the limit is low.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    gc.collect()
    gc.disable()
    def lower(extra):
        used = max(int(n) for n in os.listdir("/proc/self/fd")) + 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + extra, hard))
    try:
        yield lower
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        gc.enable()


def test_fd_exhaustion_is_emfile_and_recovers(share, low_nofile):
    for i in range(40, 600):
        (share / f"f{i}").write_bytes(b"x")
    c, fs = client(share)
    first = c.lookup(1, b"f0")[0]
    low_nofile(8)
    got, failed = [], None
    for i in range(1, 600):                      # LOOKUP holds an O_PATH fd per inode
        try:
            got.append(c.lookup(1, f"f{i}".encode())[0])
        except FuseError as e:
            failed = e.errno
            break
    # EMFILE is vhostfs's own fd budget, not the guest process's: the server answers
    # ENFILE (fuse/server.py), as for a full system file table
    assert failed == errno.ENFILE, "LOOKUP never hit the fd limit"
    assert err(c.open, first, os.O_RDONLY) == errno.ENFILE      # OPEN: same errno reply
    assert err(c.create, 1, b"newfile") == errno.ENFILE
    assert err(c.opendir, 1) == errno.ENFILE
    # the session survives: forgetting inodes frees their fds
    for nid in got[:4]:
        c.forget(nid, 1)
    fh = c.open(first, os.O_RDONLY)
    assert c.read(first, fh, 0, 1) == b"x"
    c.release(first, fh)


def test_inode_bound_enfile_until_forget(share):
    c, fs = client(share, max_inodes=10)
    ids = [c.lookup(1, f"f{i}".encode())[0] for i in range(9)]   # root + 9 = 10
    assert len(fs.inodes) == 10
    assert err(c.lookup, 1, b"f9") == errno.ENFILE
    assert err(c.mkdir, 1, b"dir") == errno.ENFILE
    assert (share / "dir").is_dir()               # mkdir ran; only the inode was refused
    assert err(c.create, 1, b"c") == errno.ENFILE
    # an inode already held can still be looked up (no new entry)
    assert c.lookup(1, b"f0")[0] == ids[0]
    assert len(fs.inodes) == 10
    c.forget(ids[0], 2)                           # both lookups of f0 forgotten
    assert len(fs.inodes) == 9
    assert c.lookup(1, b"f9")[0] > ids[-1]
    assert err(c.lookup, 1, b"f10") == errno.ENFILE


def test_lookup_counts_are_exact(share):
    c, fs = client(share)
    nid = c.lookup(1, b"f0")[0]
    for _ in range(4):
        assert c.lookup(1, b"f0")[0] == nid
    assert fs.inodes.get(nid).nlookup == 5
    c.forget(nid, 3)
    assert fs.inodes.get(nid).nlookup == 2 and len(fs.inodes) == 2
    body = abi.fuse_batch_forget_in.pack(1, 0) + abi.fuse_forget_one.pack(nid, 2)
    assert c.request(O.BATCH_FORGET, 0, body) is None
    assert fs.inodes.find_id(nid) is None and len(fs.inodes) == 1


def test_a_guest_that_never_forgets_is_bounded_by_max_inodes(share):
    """Growth is linear in the inodes held and stops at max_inodes (the documented
    bound: docs/hostile-inputs.md gives the bytes per inode measured here)."""
    for i in range(40, 400):
        (share / f"f{i}").write_bytes(b"")
    c, fs = client(share, max_inodes=201)
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    refused = 0
    for i in range(400):
        try:
            c.lookup(1, f"f{i}".encode())
        except FuseError as e:
            assert e.errno == errno.ENFILE
            refused += 1
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    tracemalloc.stop()
    assert len(fs.inodes) == 201 and refused == 200
    per_inode = grown / 200
    assert per_inode < 2048, per_inode            # ~0.5-1 KiB each (measured, see docs)
    assert DEFAULT_MAX_INODES == 1 << 20


def test_lock_wait_with_fds_beyond_fd_setsize():
    """A guest holding over 1024 inodes pushes the fd of a SETLKW's cancel token past
    FD_SETSIZE: the wait must still work (it used select(), which raised ValueError, so
    every blocking lock failed with EIO; seen in a booted guest after the conformance
    suite)."""
    from vhostfs.fs.passthrough import locks
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= 1100:
        pytest.skip(f"RLIMIT_NOFILE {soft} too low for an fd above FD_SETSIZE")

    class HighCancel:            # the fs.api.Cancel protocol on an eventfd numbered 1090
        def __init__(self):
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.fd = os.dup2(efd, 1090, inheritable=False)
            os.close(efd)
            self.cancelled = False

        def fileno(self):
            return self.fd

        def is_set(self):
            return self.cancelled

        def set(self):
            self.cancelled = True
            os.eventfd_write(self.fd, 1)

    cancel = HighCancel()
    try:
        tries = []
        locks.wait_until(lambda: tries.append(1) or len(tries) >= 3, cancel)
        assert len(tries) == 3
        cancel.set()
        with pytest.raises(OSError) as e:
            locks.wait_until(lambda: False, cancel)
        assert e.value.errno == errno.EINTR
    finally:
        os.close(cancel.fd)
