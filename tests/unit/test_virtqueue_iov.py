"""Reader/Writer over guest views: cursors across views, size errors, zero-copy file I/O."""
from __future__ import annotations

import os
import struct

import pytest

from tests.support.driver import Driver, FakeGuestMemory
from vhostfs.errors import VirtqueueError
from vhostfs.virtqueue import iov
from vhostfs.virtqueue.iov import GuestBufferTooSmall, Reader, Writer

HDR = struct.Struct("<IIQ")      # 16 bytes, like a small FUSE header


def split_views(data: bytes, cuts) -> list[memoryview]:
    """Writable views over ``data`` cut at the given sizes (the last takes the rest)."""
    buf = bytearray(data)
    mv = memoryview(buf)
    out, pos = [], 0
    for n in cuts:
        out.append(mv[pos:pos + n])
        pos += n
    out.append(mv[pos:])
    return [v for v in out if len(v)]


def test_reader_reads_across_views():
    r = Reader(split_views(bytes(range(20)), [3, 0, 5, 1]))
    assert r.remaining == 20
    assert r.read(2) == bytes([0, 1])
    assert r.read(4) == bytes([2, 3, 4, 5])
    r.skip(3)
    assert r.read(0) == b""
    assert r.read(11) == bytes(range(9, 20))
    assert r.remaining == 0


@pytest.mark.parametrize("cuts", [[16], [40], [3], [5, 5, 5], [1] * 30, [16, 16]])
def test_reader_unpack_in_one_view_or_gathered(cuts):
    raw = HDR.pack(1, 2, 3) + HDR.pack(4, 5, 6) + b"tail"
    r = Reader(split_views(raw, cuts))
    assert r.unpack(HDR) == (1, 2, 3)
    assert r.unpack(HDR) == (4, 5, 6)
    assert r.read(4) == b"tail"


def test_reader_short_buffer_is_a_clear_vhostfs_error():
    r = Reader(split_views(b"x" * 10, [4]))
    for op in (lambda: r.read(11), lambda: r.unpack(HDR), lambda: r.skip(11),
               lambda: r.write_to_fd(0, 11, 0)):
        with pytest.raises(GuestBufferTooSmall) as info:
            op()
        assert isinstance(info.value, VirtqueueError)
        assert not isinstance(info.value, IndexError)
    assert r.remaining == 10                 # nothing consumed by a failed call
    with pytest.raises(ValueError):
        r.read(-1)


def test_empty_reader_and_writer():
    r, w = Reader([]), Writer([])
    assert r.remaining == 0 and w.capacity == 0
    with pytest.raises(GuestBufferTooSmall):
        r.unpack(HDR)
    with pytest.raises(GuestBufferTooSmall):
        w.write(b"x")
    w.write(b"")
    assert w.read_from_fd(0, 0, 0) == 0


@pytest.mark.parametrize("cuts", [[100], [16], [3, 3, 3], [1] * 40, [16, 4]])
def test_writer_write_pack_write_at(cuts):
    buf = bytearray(48)
    mv = memoryview(buf)
    views, pos = [], 0
    for n in cuts:
        views.append(mv[pos:pos + n])
        pos += n
    if pos < len(buf):
        views.append(mv[pos:])
    views = [v for v in views if len(v)]
    w = Writer(views)
    assert w.capacity == 48 and w.written == 0
    w.pack(HDR, 0, 7, 9)
    w.write(b"body-")
    w.write(memoryview(b"bytes"))
    w.write_at(0, struct.pack("<I", w.written))   # patch the length after the body
    assert w.written == 26 and w.remaining == 22
    assert bytes(buf[:26]) == HDR.pack(26, 7, 9) + b"body-bytes"
    with pytest.raises(GuestBufferTooSmall):
        w.write(b"z" * 23)
    with pytest.raises(GuestBufferTooSmall):
        w.pack(struct.Struct("<23s"), b"")
    with pytest.raises(ValueError):
        w.write_at(20, b"1234567")               # beyond what was written
    w.write(b"z" * 22)
    assert w.remaining == 0 and bytes(buf[26:]) == b"z" * 22


def test_write_at_patches_across_views():
    buf = bytearray(10)
    mv = memoryview(buf)
    w = Writer([mv[:2], mv[2:3], mv[3:]])
    w.write(b"0123456789")
    w.write_at(1, b"abcd")
    assert bytes(buf) == b"0abcd56789"


@pytest.fixture
def tmpfd(tmp_path):
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


