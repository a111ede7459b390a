"""Descriptor chain walk: every validation rule, direct and indirect, across regions."""
from __future__ import annotations

import pytest

from tests.support.driver import (
    F_INDIRECT, F_NEXT, F_WRITE, FAR_BASE, GAP_GPA, HOSTILE_KINDS, MAIN_SIZE, Desc, Driver,
    FakeGuestMemory, add_hostile,
)
from vhostfs.errors import ChainError, QueueBroken
from vhostfs.virtqueue import BadChain, Reader
from vhostfs.virtqueue.layout import DESC, MAX_INDIRECT_DESCRIPTORS


@pytest.fixture
def mem():
    m = FakeGuestMemory.default()
    yield m
    m.close()


@pytest.fixture
def drv(mem):
    return Driver(mem, size=16)


def joined(views):
    return b"".join(bytes(v) for v in views)


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_every_hostile_chain_is_a_chain_error_that_consumes_the_slot(drv, kind):
    q = drv.device_queue()
    head = add_hostile(drv, kind)
    good = drv.add_chain([b"after"], [8])
    with pytest.raises(ChainError) as info:
        q.pop()
    assert isinstance(info.value, BadChain)
    assert info.value.head == head
    assert q.last_avail_idx == 1
    q.add_used(info.value.head, 0)
    chain = q.pop()                           # the queue goes on
    assert chain.head == good and joined(chain.readable) == b"after"
    q.add_used(chain.head, 0)
    assert [(c.head, c.length) for c in drv.used()] == [(head, 0), (good, 0)]


@pytest.mark.parametrize("kind,reason", [
    ("loop", "loop"), ("self_loop", "loop"), ("next_out_of_range", "outside the table"),
    ("too_long_indirect_loop", "in the indirect table"),
    ("indirect_next_out_of_range", "outside the indirect table"),
    ("nested_indirect", "inside an indirect table"), ("indirect_with_next", "both INDIRECT and NEXT"),
    ("indirect_len_zero", "indirect table length 0"), ("indirect_len_unaligned", "length 24"),
    ("indirect_too_large", "length 65552"), ("indirect_outside_memory", "outside guest memory"),
    ("read_after_write", "readable descriptor after"),
    ("read_after_write_indirect", "readable descriptor after"),
    ("length_overflow", "32 bits"), ("outside_memory", "outside guest memory"),
    ("in_gap", "outside guest memory"), ("straddles_gap", "outside guest memory"),
    ("address_wraps", "outside"),
])
def test_each_rule_names_its_reason(drv, kind, reason):
    q = drv.device_queue()
    add_hostile(drv, kind)
    with pytest.raises(BadChain, match=reason):
        q.pop()


def test_direct_chain_of_exactly_queue_size_descriptors_is_allowed(drv):
    q = drv.device_queue()
    drv.add_chain([bytes([i]) for i in range(16)])
    chain = q.pop()
    assert joined(chain.readable) == bytes(range(16))


def test_indirect_table_at_the_limit_is_allowed_and_one_more_is_not(mem):
    drv = Driver(mem, size=4)
    q = drv.device_queue()
    buf = mem.alloc(16)
    mem.write(buf, b"x")
    for n, ok in ((MAX_INDIRECT_DESCRIPTORS, True), (MAX_INDIRECT_DESCRIPTORS + 1, False)):
        table = [Desc(buf, 1, F_NEXT if i + 1 < n else 0, i + 1) for i in range(n)]
        tgpa, tlen = drv.indirect_table(table)
        [d] = drv.take_descriptors(1)
        drv.write_desc(d, tgpa, tlen, F_INDIRECT)
        drv.push_head(d, descriptors=[d])
        if ok:
            assert q.pop().readable_len == n
        else:
            with pytest.raises(BadChain, match="indirect table length"):
                q.pop()
        q.add_used(d, 0)
        drv.used()


def test_head_out_of_range_breaks_the_queue_without_consuming(drv):
    q = drv.device_queue()
    drv.write_avail_slot(0, 16)
    drv.set_avail_idx(1)
    with pytest.raises(QueueBroken, match="head 16"):
        q.pop()
    assert q.last_avail_idx == 0


def test_avail_idx_jumping_past_queue_size_breaks_the_queue(drv):
    q = drv.device_queue()
    drv.set_avail_idx(17)
    with pytest.raises(QueueBroken, match="more than the queue size"):
        q.pop()
    drv.set_avail_idx(0xFFFF)             # "going back" is a huge jump forward mod 2^16
    with pytest.raises(QueueBroken):
        q.pop()


def test_full_ring_is_not_a_jump(drv):
    q = drv.device_queue()
    heads = [drv.add_chain([b"%d" % i]) for i in range(16)]
    assert [q.pop().head for _ in range(16)] == heads
    assert q.pop() is None


def test_zero_length_descriptors_contribute_no_views(drv, mem):
    q = drv.device_queue()
    a, b, c = drv.take_descriptors(3)
    buf = mem.alloc(16)
    mem.write(buf, b"data")
    drv.write_desc(a, GAP_GPA, 0, F_NEXT, b)      # zero length: address never looked at
    drv.write_desc(b, buf, 4, F_NEXT, c)
    drv.write_desc(c, GAP_GPA, 0, F_WRITE)
    drv.push_head(a, descriptors=[a, b, c])
    chain = q.pop()
    assert [bytes(v) for v in chain.readable] == [b"data"]
    assert chain.writable == [] and chain.writable_len == 0


