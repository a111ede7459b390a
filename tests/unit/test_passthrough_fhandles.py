"""--inode-file-handles prefer|mandatory: the O_PATH fd count stays bounded, evicted
inodes are re-opened by handle, inodes in use are never evicted."""
from __future__ import annotations

import errno
import os
import threading

import pytest

from test_passthrough_extras import XClient
from test_passthrough_roundtrip import err
from vhostfs.fs.passthrough import PassthroughFs
from vhostfs.fs.passthrough.fhandles import FileHandleInodes
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer

O = abi.Opcode
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="open_by_handle_at needs CAP_DAC_READ_SEARCH")


def make(share, **kw):
    fs = PassthroughFs(str(share), **kw)
    c = XClient(FuseServer(fs))
    c.init()
    return c, fs


def test_fd_count_bounded_and_reopen(share):
    for i in range(60):
        (share / f"f{i}").write_bytes(b"x" * i)
    (share / "d").mkdir()
    c, fs = make(share, inode_file_handles="mandatory", inode_fd_cache=8)
    assert isinstance(fs.inodes, FileHandleInodes)
    nodes = [c.lookup(1, f"f{i}".encode())[0] for i in range(60)]
    assert fs.inodes.open_fds() <= 8 + 1
    assert fs.inodes.evictions >= 50
    # every evicted inode is served again, by handle
    for i, n in enumerate(nodes):
        assert c.getattr(n)[3 + 1] == i  # size
    assert fs.inodes.reopens >= 50
    assert fs.inodes.open_fds() <= 9
    # directories too: a lookup below an evicted directory works
    d = c.lookup(1, b"d")[0]
    for i in range(20):
        c.lookup(1, f"f{i}".encode())
    (share / "d" / "inner").write_bytes(b"in")
    assert c.lookup(d, b"inner")[6 + 1] == 2


def test_open_files_pin_their_inode(share):
    (share / "f").write_bytes(b"abc")
    c, fs = make(share, inode_file_handles="prefer", inode_fd_cache=1)
    node = c.lookup(1, b"f")[0]
    fh = c.open(node, os.O_RDWR)
    os.unlink(share / "f")  # deleted on the host while open in the guest
    for i in range(10):
        (share / f"g{i}").write_bytes(b"")
        c.lookup(1, f"g{i}".encode())
    assert c.getattr(node)[3 + 1] == 3          # still served: the fd was never evicted
    assert c.read(node, fh, 0, 3) == b"abc"


def test_deleted_unpinned_inode_is_estale(share):
    (share / "f").write_bytes(b"abc")
    c, fs = make(share, inode_file_handles="mandatory", inode_fd_cache=1)
    node = c.lookup(1, b"f")[0]
    for i in range(5):
        (share / f"g{i}").write_bytes(b"")
        c.lookup(1, f"g{i}".encode())
    os.unlink(share / "f")
    assert err(c.getattr, node) == errno.ESTALE


def test_forget_drops_handles_and_concurrent_use(share):
    for i in range(40):
        (share / f"f{i}").write_bytes(b"x")
    c, fs = make(share, inode_file_handles="mandatory", inode_fd_cache=4)
    nodes = [c.lookup(1, f"f{i}".encode())[0] for i in range(40)]
    errors = []

    def worker(k):
        try:
            for _ in range(30):
                for n in nodes[k::4]:
                    c.getattr(n)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for n in nodes:
        c.forget(n)
    assert len(fs.inodes) == 1 and fs.inodes.open_fds() == 0


def test_never_and_bad_values(share):
    _, fs = make(share)
    assert not isinstance(fs.inodes, FileHandleInodes)
    _, fs = make(share, inode_file_handles="fallback")
    assert isinstance(fs.inodes, FileHandleInodes)
    with pytest.raises(ValueError):
        PassthroughFs(str(share), inode_file_handles="sometimes")


def test_mandatory_refuses_a_filesystem_without_handles():
    with pytest.raises(OSError):
        PassthroughFs("/proc/self", inode_file_handles="mandatory")
    fs = PassthroughFs("/proc/self", inode_file_handles="prefer")  # falls back to fds
    assert not isinstance(fs.inodes, FileHandleInodes)


def test_no_eviction_when_handles_cannot_be_opened(share):
    """A daemon that lost CAP_DAC_READ_SEARCH after start-up keeps its fds (correct,
    unbounded) instead of evicting inodes it could not re-open."""
    for i in range(20):
        (share / f"f{i}").write_bytes(b"x")
    c, fs = make(share, inode_file_handles="prefer", inode_fd_cache=2)
    fs.inodes.reopen_ok = False   # what the probe finds without the capability
    nodes = [c.lookup(1, f"f{i}".encode())[0] for i in range(20)]
    assert fs.inodes.evictions == 0 and fs.inodes.open_fds() == 20
    assert all(c.getattr(n) for n in nodes)
