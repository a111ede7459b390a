"""The C chain walk (ChainWalker, cffi_build/parts/00_ring.c) against the Python reference
(walk_chain): on random well-formed chains and on random, hostile descriptor tables both
must return the same bytes (the same guest memory, in the same order, with the same
readable/writable split and lengths) or raise BadChain with the same head and reason."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.support.driver import (
    F_INDIRECT, F_NEXT, F_WRITE, FAR_BASE, FAR_SIZE, GAP_GPA, HOSTILE_KINDS, MAIN_SIZE,
    STRIPE_BASE, Desc, Driver, FakeGuestMemory, add_hostile,
)
from vhostfs import hostsys
from vhostfs.memory import GuestMemory
from vhostfs.virtqueue import BadChain
from vhostfs.virtqueue.chain import ChainWalker, walk_chain

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_MEM = None
_REAL = None


def memory() -> FakeGuestMemory:
    global _MEM, _REAL
    if _MEM is None or _MEM._bump[0] > MAIN_SIZE - (2 << 20) \
            or _MEM._stripe_ptr > _MEM.stripe_end - (256 << 10) \
            or _MEM._bump[FAR_BASE] > FAR_BASE + FAR_SIZE - (256 << 10):
        if _MEM is not None:
            _MEM.close()
        _MEM = FakeGuestMemory.default(stripe_region=16 << 10, stripe_count=128)
        _REAL = None
    return _MEM


def real_memory() -> GuestMemory:
    """The daemon's GuestMemory over the same regions as memory() (mapped once)."""
    global _REAL
    mem = memory()
    if _REAL is None:
        _REAL = GuestMemory.from_table(mem.table())
    return _REAL


def _ranges(views) -> list[tuple[int, int]]:
    """Host address ranges of ``views``, adjacent ones merged (the C walk merges pieces
    that are contiguous in one region; the bytes and their order are what must agree)."""
    out: list[list[int]] = []
    for v in views:
        assert len(v) > 0 and v.format == "B" and v.ndim == 1
        a = hostsys.buffer_address(v)
        if out and out[-1][0] + out[-1][1] == a:
            out[-1][1] += len(v)
        else:
            out.append([a, len(v)])
    return [tuple(r) for r in out]


def _outcome(walk, head: int):
    try:
        c = walk(head)
    except BadChain as exc:
        return ("error", exc.head, exc.reason)
    return ("chain", c.head, c.readable_len, c.writable_len, _ranges(c.readable), _ranges(c.writable))


def assert_walks_agree(q, heads) -> None:
    walker = q._walker
    assert isinstance(walker, ChainWalker)
    for head in heads:
        python = _outcome(lambda h: walk_chain(q._memory, q._desc, q.size, h), head)
        c = _outcome(walker.walk, head)
        assert c == python, (head, c, python)


chunk = st.binary(min_size=0, max_size=3000)


@SETTINGS
@given(readable=st.lists(chunk, max_size=6), writable=st.lists(st.integers(0, 5000), max_size=6),
       indirect=st.booleans(), straddle=st.booleans(), far=st.booleans(), real=st.booleans(),
       data=st.data())
def test_well_formed_chains_agree(readable, writable, indirect, straddle, far, real, data):
    if not (readable or writable) or (straddle and far):
        return
    drv = Driver(memory(), 16)
    q = drv.device_queue(memory=real_memory() if real else None)
    prefix = data.draw(st.integers(0, len(readable) + len(writable))) if indirect else 0
    head = drv.add_chain(readable, writable, indirect=indirect, direct_prefix=prefix,
                         straddle=straddle, far=far)
    assert_walks_agree(q, [head])
    chain = q._walker.walk(head)
    assert b"".join(bytes(v) for v in chain.readable) == b"".join(readable)
    assert sum(map(len, chain.writable)) == chain.writable_len == sum(writable)


addresses = st.one_of(st.integers(0, MAIN_SIZE - 1), st.integers(FAR_BASE - 64, FAR_BASE + FAR_SIZE),
                      st.just(GAP_GPA), st.integers(0, (1 << 64) - 1),
                      st.integers((1 << 64) - 64, (1 << 64) - 1),
                      st.integers(STRIPE_BASE - 32, STRIPE_BASE + 32),
                      st.integers(MAIN_SIZE - 64, MAIN_SIZE + 64))
lengths = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 48, 0xFFFF_FFFF, 1 << 31, 65536,
                                                         65552, 4096 * 16]),
                    st.integers(0, 0xFFFF_FFFF))