def test_direct_descriptors_before_an_indirect_one(drv):
    q = drv.device_queue()
    drv.add_chain([b"hdr", b"body"], [5, 7], indirect=True, direct_prefix=2)
    chain = q.pop()
    assert joined(chain.readable) == b"hdrbody"
    assert chain.writable_len == 12


def test_write_flag_on_the_indirect_pointer_is_ignored(drv, mem):
    q = drv.device_queue()
    buf = mem.alloc(16)
    mem.write(buf, b"req")
    tgpa, tlen = drv.indirect_table([Desc(buf, 3, F_NEXT, 1), Desc(buf, 8, F_WRITE)])
    [d] = drv.take_descriptors(1)
    drv.write_desc(d, tgpa, tlen, F_INDIRECT | F_WRITE)
    drv.push_head(d)
    chain = q.pop()
    assert joined(chain.readable) == b"req" and chain.writable_len == 8


def test_write_then_indirect_with_readable_entries_is_an_order_violation(drv, mem):
    q = drv.device_queue()
    buf = mem.alloc(16)
    tgpa, tlen = drv.indirect_table([Desc(buf, 3)])
    a, b = drv.take_descriptors(2)
    drv.write_desc(a, buf, 8, F_WRITE | F_NEXT, b)
    drv.write_desc(b, tgpa, tlen, F_INDIRECT)
    drv.push_head(a, descriptors=[a, b])
    with pytest.raises(BadChain, match="readable descriptor after"):
        q.pop()


@pytest.mark.parametrize("indirect", [False, True])
def test_chain_buffers_crossing_region_boundaries(drv, indirect):
    q = drv.device_queue()
    payload = bytes(range(256)) * 4
    drv.add_chain([payload], [3000], indirect=indirect, straddle=True)
    chain = q.pop()
    assert len(chain.readable) == 2 and len(chain.writable) == 2   # split at the region end
    assert joined(chain.readable) == payload
    assert Reader(chain.readable).read(len(payload)) == payload


def test_chain_spanning_distant_regions(drv):
    q = drv.device_queue()
    drv.add_chain([b"near"], [4])                       # ring region
    drv.add_chain([b"far"], [4], far=True)              # the region at 1 GiB
    a, b = q.pop(), q.pop()
    assert joined(a.readable) == b"near" and joined(b.readable) == b"far"


def test_indirect_table_straddling_two_regions_is_read(drv):
    q = drv.device_queue()
    drv.add_chain([b"x" * 10, b"y" * 10], [4, 4], indirect=True, straddle=True)
    chain = q.pop()
    assert joined(chain.readable) == b"x" * 10 + b"y" * 10


def test_total_length_at_u32_limit_is_allowed(mem):
    drv = Driver(mem, size=4)
    q = drv.device_queue()
    n = (1 << 32) // MAIN_SIZE                         # exactly 2^32: one byte too many
    table = [Desc(0, MAIN_SIZE, F_NEXT, i + 1) for i in range(n - 1)] + [Desc(0, MAIN_SIZE - 1)]
    tgpa, tlen = drv.indirect_table(table)
    [d] = drv.take_descriptors(1)
    drv.write_desc(d, tgpa, tlen, F_INDIRECT)
    drv.push_head(d)
    assert q.pop().readable_len == (1 << 32) - 1


class _RewritingMemory:
    """Guest memory whose guest rewrites the descriptor being walked right after we read it."""

    def __init__(self, mem, drv):
        self._mem, self._drv = mem, drv
        self.rewritten = 0

    def translate(self, gpa, length):
        views = self._mem.translate(gpa, length)
        for i in range(self._drv.size):               # scribble over the descriptor just read
            addr, n, _flags, _next = DESC.unpack_from(self._mem.contiguous(self._drv.desc_gpa + 16 * i, 16))
            if (addr, n) == (gpa, length):
                self._drv.write_desc(i, FAR_BASE - 8, 0xFFFF_FFFF, F_INDIRECT | F_NEXT, 99)
                self.rewritten += 1
        return views

    def __getattr__(self, name):
        return getattr(self._mem, name)


def test_each_descriptor_is_read_once(drv, mem):
    """The Python reference walk (the C walk copies each descriptor into locals with one
    volatile read; its hook cannot interleave with Python)."""
    rewriting = _RewritingMemory(mem, drv)
    q = drv.device_queue(memory=rewriting)
    q._walker = None
    drv.add_chain([b"abc", b"def"], [8])
    chain = q.pop()
    assert rewriting.rewritten == 3
    assert joined(chain.readable) == b"abcdef" and chain.writable_len == 8


def test_chain_error_is_what_the_runtime_catches(drv):
    q = drv.device_queue()
    head = add_hostile(drv, "loop")
    try:
        q.pop()
    except ChainError as exc:
        assert getattr(exc, "head", None) == head
    else:
        pytest.fail("no ChainError")


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_hostile_chains_against_the_real_guest_memory(mem, kind):
    from vhostfs.memory import GuestMemory

    drv = Driver(mem, size=16)
    q = drv.device_queue(memory=GuestMemory.from_table(mem.table()))
    head = add_hostile(drv, kind)
    drv.add_chain([b"ok"], [4], indirect=True, straddle=True)
    with pytest.raises(BadChain) as info:
        q.pop()
    assert info.value.head == head
    chain = q.pop()
    assert joined(chain.readable) == b"ok" and len(chain.writable) == 2
