"""Property tests: Reader/Writer over arbitrary view splits behave like one flat buffer."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from vhostfs.virtqueue.iov import GuestBufferTooSmall, Reader, Writer

U32 = struct.Struct("<I")
HDR = struct.Struct("<IIQ")


def cut(buf: bytearray, sizes: list[int]) -> list[memoryview]:
    mv = memoryview(buf)
    out, pos = [], 0
    for n in sizes:
        if pos >= len(buf):
            break
        out.append(mv[pos:pos + n])
        pos += n
    if pos < len(buf):
        out.append(mv[pos:])
    return out


cuts = st.lists(st.integers(0, 40), max_size=20)
reader_ops = st.lists(st.tuples(st.sampled_from(["read", "skip", "u32", "hdr", "views"]),
                                st.integers(0, 60)), max_size=20)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), sizes=cuts, ops=reader_ops)
def test_reader_matches_a_flat_model(data, sizes, ops):
    r = Reader(cut(bytearray(data), sizes))
    pos = 0
    for op, n in ops:
        need = {"u32": 4, "hdr": 16}.get(op, n)
        if pos + need > len(data):
            with pytest.raises(GuestBufferTooSmall):
                {"read": r.read, "skip": r.skip, "views": r.views}.get(op, lambda _n: r.unpack(
                    U32 if op == "u32" else HDR))(n)
            assert r.remaining == len(data) - pos
            continue
        if op == "read":
            assert r.read(n) == data[pos:pos + n]
        elif op == "skip":
            r.skip(n)
        elif op == "views":
            assert b"".join(bytes(v) for v in r.views(n)) == data[pos:pos + n]
        elif op == "u32":
            assert r.unpack(U32) == U32.unpack_from(data, pos)
        else:
            assert r.unpack(HDR) == HDR.unpack_from(data, pos)
        pos += need
        assert r.remaining == len(data) - pos


writer_ops = st.lists(st.tuples(st.sampled_from(["write", "pack", "patch"]), st.binary(max_size=50),
                                st.integers(0, 300)), max_size=20)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 300), sizes=cuts, ops=writer_ops)
def test_writer_matches_a_flat_model(capacity, sizes, ops):
    buf = bytearray(capacity)
    w = Writer(cut(buf, sizes))
    model = bytearray()
    for op, blob, at in ops:
        if op == "write":
            if len(model) + len(blob) > capacity:
                with pytest.raises(GuestBufferTooSmall):
                    w.write(blob)
            else:
                w.write(blob)
                model += blob
        elif op == "pack":
            if len(model) + 4 > capacity:
                with pytest.raises(GuestBufferTooSmall):
                    w.pack(U32, len(blob))
            else:
                w.pack(U32, len(blob))
                model += U32.pack(len(blob))
        else:
            if at + len(blob) > len(model):
                with pytest.raises(ValueError):
                    w.write_at(at, blob)
            else:
                w.write_at(at, blob)
                model[at:at + len(blob)] = blob
        assert w.written == len(model)
        assert bytes(buf[:len(model)]) == bytes(model)
