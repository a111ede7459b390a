"""FuseServer against a stub FileSystem: INIT negotiation, dispatch, validation."""
from __future__ import annotations

import errno

import pytest

from test_fuse_fakes import FakeReader, FakeWriter, FuseError, Session
from vhostfs.errors import FuseProtocolError
from vhostfs.fs.api import Attr, Entry, FileSystem
from vhostfs.fuse import abi
from vhostfs.fuse.server import WANTED_FLAGS, FuseServer

O = abi.Opcode
ATTR = Attr(2, 0, 0, 0, 0, 0, 0, 0, 0, 0o100644, 1, 0, 0, 0, 4096)


class StubFs(FileSystem):
    def __init__(self):
        self.calls = []

    def lookup(self, ctx, parent, name):
        self.calls.append(("lookup", parent, name, ctx.uid, ctx.gid, ctx.pid))
        if name == b"boom":
            raise RuntimeError("bug")
        if name == b"missing":
            raise FileNotFoundError(errno.ENOENT, "x")
        return Entry(2, 0, ATTR, 1.0, 1.0)

    def forget(self, nodeid, nlookup):
        self.calls.append(("forget", nodeid, nlookup))

    def mkdir(self, ctx, parent, name, mode):
        self.calls.append(("mkdir", parent, name, mode, ctx.umask))
        return Entry(3, 0, ATTR, 1.0, 1.0)

    def rename(self, ctx, parent, name, newparent, newname, flags):
        self.calls.append(("rename", parent, name, newparent, newname, flags))


@pytest.fixture
def stub():
    return StubFs()


@pytest.fixture
def sess(stub):
    s = Session(FuseServer(stub))
    s.init()
    return s


def hdr(length, opcode, unique=9, nodeid=1, extlen=0):
    return abi.fuse_in_header.pack(length, opcode, unique, nodeid, 0, 0, 1, extlen, 0)


def test_init_negotiation(stub):
    s = Session(FuseServer(stub))
    offered = WANTED_FLAGS | abi.FUSE_POSIX_LOCKS | abi.FUSE_FLOCK_LOCKS | abi.FUSE_WRITEBACK_CACHE \
        | abi.FUSE_EXPORT_SUPPORT
    out = s.init(minor=36, flags=offered & 0xFFFFFFFF, flags2=offered >> 32, max_readahead=65536)
    major, minor, ra, flags, maxbg, cong, max_write, gran, max_pages, _align, flags2, *_ = out
    assert (major, minor, ra, max_write, max_pages) == (7, 36, 65536, 1 << 20, 256)
    assert flags == WANTED_FLAGS & 0xFFFFFFFF
    assert not flags & (abi.FUSE_POSIX_LOCKS | abi.FUSE_FLOCK_LOCKS | abi.FUSE_WRITEBACK_CACHE
                        | abi.FUSE_EXPORT_SUPPORT)
    assert flags2 == 0


def test_init_only_offered_flags(stub):
    s = Session(FuseServer(stub))
    out = s.init(flags=abi.FUSE_ASYNC_READ | abi.FUSE_BIG_WRITES, flags2=0)
    assert out[3] == abi.FUSE_ASYNC_READ | abi.FUSE_BIG_WRITES
    assert out[8] == 0  # no MAX_PAGES offered -> max_pages left 0


def test_init_minor_capped_and_newer_major(stub):
    s = Session(FuseServer(stub))
    body = abi.fuse_init_in.pack(8, 1, 0, 0, 0, *([0] * 11))
    out = s.request(O.INIT, 0, body)
    assert abi.fuse_init_out.unpack(out)[:2] == (7, 41)
    assert not s.server.initialized
    assert s.init(minor=99)[1] == 41


def test_init_old_minor_gets_compat_size(stub):
    s = Session(FuseServer(stub))
    body = abi.fuse_init_in.pack(7, 22, 0, 0, 0, *([0] * 11))[:16]
    assert len(s.request(O.INIT, 0, body)) == abi.FUSE_COMPAT_22_INIT_OUT_SIZE