def test_pwritev_preadv_zero_copy_round_trip_through_guest_memory(tmpfd):
    mem = FakeGuestMemory.default()
    drv = Driver(mem, 64)
    q = drv.device_queue()
    payload = os.urandom(200_000)
    pieces = [payload[i:i + 7000] for i in range(0, len(payload), 7000)]
    drv.add_chain([b"H" * 8] + pieces, [16, 150_000, 60_000], straddle=False)
    drv.add_chain([], [5000, 5000], straddle=True)
    chain = q.pop()
    r = Reader(chain.readable)
    assert r.read(8) == b"H" * 8
    assert r.write_to_fd(tmpfd, len(payload), 4096) == len(payload)
    assert os.pread(tmpfd, len(payload), 4096) == payload
    w = Writer(chain.writable)
    w.write(b"h" * 16)
    got = w.read_from_fd(tmpfd, 210_000, 4096)   # past EOF: stops at EOF
    assert got == len(payload) and w.written == 16 + len(payload)
    q.add_used(chain.head, w.written)
    [done] = drv.used()
    assert done.data == b"h" * 16 + payload       # landed straight in guest memory
    chain2 = q.pop()                              # writable buffers crossing region ends
    w2 = Writer(chain2.writable)
    assert w2.read_from_fd(tmpfd, 10_000, 4096 + 5) == 10_000
    q.add_used(chain2.head, w2.written)
    [done2] = drv.used()
    assert done2.data == payload[5:10_005]
    mem.close()


def test_more_views_than_iov_max_are_batched(tmpfd, monkeypatch):
    monkeypatch.setattr(iov, "IOV_MAX", 7)
    data = bytes(range(256)) * 4
    r = Reader(split_views(data, [3] * 300))
    assert r.write_to_fd(tmpfd, len(data), 0) == len(data)
    assert os.pread(tmpfd, len(data), 0) == data
    buf = bytearray(len(data))
    mv = memoryview(buf)
    w = Writer([mv[i:i + 5] for i in range(0, len(buf), 5)])
    assert w.read_from_fd(tmpfd, len(data), 0) == len(data)
    assert bytes(buf) == data


def test_short_transfers_are_resumed(tmpfd, monkeypatch):
    calls = []
    real_pwritev, real_preadv = os.pwritev, os.preadv

    def dribble(real):
        def op(fd, views, offset):
            calls.append(len(views))
            first = bytes(views[0])[:3] if real is real_pwritev else None
            if real is real_pwritev:
                return os.pwrite(fd, first, offset)
            tmp = bytearray(min(3, len(views[0])))
            n = real(fd, [tmp], offset)
            views[0][:n] = tmp[:n]
            return n
        return op

    data = b"abcdefghijklmnopqrstuvwxyz"
    monkeypatch.setattr(os, "pwritev", dribble(real_pwritev))
    r = Reader(split_views(data, [5, 10]))
    assert r.write_to_fd(tmpfd, 20, 10) == 20 and r.remaining == 6
    monkeypatch.setattr(os, "preadv", dribble(real_preadv))
    buf = bytearray(30)
    mv = memoryview(buf)
    w = Writer([mv[:4], mv[4:]])
    assert w.read_from_fd(tmpfd, 30, 10) == 20      # EOF after 20 bytes
    assert bytes(buf[:20]) == data[:20] and w.written == 20
    assert len(calls) > 10


def test_error_before_any_byte_raises_and_consumes_nothing():
    r = Reader([memoryview(bytearray(b"abc"))])
    with pytest.raises(OSError):
        r.write_to_fd(-1, 3, 0)
    assert r.remaining == 3


def test_read_from_fd_within_one_view(tmpfd, monkeypatch):
    """The one-view fast path (a READ after its header): EOF, short reads resumed, an
    error before any byte raises, after some bytes returns the count."""
    data = bytes(range(200))
    os.pwrite(tmpfd, data, 0)
    buf = bytearray(300)
    w = Writer([memoryview(buf)])
    w.write(b"h" * 16)
    assert w.read_from_fd(tmpfd, 100, 50) == 100 and w.written == 116
    assert w.read_from_fd(tmpfd, 100, 150) == 50 and w.written == 166   # EOF
    assert bytes(buf[16:166]) == data[50:200]
    assert w.read_from_fd(tmpfd, 10, 500) == 0 and w.written == 166
    with pytest.raises(OSError):
        w.read_from_fd(-1, 10, 0)
    assert w.written == 166
    calls = []
    real = os.preadv

    def dribble(fd, views, offset):
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(5, "EIO")
        tmp = bytearray(min(7, len(views[0])))
        n = real(fd, [tmp], offset)
        views[0][:n] = tmp[:n]
        return n
    monkeypatch.setattr(os, "preadv", dribble)
    w2 = Writer([memoryview(bytearray(100))])
    assert w2.read_from_fd(tmpfd, 50, 0) == 14 and w2.written == 14    # error after 14 bytes
    w3 = Writer([memoryview(bytearray(40))])
    calls.clear()
    calls.extend([0, 0, 0, 0])                                           # no more errors
    assert w3.read_from_fd(tmpfd, 40, 0) == 40 and w3.written == 40 and w3.remaining == 0


def test_reader_skip_within_and_across_views():
    r = Reader(split_views(b"abcdefghij", [4, 6]))
    r.skip(2)
    assert r.read(1) == b"c" and r.remaining == 7
    r.skip(3)                   # crosses into the second view
    assert r.read(4) == b"ghij" and r.remaining == 0
