"""Property tests: EVENT_IDX wraparound, no lost wakeups, chain round trips, hostile tables."""
from __future__ import annotations

import struct

import pytest

from hypothesis import HealthCheck, assume, given, settings, strategies as st

from tests.support.driver import (
    FAR_BASE, FAR_SIZE, GAP_GPA, MAIN_SIZE, STRIPE_BASE, Driver, FakeGuestMemory,
)
from vhostfs.errors import ChainError, QueueBroken
from vhostfs.virtqueue import BadChain, Reader, Writer

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_MEM = None


def memory() -> FakeGuestMemory:
    """One fake memory per test process: examples only bump-allocate in it."""
    global _MEM
    if _MEM is None:
        _MEM = FakeGuestMemory.default(stripe_region=16 << 10, stripe_count=128)
    return _MEM


def fresh_memory_if_low() -> FakeGuestMemory:
    global _MEM
    m = memory()
    if m._bump[0] > MAIN_SIZE - (2 << 20) or m._stripe_ptr > m.stripe_end - (256 << 10) \
            or m._bump[FAR_BASE] > FAR_BASE + FAR_SIZE - (256 << 10):
        m.close()
        _MEM = None
    return memory()


near_wrap = st.one_of(st.integers(0xFFFF - 600, 0xFFFF), st.integers(0, 0xFFFF))
sizes = st.sampled_from([1, 2, 4, 8, 16, 64, 256])


@SETTINGS
@given(start=near_wrap, size=sizes, data=st.data())
def test_event_idx_used_notifications_match_the_spec(start, size, data):
    """§2.7.7.2: notify iff an entry was written at index used_event since the last check."""
    drv = Driver(fresh_memory_if_low(), size, event_idx=True, start_idx=start)
    q = drv.device_queue()
    count = start                         # unwrapped used idx
    first = True
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        batch = data.draw(st.integers(0, size), label="batch")
        event = data.draw(st.one_of(st.integers(0, 0xFFFF),
                                    st.integers(-3, size + 3).map(lambda d: (count + d) & 0xFFFF)),
                          label="used_event")
        for _ in range(batch):
            drv.add_chain([], [1], publish=False)
        drv.publish()
        drv.set_used_event(event)
        heads = [q.pop().head for _ in range(batch)]
        for h in heads:
            q.add_used(h, 0)
        old, count = count, count + batch
        expect = first or any((j & 0xFFFF) == event for j in range(old, count))
        assert q.needs_notification() == expect
        first = False
        assert q.used_idx == count & 0xFFFF
        assert len(drv.used()) == batch


@SETTINGS
@given(start=near_wrap, size=sizes, event_idx=st.booleans(),
       steps=st.lists(st.tuples(st.sampled_from(["publish", "serve", "sleep"]), st.integers(1, 8)),
                      min_size=1, max_size=25))
def test_no_lost_wakeups(start, size, event_idx, steps):
    """After enable_notification() + an empty re-check, the next publish must kick."""
    drv = Driver(fresh_memory_if_low(), size, event_idx=event_idx, start_idx=start)
    q = drv.device_queue()
    asleep = False
    for op, n in steps:
        if op == "publish":
            n = min(n, drv.free_descriptors)
            if not n:
                continue
            for _ in range(n):
                drv.add_chain([], [1], publish=False)
            drv.publish()
            kick = drv.kick_needed()
            if asleep:
                assert kick, "device went to sleep and missed a buffer"
                asleep = False
        elif op == "serve":           # woken up (or polling): serve with kicks off
            asleep = False
            q.disable_notification()
            while (chain := q.pop()) is not None:
                q.add_used(chain.head, 0)
            drv.used()
        else:  # the runtime's drain loop: enable, re-check, sleep if empty
            q.enable_notification()
            chain = q.pop()
            if chain is None:
                asleep = True
            else:
                q.add_used(chain.head, 0)
                drv.used()


chunk = st.binary(min_size=0, max_size=3000)