def test_init_old_major_rejected(stub):
    s = Session(FuseServer(stub))
    with pytest.raises(FuseError) as e:
        s.request(O.INIT, 0, abi.fuse_init_in.pack(6, 0, 0, 0, 0, *([0] * 11)))
    assert e.value.errno == errno.EPROTO


def test_requests_before_init_and_second_init(stub):
    s = Session(FuseServer(stub))
    with pytest.raises(FuseError) as e:
        s.request(O.LOOKUP, 1, b"a\0")
    assert e.value.errno == errno.EIO
    s.init()
    with pytest.raises(FuseError) as e:
        s.init()
    assert e.value.errno == errno.EPROTO


def test_destroy_allows_reinit(sess):
    assert sess.request(O.DESTROY, 0) == b""
    with pytest.raises(FuseError):
        sess.request(O.LOOKUP, 1, b"a\0")
    sess.init()


def test_lookup_dispatch_and_context(sess, stub):
    out = sess.request(O.LOOKUP, 1, b"name\0", uid=1000, gid=100)
    assert abi.fuse_entry_out.unpack(out)[0] == 2
    assert stub.calls[-1] == ("lookup", 1, b"name", 1000, 100, 4242)


def test_oserror_becomes_errno(sess):
    with pytest.raises(FuseError) as e:
        sess.request(O.LOOKUP, 1, b"missing\0")
    assert e.value.errno == errno.ENOENT


def test_unexpected_exception_is_eio(sess):
    with pytest.raises(FuseError) as e:
        sess.request(O.LOOKUP, 1, b"boom\0")
    assert e.value.errno == errno.EIO


@pytest.mark.parametrize("opcode", [O.GETLK, O.SETUPMAPPING, O.TMPFILE, O.LSEEK,
                                    O.SYNCFS, O.BMAP, O.STATX, 53, 4096, 0, 0xFFFFFFFF])
def test_unknown_and_unimplemented_opcodes(sess, opcode):
    body = bytes(64)
    if opcode == O.LSEEK:
        body = abi.fuse_lseek_in.pack(1, 0, 3, 0)  # SEEK_DATA: valid, the stub has no lseek
    with pytest.raises(FuseError) as e:
        sess.request(opcode, 1, body)
    assert e.value.errno == errno.ENOSYS


def test_unimplemented_xattr_is_enosys_and_ioctl_enotty(sess):
    body = abi.fuse_setxattr_in_compat.pack(1, 0) + b"user.a\0v"  # no SETXATTR_EXT: 8 bytes
    with pytest.raises(FuseError) as e:
        sess.request(O.SETXATTR, 1, body)
    assert e.value.errno == errno.ENOSYS
    with pytest.raises(FuseError) as e:
        sess.request(O.IOCTL, 1, abi.fuse_ioctl_in.pack(1, 0, 0x5401, 0, 0, 0))
    assert e.value.errno == errno.ENOTTY


def test_default_filesystem_methods_are_enosys(sess):
    with pytest.raises(FuseError) as e:
        sess.request(O.GETATTR, 1, abi.fuse_getattr_in.pack(0, 0, 0))
    assert e.value.errno == errno.ENOSYS


@pytest.mark.parametrize("body", [b"", b"abc", b"\0", b"a/b\0", b"../x\0", b"/\0"])
def test_bad_names(sess, stub, body):
    n = len(stub.calls)
    with pytest.raises(FuseError) as e:
        sess.request(O.LOOKUP, 1, body)
    assert e.value.errno == errno.EINVAL
    assert len(stub.calls) == n


def test_name_too_long(sess):
    with pytest.raises(FuseError) as e:
        sess.request(O.LOOKUP, 1, b"a" * 256 + b"\0")
    assert e.value.errno == errno.ENAMETOOLONG