flags = st.integers(0, 7)


@SETTINGS
@given(size=st.sampled_from([1, 2, 4, 8, 16]), data=st.data())
def test_hostile_tables_agree(size, data):
    """Random descriptor tables, indirect tables (some straddling regions) and heads."""
    drv = Driver(memory(), size)
    q = drv.device_queue(memory=real_memory() if data.draw(st.booleans()) else None)
    for i in range(size):
        drv.write_desc(i, data.draw(addresses), data.draw(lengths), data.draw(flags),
                       data.draw(st.integers(0, size) | st.integers(0, 0xFFFF)))
    tables = data.draw(st.lists(st.lists(st.tuples(addresses, lengths, flags, st.integers(0, 8)),
                                         min_size=1, max_size=8), max_size=2))
    for t in tables:
        gpa, n = drv.indirect_table([Desc(*e) for e in t], straddle=data.draw(st.booleans()))
        i = data.draw(st.integers(0, size - 1))
        drv.write_desc(i, gpa, data.draw(st.sampled_from([n, n - 8, 0, n + 16])),
                       F_INDIRECT | data.draw(st.sampled_from([0, F_WRITE, F_NEXT])), 0)
    assert_walks_agree(q, range(size))


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
@pytest.mark.parametrize("real", [False, True])
def test_every_hostile_kind_agrees(kind, real):
    mem = FakeGuestMemory.default()
    try:
        drv = Driver(mem, size=16)
        q = drv.device_queue(memory=GuestMemory.from_table(mem.table()) if real else None)
        head = add_hostile(drv, kind)
        assert_walks_agree(q, [head])
    finally:
        mem.close()


@pytest.mark.parametrize("real", [False, True])
def test_linux_1mib_request_agrees_and_merges_contiguous_pages(real):
    """A 1 MiB READ as the Linux driver sends it: an indirect table of 2 + 256 page
    descriptors.  Contiguous pages come back as one view."""
    mem = FakeGuestMemory.default()
    try:
        drv = Driver(mem, size=128)
        q = drv.device_queue(memory=GuestMemory.from_table(mem.table()) if real else None)
        hdr = mem.alloc(80)
        out = mem.alloc(16)
        pages = mem.alloc(256 * 4096, align=4096)
        table = [Desc(hdr, 80, F_NEXT, 1), Desc(out, 16, F_WRITE | F_NEXT, 2)]
        table += [Desc(pages + 4096 * i, 4096, F_WRITE | (F_NEXT if i < 255 else 0), 3 + i)
                  for i in range(256)]
        tgpa, tlen = drv.indirect_table(table)
        drv.write_desc(0, tgpa, tlen, F_INDIRECT, 0)
        assert_walks_agree(q, [0])
        chain = q._walker.walk(0)
        assert chain.readable_len == 80 and chain.writable_len == 16 + (1 << 20)
        assert len(chain.readable) == 1 and len(chain.writable) <= 2
        # every other page: nothing to merge, 1 + 128 views
        table = table[:2] + [Desc(pages + 8192 * i, 4096, F_WRITE | (F_NEXT if i < 127 else 0), 3 + i)
                             for i in range(128)]
        tgpa, tlen = drv.indirect_table(table)
        drv.write_desc(1, tgpa, tlen, F_INDIRECT, 0)
        assert_walks_agree(q, [1])
        assert len(q._walker.walk(1).writable) == 129
    finally:
        mem.close()


def test_segment_array_overflow_falls_back_to_the_python_walk():
    """More segments than the helper's array holds: the Python reference walks it."""
    mem = FakeGuestMemory.default(stripe_region=4096, stripe_count=64)
    try:
        drv = Driver(mem, size=4)
        q = drv.device_queue()
        w = q._walker
        w._w.cap = 8               # pretend the array is tiny
        # one descriptor across 20 stripes of 4 KiB: 20 segments
        drv.write_desc(0, STRIPE_BASE, 20 * 4096, 0, 0)
        assert_walks_agree(q, [0])
        chain = w.walk(0)
        assert chain.readable_len == 20 * 4096 and len(chain.readable) == 20
    finally:
        mem.close()


@pytest.fixture(scope="module", autouse=True)
def _release_memory():
    """The shared fake memory holds ~130 memfds (and a real mapping as many dups):
    give them back when this module is done, not at the end of the session (the
    process would otherwise carry them into every later test)."""
    yield
    global _MEM, _REAL
    if _MEM is not None:
        _MEM.close()
    _MEM = None
    _REAL = None