@SETTINGS
@given(readable=st.lists(chunk, max_size=6), writable=st.lists(st.integers(0, 5000), max_size=6),
       indirect=st.booleans(), straddle=st.booleans(), far=st.booleans(), data=st.data())
def test_chain_round_trip(readable, writable, indirect, straddle, far, data):
    assume(readable or writable)
    assume(not (straddle and far))
    mem = fresh_memory_if_low()
    drv = Driver(mem, 16)
    q = drv.device_queue()
    prefix = data.draw(st.integers(0, len(readable) + len(writable))) if indirect else 0
    drv.add_chain(readable, writable, indirect=indirect, direct_prefix=prefix,
                  straddle=straddle, far=far)
    chain = q.pop()
    r = Reader(chain.readable)
    assert r.remaining == sum(map(len, readable)) == chain.readable_len
    assert r.read(r.remaining) == b"".join(readable)
    w = Writer(chain.writable)
    assert w.capacity == sum(writable) == chain.writable_len
    reply = data.draw(st.binary(max_size=w.capacity))
    w.write(reply)
    q.add_used(chain.head, w.written)
    [done] = drv.used()
    assert done.data == reply


_DESC = struct.Struct("<QIHH")
addresses = st.one_of(st.integers(0, MAIN_SIZE - 1), st.integers(FAR_BASE - 64, FAR_BASE + FAR_SIZE),
                      st.just(GAP_GPA), st.integers(0, (1 << 64) - 1),
                      st.integers(STRIPE_BASE - 32, STRIPE_BASE + 32))
lengths = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 48, 0xFFFF_FFFF, 1 << 31, 65536]),
                    st.integers(0, 0xFFFF_FFFF))


@SETTINGS
@given(size=st.sampled_from([1, 2, 4, 8, 16]), data=st.data())
def test_hostile_tables_never_crash(size, data):
    """Any table/ring contents: pop() returns a chain or raises ChainError/QueueBroken."""
    mem = fresh_memory_if_low()
    drv = Driver(mem, size)
    q = drv.device_queue()
    descs = data.draw(st.lists(st.tuples(addresses, lengths, st.integers(0, 7),
                                         st.integers(0, 0xFFFF) | st.integers(0, size)),
                               min_size=size, max_size=size))
    for i, d in enumerate(descs):
        drv.write_desc(i, *d)
    # a few indirect tables the descriptors may point at
    tables = data.draw(st.lists(st.lists(st.tuples(addresses, lengths, st.integers(0, 7),
                                                   st.integers(0, 8)), min_size=1, max_size=8),
                                max_size=2))
    for t in tables:
        gpa, n = drv.indirect_table([tuple(e) for e in t])
        if descs:
            i = data.draw(st.integers(0, size - 1))
            drv.write_desc(i, gpa, data.draw(st.sampled_from([n, n - 8, 0, n + 16])), 4, 0)
    for slot in range(size):
        drv.write_avail_slot(slot, data.draw(st.integers(0, size) | st.integers(0, 0xFFFF)))
    drv.set_avail_idx(data.draw(st.integers(0, size) | st.integers(0, 0xFFFF)))
    for _ in range(size + 1):
        try:
            chain = q.pop()
        except BadChain as exc:
            assert 0 <= exc.head < size
            q.add_used(exc.head, 0)
            continue
        except ChainError:
            raise AssertionError("a ChainError without a head")
        except QueueBroken:
            break
        if chain is None:
            break
        total = chain.readable_len + chain.writable_len
        assert total <= 0xFFFF_FFFF
        assert sum(len(v) for v in chain.readable) == chain.readable_len
        assert sum(len(v) for v in chain.writable) == chain.writable_len
        q.add_used(chain.head, 0)


@pytest.fixture(scope="module", autouse=True)
def _release_memory():
    """The shared fake memory holds ~130 memfds (and a real mapping as many dups):
    give them back when this module is done, not at the end of the session (the
    process would otherwise carry them into every later test)."""
    yield
    global _MEM
    if _MEM is not None:
        _MEM.close()
    _MEM = None
