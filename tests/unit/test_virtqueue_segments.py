"""SegmentChain: a chain of many segments from the C walk (a guest's 1 MiB request), its
views built only on demand, and file I/O straight over the walk's segment array
(``vhs_segs_io``): the same bytes the views hold, never a byte outside them."""
from __future__ import annotations

import errno
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.support.driver import F_INDIRECT, F_NEXT, F_WRITE, Desc, Driver, FakeGuestMemory
from vhostfs.virtqueue.chain import LAZY_SEGMENTS, SegmentChain, walk_chain

PAGES = 24


@pytest.fixture(scope="module")
def mem():
    m = FakeGuestMemory.default()
    yield m
    m.close()


def scattered_chain(mem, drv, slot: int, *, rpages: int = 0, wpages: int = PAGES,
                    hdr: bytes = b"h" * 80):
    """Linux's layout: [header+args] [rpages data pages] -> [out header] [wpages pages],
    the pages every other one (nothing for the walk to merge)."""
    hdr_gpa, out_gpa = mem.alloc(len(hdr)), mem.alloc(16)
    mem.write(hdr_gpa, hdr)
    base = mem.alloc(2 * 4096 * (rpages + wpages), align=4096)
    table = [Desc(hdr_gpa, len(hdr), F_NEXT, 1)]
    for i in range(rpages):
        table.append(Desc(base + 8192 * i, 4096, F_NEXT, len(table) + 1))
    table.append(Desc(out_gpa, 16, F_WRITE | F_NEXT, len(table) + 1))
    for i in range(wpages):
        table.append(Desc(base + 8192 * (rpages + i), 4096, F_WRITE | F_NEXT, len(table) + 1))
    last = table[-1]
    table[-1] = Desc(last.addr, last.length, last.flags & ~F_NEXT, 0)
    tgpa, tlen = drv.indirect_table(table)
    drv.write_desc(slot, tgpa, tlen, F_INDIRECT, 0)
    return slot


def joined(views) -> bytes:
    return b"".join(bytes(v) for v in views)


def test_many_segments_give_a_segment_chain_with_the_walk_s_views(mem):
    drv = Driver(mem, size=16)
    q = drv.device_queue()
    scattered_chain(mem, drv, 0, rpages=3)
    chain = q._walker.walk(0)
    assert isinstance(chain, SegmentChain) and 1 + 3 + 1 + PAGES > LAZY_SEGMENTS
    ref = walk_chain(q._memory, q._desc, q.size, 0)
    assert (chain.readable_len, chain.writable_len) == (ref.readable_len, ref.writable_len)
    assert joined(chain.readable) == joined(ref.readable)
    assert [len(v) for v in chain.writable] == [len(v) for v in ref.writable]
    r2, w2 = chain.head_views(2, 2)
    assert [bytes(v) for v in r2] == [bytes(v) for v in chain.readable[:2]]
    assert [len(v) for v in w2] == [16, 4096]


@pytest.fixture(scope="module")
def big_chain(mem):
    drv = Driver(mem, size=16)
    q = drv.device_queue()
    scattered_chain(mem, drv, 0, rpages=PAGES, wpages=PAGES)
    return q._walker.walk(0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(skip=st.integers(0, PAGES * 4096 + 40), count=st.integers(0, PAGES * 4096 + 100),
       offset=st.integers(0, 70000), to_guest=st.booleans())
def test_segment_io_moves_exactly_the_bytes_the_views_hold(big_chain, tmp_path_factory, skip,
                                                          count, offset, to_guest):
    chain = big_chain
    part = chain.writable if to_guest else chain.readable
    for i, v in enumerate(part):                     # a known pattern in guest memory
        v[:] = bytes([(i * 31 + 7) & 0xFF]) * len(v)
    before = joined(part)
    path = tmp_path_factory.mktemp("seg") / "f"
    content = os.urandom(65536)
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR)
    try:
        moved = chain.segment_io(fd, offset, to_guest, skip, count)
    finally:
        os.close(fd)
    total = len(before)
    if to_guest:
        want = content[offset:offset + max(0, min(count, total - skip))]
        assert moved == len(want)
        after = joined(part)
        assert after[skip:skip + moved] == want
        assert after[:skip] == before[:skip] and after[skip + moved:] == before[skip + moved:]
    else:
        want = before[skip:skip + count]
        assert moved == len(want)
        data = path.read_bytes()
        assert data[offset:offset + moved] == want
        assert data[:len(content)][:offset] == content[:offset]   # past EOF: a hole


def test_segments_outside_their_region_are_refused_before_any_io(mem, tmp_path):
    drv = Driver(mem, size=16)
    q = drv.device_queue()
    scattered_chain(mem, drv, 0)
    good = q._walker.walk(0)
    segs = bytearray(good._segs)
    n = len(segs) // 24
    bad_region = bytearray(segs)
    bad_region[24 * (n - 1):24 * (n - 1) + 8] = (good._nregions).to_bytes(8, "little")
    big_len = bytearray(segs)
    big_len[24 * (n - 1) + 16:24 * n] = (1 << 40).to_bytes(8, "little")
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    for bad in (bad_region, big_len):
        chain = SegmentChain(0, good.memory, bytes(bad), good._nr, good._n, good._region_views,
                             good._cregions, good._nregions, good.readable_len,
                             good.writable_len)
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as exc:
                chain.segment_io(fd, 0, True, 0, 4096)
            assert exc.value.errno == errno.EFAULT
        finally:
            os.close(fd)


def test_fast_path_over_segments_is_what_the_general_path_gives(mem, share):
    """READ into and WRITE from 24 scattered guest pages through the fast path (no
    views built for them) against the general path (Reader/Writer over every view)."""
    from test_fuse_fastpath import World, general, out_bytes   # noqa: F401 (fixtures)
    from vhostfs.fuse import abi
    w = World(share)
    drv = Driver(mem, size=16)
    q = drv.device_queue()
    size = PAGES * 4096
    read = w.read_req(100, size)
    scattered_chain(mem, drv, 0, hdr=read)
    scattered_chain(mem, drv, 1, hdr=read)
    fast, gen = q._walker.walk(0), q._walker.walk(1)
    assert isinstance(fast, SegmentChain)
    n = w.server.serve_fast(fast)
    assert fast._w is None, "the fast path built the writable views"
    assert n == general(w.server, gen) == 16 + min(size, 65536 - 100)
    assert out_bytes(fast)[:n] == out_bytes(gen)[:n]
    data = bytes((i * 5) & 0xFF for i in range(size))
    for slot, (node, fh) in enumerate(((w.f, w.fh), (w.g, w.gh))):
        hdr = w.write_req(node, fh, 10, b"")[:40]
        hdr = abi.fuse_in_header.pack(80 + size, *abi.fuse_in_header.unpack(hdr)[1:])
        args = abi.fuse_write_in.pack(fh, 10, size, 0, 0, 0, 0)
        scattered_chain(mem, drv, 2 + slot, rpages=PAGES, wpages=1, hdr=hdr + args)
        c = q._walker.walk(2 + slot)
        for i, v in enumerate(c.readable[1:]):
            v[:] = data[4096 * i:4096 * (i + 1)]
        c = q._walker.walk(2 + slot)        # a fresh chain: no views built yet
        if slot == 0:
            assert isinstance(c, SegmentChain) and w.server.serve_fast(c) == 24
            assert c._r is None, "the fast path built the readable views"
        else:
            assert general(w.server, c) == 24
    assert (w.share / "f").read_bytes() == (w.share / "g").read_bytes()
    assert (w.share / "f").read_bytes()[10:10 + size] == data
