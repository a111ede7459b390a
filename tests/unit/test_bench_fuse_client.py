"""The driver-side FUSE client: codec byte tables, and RingChannel against the real
SplitQueue device code over fake guest memory (no backend process)."""
from __future__ import annotations

import os
import struct

import pytest

from vhostfs.fuse import abi
from tests.support import fuse_client as fc
from tests.support.driver import FakeGuestMemory


# -- codec -----------------------------------------------------------------------------------
def test_in_header_layout():
    raw = fc.in_header(abi.Opcode.LOOKUP, 42, 7, 45, uid=1000, gid=100, pid=9)
    assert len(raw) == 40
    assert struct.unpack("<IIQQIIIHH", raw) == (45, 1, 42, 7, 1000, 100, 9, 0, 0)


def test_lookup_and_unlink_names_are_nul_terminated():
    op = fc.encode_lookup(1, "abc")
    assert (op.opcode, op.nodeid, op.args, op.reply_size) == (1, 1, b"abc\0", fc.ENTRY_OUT)
    assert fc.encode_unlink(5, b"x").args == b"x\0"
    assert fc.encode_unlink(5, b"x").reply_size == 0
    for bad in ("a/b", "a\0b"):
        with pytest.raises(ValueError):
            fc.encode_lookup(1, bad)


def test_init_carries_flags2_and_version():
    op = fc.encode_init(flags=fc.INIT_FLAGS | abi.FUSE_SECURITY_CTX)
    major, minor, ra, flags, flags2 = struct.unpack_from("<IIIII", op.args)
    assert (major, minor, ra) == (7, 41, 128 << 10)
    assert flags == fc.INIT_FLAGS & 0xFFFFFFFF and flags & abi.FUSE_INIT_EXT
    assert flags2 == abi.FUSE_SECURITY_CTX >> 32
    assert len(op.args) == abi.fuse_init_in.size == 64


def test_create_read_write_args():
    op = fc.encode_create(1, "f", os.O_RDWR | os.O_CREAT, 0o100600, umask=0o077)
    assert op.args[:16] == struct.pack("<IIII", os.O_RDWR | os.O_CREAT, 0o100600, 0o077, 0)
    assert op.args[16:] == b"f\0" and op.reply_size == fc.ENTRY_OUT + fc.OPEN_OUT
    r = fc.encode_read(3, 9, 4096, 8192)
    assert struct.unpack("<QQIIQII", r.args)[:3] == (9, 4096, 8192)
    assert r.read_into_data and r.reply_size == 8192 and r.write_len == 0
    w = fc.encode_write(3, 9, 0, 4096)
    assert w.write_len == 4096 and w.reply_size == abi.fuse_write_out.size


def test_batch_forget_layout():
    op = fc.encode_batch_forget([(5, 2), (6, 1)])
    assert op.args == struct.pack("<II", 2, 0) + struct.pack("<QQQQ", 5, 2, 6, 1)
    assert op.reply_size == 0 and op.opcode == abi.Opcode.BATCH_FORGET


def _attr(ino):
    return (ino, 100, 8, 1, 2, 3, 4, 5, 6, 0o100644, 1, 0, 0, 0, 4096, 0)


def test_decode_entry_attr_open_write():
    body = abi.fuse_entry_out.pack(11, 3, 1, 2, 0, 0, *_attr(99))
    e = fc.decode_entry(body)
    assert (e.nodeid, e.generation, e.attr.ino, e.attr.size, e.attr.mode) == (11, 3, 99, 100, 0o100644)
    a = fc.decode_attr(abi.fuse_attr_out.pack(1, 0, 0, *_attr(5)))
    assert a.ino == 5 and a.blksize == 4096
    entry, fh = fc.decode_create(body + abi.fuse_open_out.pack(77, 0, 0))
    assert (entry.nodeid, fh) == (11, 77)
    assert fc.decode_write(abi.fuse_write_out.pack(4096, 0)) == 4096
    with pytest.raises(fc.FuseProtocolError):
        fc.decode_entry(body[:-1])


def test_decode_init_short_and_ext_flags():
    full = abi.fuse_init_out.pack(7, 38, 1, abi.FUSE_INIT_EXT | 1, 16, 12, 1 << 20, 1, 256, 0, 1, *[0] * 7)
    out = fc.decode_init(full)
    assert out.max_write == 1 << 20 and out.max_pages == 256
    assert out.flags == abi.FUSE_INIT_EXT | 1 | (1 << 32)
    old = fc.decode_init(full[:24])          # a 7.22-era reply is shorter
    assert old.max_write == 1 << 20 and old.max_pages == 0


def _direntplus(nodeid, off, name):
    raw = abi.fuse_direntplus.pack(nodeid, 0, 0, 0, 0, 0, *_attr(nodeid), nodeid, off, len(name), 8) + name
    return raw + bytes(-len(raw) % 8)


def test_decode_readdirplus_padding_and_overrun():
    body = _direntplus(2, 1, b"a") + _direntplus(3, 2, b"longer-name")
    ents = fc.decode_readdirplus(body)
    assert [(d.entry.nodeid, d.off, d.name) for d in ents] == [(2, 1, b"a"), (3, 2, b"longer-name")]
    with pytest.raises(fc.FuseProtocolError):
        fc.decode_readdirplus(body[:-16])


