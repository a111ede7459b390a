"""SplitQueue: attach, pop/add_used, notification suppression, ring sizes and wraparound."""
from __future__ import annotations

import pytest

from tests.support.driver import UVA_BASE, Driver, FakeGuestMemory
from vhostfs.errors import GuestMemoryError, QueueBroken, VirtqueueError
from vhostfs.virtqueue import Reader, SplitQueue, Writer


@pytest.fixture
def mem():
    m = FakeGuestMemory.default()
    yield m
    m.close()


@pytest.mark.parametrize("size", [0, 3, 100, 65536])
def test_queue_size_must_be_a_power_of_two_up_to_32768(size):
    with pytest.raises(VirtqueueError):
        SplitQueue(0, size, 0, 0, 0, event_idx=False)


def test_last_avail_idx_must_be_a_u16():
    with pytest.raises(VirtqueueError):
        SplitQueue(0, 8, 0, 0, 0, event_idx=False, last_avail_idx=65536)


def test_pop_before_attach_is_queue_broken():
    with pytest.raises(QueueBroken):
        SplitQueue(0, 8, 0, 0, 0, event_idx=False).pop()


def test_ring_outside_memory_fails_attach(mem):
    drv = Driver(mem, 8)
    q = SplitQueue(0, 8, drv.desc_uva, drv.avail_uva, UVA_BASE + (1 << 40), event_idx=False)
    with pytest.raises(GuestMemoryError):
        q.attach(mem)


def test_ring_addresses_are_uvas_not_gpas(mem):
    drv = Driver(mem, 8)
    q = SplitQueue(0, 8, drv.desc_gpa, drv.avail_gpa, drv.used_gpa, event_idx=False)
    with pytest.raises(GuestMemoryError):
        q.attach(mem)


@pytest.mark.parametrize("part,offset", [("desc", 8), ("avail", 1), ("used", 2)])
def test_misaligned_ring_part_breaks_the_queue(mem, part, offset):
    drv = Driver(mem, 8)
    uvas = {"desc": drv.desc_uva, "avail": drv.avail_uva, "used": drv.used_uva}
    uvas[part] += offset
    q = SplitQueue(0, 8, uvas["desc"], uvas["avail"], uvas["used"], event_idx=False)
    with pytest.raises(QueueBroken, match="misaligned"):
        q.attach(mem)


def test_round_trip_and_used_elements(mem):
    drv = Driver(mem, 8)
    q = drv.device_queue()
    assert q.pop() is None
    h1 = drv.add_chain([b"ping"], [16])
    h2 = drv.add_chain([b"pong"], [16])
    for expect in (h1, h2):
        chain = q.pop()
        assert chain.head == expect
        w = Writer(chain.writable)
        w.write(Reader(chain.readable).read(4)[::-1])
        q.add_used(chain.head, w.written)
    assert q.pop() is None
    assert q.used_idx == 2
    assert drv.used() == [(h1, 4, b"gnip"), (h2, 4, b"gnop")]


def test_add_used_rejects_bad_arguments(mem):
    q = Driver(mem, 8).device_queue()
    for head, n in ((8, 0), (-1, 0), (0, -1), (0, 1 << 32)):
        with pytest.raises(ValueError):
            q.add_used(head, n)


def test_used_idx_and_last_avail_idx_resume_from_the_ring(mem):
    drv = Driver(mem, 8, start_idx=1000)
    q = drv.device_queue()                   # last_avail_idx=1000, used idx read back
    assert q.used_idx == 1000 and q.last_avail_idx == 1000
    drv.add_chain([b"x"])
    q.add_used(q.pop().head, 0)
    assert q.used_idx == 1001 and drv.used_idx == 1001


def test_reattach_to_the_real_guest_memory_keeps_state(mem):
    from vhostfs.memory import GuestMemory

    drv = Driver(mem, 8)
    q = drv.device_queue()
    drv.add_chain([b"one"], [4])
    chain = q.pop()
    real = GuestMemory.from_table(mem.table())      # a new snapshot over the same memfds
    q.attach(real)
    drv.add_chain([b"two"], [4])
    chain2 = q.pop()
    assert chain2.memory is real and bytes(chain2.readable[0]) == b"two"
    q.add_used(chain.head, 0)
    q.add_used(chain2.head, 0)
    assert [c.head for c in drv.used()] == [chain.head, chain2.head]


# -- notifications without EVENT_IDX --------------------------------------------------------------
def test_no_interrupt_flag(mem):
    drv = Driver(mem, 8)
    q = drv.device_queue()
    drv.add_chain([b"a"])
    q.add_used(q.pop().head, 0)
    assert q.needs_notification()
    drv.set_no_interrupt(True)
    assert not q.needs_notification()