def test_header_len_must_match_buffer(sess):
    for length in (39, 41, 45, 1000):
        err, _ = sess.raw(hdr(length, O.LOOKUP) + b"a\0")
        assert err == errno.EINVAL


def test_extensions_rejected(sess):
    err, _ = sess.raw(hdr(42, O.LOOKUP, extlen=1) + b"a\0")
    assert err == errno.EINVAL


def test_short_header_is_protocol_error(sess):
    with pytest.raises(FuseProtocolError):
        sess.server.handle(FakeReader(bytes(39)), FakeWriter(100))


def test_tiny_reply_buffer_is_protocol_error(sess):
    with pytest.raises(FuseProtocolError):
        sess.server.handle(FakeReader(hdr(42, O.LOOKUP) + b"a\0"), FakeWriter(15))


@pytest.mark.parametrize("opcode,size", [(O.MKDIR, 8), (O.RENAME, 8), (O.RENAME2, 16),
                                         (O.SETATTR, 88), (O.OPEN, 8), (O.READ, 40),
                                         (O.WRITE, 40), (O.CREATE, 16), (O.LINK, 8),
                                         (O.MKNOD, 16), (O.ACCESS, 8), (O.FSYNC, 16),
                                         (O.RELEASE, 24), (O.FLUSH, 24)])
def test_truncated_structs(sess, opcode, size):
    with pytest.raises(FuseError) as e:
        sess.request(opcode, 1, bytes(size - 1))
    assert e.value.errno == errno.EINVAL


def test_mkdir_passes_umask(sess, stub):
    sess.request(O.MKDIR, 1, abi.fuse_mkdir_in.pack(0o40777, 0o022) + b"d\0")
    assert stub.calls[-1] == ("mkdir", 1, b"d", 0o40777, 0o022)


def test_rename_and_rename2(sess, stub):
    sess.request(O.RENAME, 1, abi.fuse_rename_in.pack(5) + b"a\0b\0")
    assert stub.calls[-1] == ("rename", 1, b"a", 5, b"b", 0)
    sess.request(O.RENAME2, 1, abi.fuse_rename2_in.pack(5, 1, 0) + b"a\0b\0")
    assert stub.calls[-1] == ("rename", 1, b"a", 5, b"b", 1)
    with pytest.raises(FuseError):
        sess.request(O.RENAME, 1, abi.fuse_rename_in.pack(5) + b"a\0b")


def test_forget_has_no_reply_even_when_malformed(sess, stub):
    assert sess.request(O.FORGET, 7, abi.fuse_forget_in.pack(3)) is None
    assert stub.calls[-1] == ("forget", 7, 3)
    assert sess.request(O.FORGET, 7, b"\1") is None
    body = abi.fuse_batch_forget_in.pack(5, 0) + abi.fuse_forget_one.pack(8, 1) \
        + abi.fuse_forget_one.pack(9, 2)  # count says 5, only 2 present
    assert sess.request(O.BATCH_FORGET, 0, body) is None
    assert stub.calls[-2:] == [("forget", 8, 1), ("forget", 9, 2)]


def test_write_size_limits(sess):
    with pytest.raises(FuseError) as e:
        sess.request(O.WRITE, 2, abi.fuse_write_in.pack(1, 0, (1 << 20) + 1, 0, 0, 0, 0))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(FuseError) as e:  # claims 10 bytes, carries 3
        sess.request(O.WRITE, 2, abi.fuse_write_in.pack(1, 0, 10, 0, 0, 0, 0) + b"abc")
    assert e.value.errno == errno.EINVAL


def test_read_size_limit(sess):
    with pytest.raises(FuseError) as e:
        sess.request(O.READ, 2, abi.fuse_read_in.pack(1, 0, (1 << 20) + 1, 0, 0, 0, 0))
    assert e.value.errno == errno.EINVAL


def test_max_write_validation():
    with pytest.raises(ValueError):
        FuseServer(StubFs(), max_write=100)
