"""In-test Reader/Writer over bytearrays (the virtqueue Reader/Writer interface) and a
FUSE session driver; imported by the other test_fuse_* / test_passthrough_* modules."""
from __future__ import annotations

import errno
import itertools
import os
import struct

import pytest

from vhostfs.errors import ChainError
from vhostfs.fuse import abi


class FakeReader:
    def __init__(self, data: bytes) -> None:
        self._mv = memoryview(bytes(data))
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._mv) - self._pos

    def read(self, n: int) -> bytes:
        if n < 0 or n > self.remaining:
            raise ChainError(f"read of {n} beyond the readable buffers")
        out = bytes(self._mv[self._pos:self._pos + n])
        self._pos += n
        return out

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.read(st.size))

    def skip(self, n: int) -> None:
        self.read(n)

    def write_to_fd(self, fd: int, count: int, offset: int) -> int:
        if count > self.remaining:
            raise ChainError("write_to_fd beyond the readable buffers")
        done = 0
        while done < count:
            n = os.pwritev(fd, [self._mv[self._pos:self._pos + count - done]], offset + done)
            if n == 0:
                break
            self._pos += n
            done += n
        return done


class FakeWriter:
    def __init__(self, capacity: int) -> None:
        self.buf = bytearray(capacity)
        self.written = 0

    @property
    def capacity(self) -> int:
        return len(self.buf)

    def write(self, data) -> None:
        if self.written + len(data) > len(self.buf):
            raise ChainError("write beyond the writable buffers")
        self.buf[self.written:self.written + len(data)] = data
        self.written += len(data)

    def pack(self, st: struct.Struct, *values) -> None:
        self.write(st.pack(*values))

    def write_at(self, pos: int, data) -> None:
        if pos < 0 or pos + len(data) > self.written:  # like virtqueue.iov.Writer
            raise ValueError("write_at outside the bytes written")
        self.buf[pos:pos + len(data)] = data

    def read_from_fd(self, fd: int, count: int, offset: int) -> int:
        count = min(count, len(self.buf) - self.written)
        mv = memoryview(self.buf)
        done = 0
        while done < count:
            n = os.preadv(fd, [mv[self.written:self.written + count - done]], offset + done)
            if n == 0:
                break
            self.written += n
            done += n
        return done


class FuseError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(errno.errorcode.get(err, err))
        self.errno = err


class Session:
    """Drives a FuseServer with raw request bytes; checks every reply's framing."""

    def __init__(self, server, *, uid: int = 0, gid: int = 0) -> None:
        self.server = server
        self.uid, self.gid = uid, gid
        self._unique = itertools.count(2, 2)

    def raw(self, data: bytes, capacity: int = 1 << 21) -> tuple[int, bytes] | None:
        """Send raw request bytes -> (error, payload), or None when there is no reply."""
        writer = FakeWriter(capacity)
        n = self.server.handle(FakeReader(data), writer)
        if n == 0:
            return None
        length, error, _unique = abi.fuse_out_header.unpack_from(writer.buf)
        assert length == n, (length, n)
        assert error <= 0
        if error:
            assert length == abi.fuse_out_header.size
        return -error, bytes(writer.buf[16:n])

    def request(self, opcode: int, nodeid: int = 1, body: bytes = b"", *, uid=None, gid=None,
                capacity: int = 1 << 21, unique=None):
        unique = next(self._unique) if unique is None else unique
        uid = self.uid if uid is None else uid
        gid = self.gid if gid is None else gid
        hdr = abi.fuse_in_header.pack(40 + len(body), opcode, unique, nodeid, uid, gid, 4242, 0, 0)
        writer = FakeWriter(capacity)
        n = self.server.handle(FakeReader(hdr + body), writer)
        if n == 0:
            return None
        length, error, got_unique = abi.fuse_out_header.unpack_from(writer.buf)
        assert (length, got_unique) == (n, unique)
        if error:
            assert length == 16
            raise FuseError(-error)
        return bytes(writer.buf[16:n])

    def init(self, minor: int = 38, flags: int = 0xFFFFFFFF, flags2: int = 0xFFFFFFFF,
             max_readahead: int = 128 * 1024) -> tuple:
        body = abi.fuse_init_in.pack(7, minor, max_readahead, flags, flags2, *([0] * 11))
        return abi.fuse_init_out.unpack(self.request(abi.Opcode.INIT, 0, body).ljust(64, b"\0"))


def test_fake_reader_writer_round_trip(tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        r = FakeReader(b"\x01\x00\x00\x00hello world")
        assert r.unpack(struct.Struct("<I")) == (1,)
        assert r.write_to_fd(fd, 11, 3) == 11 and r.remaining == 0
        w = FakeWriter(8)
        w.write(b"ab")
        assert w.read_from_fd(fd, 100, 0) == 6  # clamped to capacity
        assert bytes(w.buf) == b"ab\0\0\0hel"
        with pytest.raises(ChainError):
            w.write(b"x")
    finally:
        os.close(fd)
