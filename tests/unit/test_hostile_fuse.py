"""Hostile FUSE requests not covered elsewhere (docs/hostile-inputs.md lists them all):
every one gets an errno reply, touches nothing, and the session keeps serving."""
from __future__ import annotations

import errno
import os

import pytest

from test_fuse_fakes import FuseError
from test_passthrough_roundtrip import Client, err
from vhostfs.fs.passthrough import PassthroughFs
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer

O = abi.Opcode


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    (d / "f").write_bytes(b"0123456789")
    (d / "sub").mkdir()
    return d


@pytest.fixture
def c(share):
    cl = Client(FuseServer(PassthroughFs(str(share))))
    cl.init()
    return cl


def still_serves(c):
    assert c.lookup(1, b"f")[0] > 1


def test_forgotten_nodeid_is_enoent_and_never_reused(c, share):
    nid = c.lookup(1, b"f")[0]
    c.forget(nid, 1)
    assert err(c.getattr, nid) == errno.ENOENT
    assert err(c.lookup, nid, b"x") == errno.ENOENT
    assert err(c.open, nid, os.O_RDONLY) == errno.ENOENT
    again = c.lookup(1, b"f")[0]
    assert again != nid                     # a new nodeid: the old one stays dead
    still_serves(c)


def test_forget_more_than_looked_up_and_twice(c):
    nid = c.lookup(1, b"f")[0]
    c.forget(nid, 1000)                     # over-forget: released, no underflow
    c.forget(nid, 1)                        # already forgotten: ignored
    c.forget(2**64 - 1, 5)                  # never issued: ignored
    c.forget(1, 99)                         # the root is never dropped
    assert c.getattr(1)
    still_serves(c)


def test_released_and_guessed_file_handles_are_ebadf(c):
    nid = c.lookup(1, b"f")[0]
    fh = c.open(nid, os.O_RDONLY)
    assert c.read(nid, fh, 0, 4) == b"0123"
    c.release(nid, fh)
    assert err(c.read, nid, fh, 0, 4) == errno.EBADF
    for guess in (fh + 1, 0, 2**64 - 1):
        assert err(c.read, nid, guess, 0, 4) == errno.EBADF
        assert err(c.write, nid, guess, 0, b"x") == errno.EBADF
    dfh = c.opendir(1)
    assert err(c.read, 1, dfh, 0, 4) == errno.EBADF      # a dir handle is not a file handle
    assert err(c.readdir, 1, fh) == errno.EBADF          # and the other way round
    still_serves(c)


@pytest.mark.parametrize("op", ["mkdir", "unlink", "rmdir", "symlink", "mknod", "create",
                                "rename_from", "rename_to", "link"])
@pytest.mark.parametrize("name", [b".", b".."])
def test_dot_names_refused_where_not_allowed(c, share, op, name):
    before = sorted(os.listdir(share.parent))
    sub = c.lookup(1, b"sub")[0]
    f = c.lookup(1, b"f")[0]
    n0 = name + b"\0"
    bodies = {
        "mkdir": (O.MKDIR, sub, abi.fuse_mkdir_in.pack(0o755, 0) + n0),
        "unlink": (O.UNLINK, sub, n0),
        "rmdir": (O.RMDIR, sub, n0),
        "symlink": (O.SYMLINK, sub, n0 + b"target\0"),
        "mknod": (O.MKNOD, sub, abi.fuse_mknod_in.pack(0o100644, 0, 0, 0) + n0),
        "create": (O.CREATE, sub, abi.fuse_create_in.pack(os.O_RDWR | os.O_CREAT, 0o100644, 0, 0) + n0),
        "rename_from": (O.RENAME, sub, abi.fuse_rename_in.pack(1) + n0 + b"x\0"),
        "rename_to": (O.RENAME, 1, abi.fuse_rename_in.pack(sub) + b"f\0" + n0),
        "link": (O.LINK, sub, abi.fuse_link_in.pack(f) + n0),
    }
    opcode, nodeid, body = bodies[op]
    with pytest.raises(FuseError) as e:
        c.request(opcode, nodeid, body)
    assert e.value.errno == errno.EINVAL
    assert sorted(os.listdir(share.parent)) == before
    assert (share / "f").read_bytes() == b"0123456789" and (share / "sub").is_dir()
    still_serves(c)