def test_no_notify_flag_and_the_reenable_race(mem):
    drv = Driver(mem, 8)
    q = drv.device_queue()
    drv.add_chain([b"a"])
    assert drv.kick_needed()
    q.disable_notification()
    assert drv.used_flags == 1
    drv.add_chain([b"b"])
    assert not drv.kick_needed()
    assert q.pop() and q.pop()
    q.enable_notification()                  # then re-check: a buffer published just before
    assert drv.used_flags == 0
    assert q.pop() is None
    drv.add_chain([b"c"])
    assert drv.kick_needed()


# -- notifications with EVENT_IDX -----------------------------------------------------------------
def test_event_idx_used_event(mem):
    drv = Driver(mem, 8, event_idx=True)
    q = drv.device_queue()
    for _ in range(4):
        drv.add_chain([b"a"])
    heads = [q.pop().head for _ in range(4)]
    q.add_used(heads[0], 0)
    assert q.needs_notification()            # the first check after start always notifies
    drv.set_used_event(2)                    # "notify when used idx passes 2 -> 3"
    q.add_used(heads[1], 0)                  # used idx 2
    assert not q.needs_notification()
    q.add_used(heads[2], 0)                  # used idx 3: wrote entry 2
    assert q.needs_notification()
    assert not q.needs_notification()        # nothing new
    q.add_used(heads[3], 0)
    assert not q.needs_notification()
    assert drv.used_flags == 0               # §2.7.10.2: flags stay 0 with EVENT_IDX


def test_event_idx_avail_event_and_reenable(mem):
    drv = Driver(mem, 8, event_idx=True)
    q = drv.device_queue()
    q.enable_notification()
    assert drv.avail_event == 0
    drv.add_chain([b"a"])
    assert drv.kick_needed()
    q.disable_notification()                 # avail_event stays behind
    drv.add_chain([b"b"])
    assert not drv.kick_needed()
    q.pop(); q.pop()
    q.enable_notification()
    assert drv.avail_event == 2
    assert q.pop() is None
    drv.add_chain([b"c"])
    assert drv.kick_needed()


# -- ring sizes and wraparound -------------------------------------------------------------------
@pytest.mark.parametrize("size", [1 << k for k in range(16)])
def test_every_ring_size_fills_and_wraps(mem, size):
    start = (0x10000 - size - 3) & 0xFFFF    # the indices cross 65535 -> 0 in the second round
    drv = Driver(mem, size, event_idx=True, start_idx=start)
    q = drv.device_queue()
    for rnd in range(2):
        heads = [drv.add_chain([b"%d" % i], [2], indirect=True, publish=False) for i in range(size)]
        drv.publish()
        chains = [q.pop() for _ in range(size)]
        assert q.pop() is None
        assert [c.head for c in chains] == heads
        for c in reversed(chains):            # complete out of order
            q.add_used(c.head, 1)
        assert q.needs_notification() or rnd == 1
        done = drv.used()
        assert [d.head for d in done] == heads[::-1]
    assert q.last_avail_idx == (start + 2 * size) & 0xFFFF
    assert q.used_idx == (start + 2 * size) & 0xFFFF


def test_event_idx_more_than_65535_completions_between_checks_notifies(mem):
    drv = Driver(mem, 1, event_idx=True)
    q = drv.device_queue()
    drv.add_chain([b"a"])
    head = q.pop().head
    q.add_used(head, 0)
    assert q.needs_notification()
    drv.set_used_event(q.used_idx - 1)        # "already passed": only a full wrap reaches it
    for _ in range(0x10000):
        q.add_used(head, 0)                   # the device re-completes; the window wraps fully
    assert q.needs_notification()


def test_needs_notification_before_attach_is_queue_broken():
    q = SplitQueue(0, 8, 0, 0, 0, event_idx=True)
    for op in (q.needs_notification, q.enable_notification, q.disable_notification):
        with pytest.raises(QueueBroken):
            op()
    with pytest.raises(QueueBroken):
        q.add_used(0, 0)


def test_has_available_follows_the_avail_idx_without_consuming(mem):
    drv = Driver(mem, 8)
    q = drv.device_queue()
    assert not q.has_available()
    drv.add_chain([b"a"], [4], publish=False)
    assert not q.has_available()              # pushed, not yet published
    drv.publish()
    assert q.has_available() and q.has_available()
    drv.add_chain([b"b"], [4])
    assert q.pop().head is not None and q.has_available()
    assert q.pop() is not None and not q.has_available()
    assert q.last_avail_idx == 2


def test_has_available_before_attach_is_queue_broken():
    with pytest.raises(QueueBroken):
        SplitQueue(0, 8, 0, 0, 0, event_idx=False).has_available()