def test_decode_readdir():
    raw = abi.fuse_dirent.pack(5, 1, 3, 4) + b"abc" + bytes(5)
    assert fc.decode_readdir(raw) == [(5, 1, 4, b"abc")]


# -- RingChannel against the device-side SplitQueue ----------------------------------------------
@pytest.fixture
def ring():
    mem = FakeGuestMemory([(0, 16 << 20)])
    drv = fc.SlotDriver(mem, 64, event_idx=True)
    q = drv.device_queue()
    call_r = os.eventfd(0, os.EFD_NONBLOCK)
    kicks = []
    ch = fc.RingChannel(drv, call_r, lambda: kicks.append(1), depth=4, data_size=8192, body_size=4096)
    yield ch, q, kicks
    os.close(call_r)
    mem.close()


def _serve(q, reply_body=b"", *, error=0, unique=None, data=None):
    chain = q.pop()
    readable = [bytes(v) for v in chain.readable]
    hdr = abi.fuse_in_header.unpack(readable[0])
    body = data if data is not None else reply_body
    out = abi.fuse_out_header.pack(16 + len(body), error, hdr[2] if unique is None else unique) + body
    pos = 0
    for v in chain.writable:
        n = min(len(v), len(out) - pos)
        v[:n] = out[pos:pos + n]
        pos += n
    q.add_used(chain.head, len(out))
    return hdr, readable, [len(v) for v in chain.writable]


def test_channel_lays_out_chains_like_the_kernel(ring):
    ch, q, kicks = ring
    unique = ch.submit(fc.encode_lookup(1, "name"))
    assert kicks == [1]                         # fresh ring: the device wants a kick
    hdr, readable, writable = _serve(q, abi.fuse_entry_out.pack(9, 0, 0, 0, 0, 0, *_attr(9)))
    assert [len(r) for r in readable] == [40, 5] and readable[1] == b"name\0"
    assert hdr[:4] == (45, abi.Opcode.LOOKUP, unique, 1)
    assert writable == [16, fc.ENTRY_OUT]
    [r] = ch.reap()
    assert (r.unique, r.error, fc.decode_entry(r.body).nodeid) == (unique, 0, 9)
    assert r.latency >= 0 and ch.in_flight == 0


def test_channel_write_payload_and_read_into_data(ring):
    ch, q, _ = ring
    ch.next_free_slot().data[:4] = b"DATA"
    ch.submit(fc.encode_write(3, 1, 0, 4))
    _, readable, _ = _serve(q, abi.fuse_write_out.pack(4, 0))
    assert [len(r) for r in readable] == [40, abi.fuse_write_in.size, 4] and readable[2] == b"DATA"
    assert fc.decode_write(ch.reap()[0].body) == 4
    ch.submit(fc.encode_read(3, 1, 0, 6))
    _, _, writable = _serve(q, data=b"abcdef")
    assert writable == [16, 6]
    [r] = ch.reap()
    assert r.body == b"" and r.data_length == 6 and bytes(r.data_view) == b"abcdef"


def test_channel_error_reply_and_forget_without_reply(ring):
    ch, q, _ = ring
    ch.submit(fc.encode_getattr(5))
    _serve(q, error=-2)
    [r] = ch.reap()
    assert r.error == -2 and r.body == b""
    with pytest.raises(fc.FuseError) as exc:
        fc._check(r)
    assert exc.value.errno == 2
    ch.submit(fc.encode_forget(5, 1))
    chain = q.pop()
    assert chain.writable == [] or sum(len(v) for v in chain.writable) == 0
    q.add_used(chain.head, 0)
    [r] = ch.reap()
    assert r.length == 0 and r.error == 0


@pytest.mark.parametrize("mutate, match", [
    (dict(unique=999), "unique"),
    (dict(error=5), "error field"),
])
def test_channel_rejects_bad_replies(ring, mutate, match):
    ch, q, _ = ring
    ch.submit(fc.encode_getattr(5))
    _serve(q, **mutate)
    with pytest.raises(fc.FuseProtocolError, match=match):
        ch.reap()


def test_channel_rejects_length_mismatch(ring):
    ch, q, _ = ring
    ch.submit(fc.encode_getattr(5))
    chain = q.pop()
    hdr = abi.fuse_in_header.unpack(bytes(chain.readable[0]))
    chain.writable[0][:16] = abi.fuse_out_header.pack(40, 0, hdr[2])
    q.add_used(chain.head, 16)
    with pytest.raises(fc.FuseProtocolError, match="used length"):
        ch.reap()


def test_channel_slots_and_limits(ring):
    ch, q, _ = ring
    for _ in range(4):
        ch.submit(fc.encode_getattr(1), publish=False)
    assert not ch.has_free_slot and ch.in_flight == 4
    with pytest.raises(RuntimeError):
        ch.submit(fc.encode_getattr(1))
    ch.publish()
    uniques = set()
    for _ in range(4):
        uniques.add(_serve(q, abi.fuse_attr_out.pack(1, 0, 0, *_attr(1)))[0][2])
    assert len(uniques) == 4 and len(ch.reap()) == 4 and ch.in_flight == 0
    with pytest.raises(ValueError):
        ch.submit(fc.encode_read(1, 1, 0, 8192 + 1))