def test_unknown_rename_flags_are_einval(c, share):
    body = abi.fuse_rename2_in.pack(1, 1 << 30, 0) + b"f\0g\0"
    with pytest.raises(FuseError) as e:
        c.request(O.RENAME2, 1, body)
    assert e.value.errno == errno.EINVAL
    assert (share / "f").exists() and not (share / "g").exists()


def test_unknown_open_flags_are_dropped_not_passed(c, share):
    nid = c.lookup(1, b"f")[0]
    # every bit the passthrough does not pass (O_CREAT, O_DIRECTORY, O_PATH, O_TMPFILE,
    # unknown high bits...) set on a read-only open: the file opens as a plain file
    junk = os.O_CREAT | os.O_EXCL | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NOCTTY | 0x7F000000
    fh = c.open(nid, os.O_RDONLY | junk)
    assert c.read(nid, fh, 0, 10) == b"0123456789"
    c.release(nid, fh)


def test_unknown_setattr_valid_bits_change_nothing(c, share):
    nid = c.lookup(1, b"f")[0]
    st0 = os.stat(share / "f")
    body = abi.fuse_setattr_in.pack(1 << 30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    try:
        c.request(O.SETATTR, nid, body)
    except FuseError as e:
        assert e.value.errno in (errno.EINVAL, errno.ENOSYS)
    st1 = os.stat(share / "f")
    assert (st1.st_size, st1.st_mode, st1.st_uid, st1.st_mtime_ns) == \
        (st0.st_size, st0.st_mode, st0.st_uid, st0.st_mtime_ns)


def test_readdir_size_over_max_read_is_einval(c):
    dfh = c.opendir(1)
    server = c.server
    assert err(c.readdir, 1, dfh, 0, server.max_read + 1) == errno.EINVAL
    assert err(c.readdir, 1, dfh, 0, 2**32 - 1, True) == errno.EINVAL
    assert c.readdir(1, dfh, 0, server.max_read)          # the cap itself is served


def test_read_size_over_max_read_is_einval_and_capacity_caps_it(c):
    nid = c.lookup(1, b"f")[0]
    fh = c.open(nid, os.O_RDONLY)
    assert err(c.read, nid, fh, 0, c.server.max_read + 1) == errno.EINVAL
    assert err(c.read, nid, fh, 0, 2**32 - 1) == errno.EINVAL
    # a size the guest buffer cannot hold is clamped to the buffer, never overrun
    assert c.read(nid, fh, 0, 10, capacity=16 + 4) == b"0123"


def test_init_with_absurd_values_negotiates_what_we_support(share):
    from test_fuse_fakes import Session
    s = Session(FuseServer(PassthroughFs(str(share))))
    out = s.init(minor=0xFFFFFFFF, flags=0xFFFFFFFF, flags2=0xFFFFFFFF, max_readahead=2**32 - 1)
    major, minor = out[0], out[1]
    assert major == 7 and minor == abi.KERNEL_MINOR_VERSION
    max_write = out[6]
    assert max_write == s.server.max_write


def test_length_field_disagreeing_with_the_chain(c):
    hdr = abi.fuse_in_header
    for claimed in (0, 39, 40, 41 + 100, 2**32 - 1):
        err_, _ = c.raw(hdr.pack(claimed, O.LOOKUP, 2, 1, 0, 0, 1, 0, 0) + b"f\0")
        assert err_ == errno.EINVAL
    still_serves(c)


def test_write_past_max_write_or_the_chain(c, share):
    nid = c.lookup(1, b"f")[0]
    fh = c.open(nid, os.O_RDWR)
    body = abi.fuse_write_in.pack(fh, 0, c.server.max_write + 1, 0, 0, 0, 0)
    assert err(c.request, O.WRITE, nid, body) == errno.EINVAL
    body = abi.fuse_write_in.pack(fh, 0, 100, 0, 0, 0, 0) + b"short"
    assert err(c.request, O.WRITE, nid, body) == errno.EINVAL
    body = abi.fuse_write_in.pack(fh, 2**63, 1, 0, 0, 0, 0) + b"x"
    assert err(c.request, O.WRITE, nid, body) == errno.EINVAL
    assert (share / "f").read_bytes() == b"0123456789"
