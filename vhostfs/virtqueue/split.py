"""The device side of a split virtqueue (virtio 1.2 §2.7).

:class:`SplitQueue` pops descriptor chains from the available ring and publishes
completions in the used ring.  It is not thread-safe: the runtime serialises
``pop()``, ``add_used()``, ``needs_notification()`` and the notification switches per
queue.

Memory ordering (pure Python cannot express it; the cffi helper does, see
``vhostfs.hostsys``):

* pop(): the avail ``idx`` is loaded with acquire semantics before any ring entry or
  descriptor is read.  It pairs with the driver's barrier before its ``idx`` update
  (§2.7.13.3.1 "The driver MUST perform a suitable memory barrier before the idx
  update").
* add_used(): the used element (``id``, ``len``) is written, then ``idx`` is stored
  with release semantics (§2.7.8.2 "The device MUST set len prior to updating the used
  idx", and the data written into the buffers before it).
* needs_notification(): a full fence between the used ``idx`` store and the load of
  ``used_event`` / avail ``flags``, so the device cannot miss a driver that re-enabled
  interrupts concurrently (§2.7.7 / §2.7.14; the mirror of the driver's rule in
  §2.7.13.4.1).
* enable_notification(): stores used ``flags`` / ``avail_event``, then a full fence, so
  the caller's re-check of the avail ``idx`` (the next pop()) cannot be ordered before
  the store (the race described at the end of §2.7.14 and in §2.7.10).

Validation (guest-controlled values):

* ``avail idx - last_avail_idx`` (mod 2^16) larger than the queue size: the driver
  exposed more buffers than the ring holds (§2.7.6.1, idx never goes back) ->
  QueueBroken.
* A head index >= size in the avail ring -> QueueBroken.  There is no valid id to
  return in the used ring, so the ring is unusable; ``last_avail_idx`` is not advanced.
  (QEMU and Linux vhost treat it the same way.)
* A malformed chain -> :class:`~vhostfs.virtqueue.chain.BadChain` (a ChainError with
  ``head``); the slot is consumed: return ``head`` with ``add_used(head, 0)``.
"""
from __future__ import annotations

from vhostfs import hostsys
from vhostfs.errors import QueueBroken, VirtqueueError
from vhostfs.virtqueue.chain import DescriptorChain, make_walker, walk_chain
from vhostfs.virtqueue.layout import (
    AVAIL_ALIGN, AVAIL_F_NO_INTERRUPT, AVAIL_IDX_OFFSET, AVAIL_RING_OFFSET, DESC_ALIGN, DESC_SIZE,
    MAX_QUEUE_SIZE, U16, USED_ALIGN, USED_ELEM, USED_ELEM_SIZE, USED_F_NO_NOTIFY, USED_IDX_OFFSET,
    USED_RING_OFFSET,
)

__all__ = ["SplitQueue", "ring_sizes", "vring_need_event"]

_load_acquire_u16 = hostsys.load_acquire_u16
_store_release_u16 = hostsys.store_release_u16
_fence = hostsys.fence_seq_cst
_unpack_u16 = U16.unpack_from
_pack_used = USED_ELEM.pack_into


def ring_sizes(size: int, event_idx: bool) -> tuple[int, int, int]:
    """Bytes of (descriptor table, avail ring, used ring) the device accesses."""
    extra = 2 if event_idx else 0
    return (DESC_SIZE * size, AVAIL_RING_OFFSET + 2 * size + extra,
            USED_RING_OFFSET + USED_ELEM_SIZE * size + extra)


def vring_need_event(event: int, new: int, old: int) -> bool:
    """True if ``event`` lies in ``[old, new)`` modulo 2^16 (§2.7.7.2 / §2.7.10)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class SplitQueue:
    """Device side of one split virtqueue; see the module docstring for the rules."""

    def __init__(self, index: int, size: int, desc_uva: int, avail_uva: int, used_uva: int,
                 *, event_idx: bool, last_avail_idx: int = 0) -> None:
        # These come from vhost-user messages (SET_VRING_NUM/ADDR/BASE): check them.
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue {index}: size {size} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
        if not 0 <= last_avail_idx <= 0xFFFF:
            raise VirtqueueError(f"queue {index}: last_avail_idx {last_avail_idx} is not a u16")
        self.index = index
        self.size = size
        self.desc_uva = desc_uva
        self.avail_uva = avail_uva
        self.used_uva = used_uva
        self.event_idx = bool(event_idx)
        self.last_avail_idx = last_avail_idx
        self._mask = size - 1
        self._used_event_offset = AVAIL_RING_OFFSET + 2 * size
        self._memory = None
        self._walker = None     # the C chain walk (chain.ChainWalker); None: walk_chain
        self._desc = None
        self._avail = None
        self._used = None
        self._avail_idx_addr = None
        self._used_flags_addr = None
        self._used_idx_addr = None
        self._avail_event_addr = None
        self._shadow_avail = last_avail_idx   # avail idx as last loaded
        self._used_count = 0                  # used idx, not wrapped at 2^16
        self._signalled_count = 0             # _used_count at the last needs_notification()
        self._signalled_valid = False
        self._attached = False
        # Dirty logging of used-ring writes (vhost-user.rst "Migration"): a DirtyLog and
        # the ring's log_guest_addr while VHOST_VRING_F_LOG is set, else None.
        self._log = None
        self._log_addr = 0

    def set_dirty_log(self, log, log_guest_addr: int = 0) -> None:
        """Log every write into the used ring at ``log_guest_addr`` + its offset in the
        ring (None: stop logging)."""
        self._log_addr = log_guest_addr
        self._log = log

    # -- setup ------------------------------------------------------------------------------
    def attach(self, memory) -> None:
        """(Re)resolve the ring addresses in ``memory`` (after every memory table change).

        Raises GuestMemoryError if a ring part is not inside one memory region, and
        QueueBroken if a part is misaligned (§2.7.1).  On the first attach the used idx
        is read back from the ring (it survives a backend restart there).
        """
        desc_len, avail_len, used_len = ring_sizes(self.size, self.event_idx)
        desc_gpa = memory.uva_to_gpa(self.desc_uva, desc_len)
        avail_gpa = memory.uva_to_gpa(self.avail_uva, avail_len)
        used_gpa = memory.uva_to_gpa(self.used_uva, used_len)
        if desc_gpa % DESC_ALIGN or avail_gpa % AVAIL_ALIGN or used_gpa % USED_ALIGN:
            raise QueueBroken(f"queue {self.index}: misaligned ring (desc 0x{desc_gpa:x}, "
                              f"avail 0x{avail_gpa:x}, used 0x{used_gpa:x})")
        desc = memory.contiguous(desc_gpa, desc_len)
        avail = memory.contiguous(avail_gpa, avail_len)
        used = memory.contiguous(used_gpa, used_len)
        avail_host = memory.host_address(avail_gpa, avail_len)
        used_host = memory.host_address(used_gpa, used_len)
        # The atomics need naturally aligned host addresses (an unaligned atomic can
        # fault on some architectures, which would kill the process).
        if avail_host & 1 or used_host & 3:
            raise QueueBroken(f"queue {self.index}: ring not aligned in host memory")
        self._memory = memory
        self._desc = desc
        self._walker = make_walker(memory, desc, memory.host_address(desc_gpa, desc_len), self.size)
        self._avail = avail
        self._used = used
        self._avail_idx_addr = avail_host + AVAIL_IDX_OFFSET
        self._used_flags_addr = used_host
        self._used_idx_addr = used_host + USED_IDX_OFFSET
        self._avail_event_addr = used_host + USED_RING_OFFSET + USED_ELEM_SIZE * self.size
        self._shadow_avail = self.last_avail_idx      # force a fresh load of avail idx
        if not self._attached:
            self._attached = True
            self._used_count = self._signalled_count = _unpack_u16(used, USED_IDX_OFFSET)[0]

    @property
    def used_idx(self) -> int:
        """The used idx we last published (mod 2^16)."""
        return self._used_count & 0xFFFF

    # -- hot path ---------------------------------------------------------------------------
    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None if the driver has not exposed one.

        Raises BadChain (a ChainError with ``head``; the slot is consumed) or
        QueueBroken (nothing consumed; stop serving this queue).
        """
        last = self.last_avail_idx
        if self._shadow_avail == last:
            addr = self._avail_idx_addr
            if addr is None:
                raise QueueBroken(f"queue {self.index}: pop() before attach()")
            # §2.7.13.3: read idx (acquire) before the ring entries it exposes.
            avail_idx = _load_acquire_u16(addr)
            pending = (avail_idx - last) & 0xFFFF
            if not pending:
                return None
            if pending > self.size:
                raise QueueBroken(f"queue {self.index}: avail idx {avail_idx} is {pending} ahead of "
                                  f"{last}, more than the queue size {self.size}")
            self._shadow_avail = avail_idx
        head = _unpack_u16(self._avail, AVAIL_RING_OFFSET + ((last & self._mask) << 1))[0]
        if head >= self.size:
            raise QueueBroken(f"queue {self.index}: avail ring slot {last} holds head {head} "
                              f">= queue size {self.size}")
        self.last_avail_idx = (last + 1) & 0xFFFF
        walker = self._walker
        if walker is not None:
            return walker.walk(head)
        return walk_chain(self._memory, self._desc, self.size, head)

    def has_available(self) -> bool:
        """Whether the driver exposed a chain not popped yet (pop() would not return
        None).  One acquire load of the avail idx; nothing is consumed or validated."""
        last = self.last_avail_idx
        if self._shadow_avail != last:
            return True
        addr = self._avail_idx_addr
        if addr is None:
            raise QueueBroken(f"queue {self.index}: has_available() before attach()")
        return _load_acquire_u16(addr) != last

    def add_used(self, head: int, written: int) -> None:
        """Publish a completion: the used element, then the used idx (release)."""
        if not 0 <= head < self.size:
            raise ValueError(f"queue {self.index}: head {head} out of range")
        if not 0 <= written <= 0xFFFF_FFFF:
            raise ValueError(f"queue {self.index}: used length {written} is not a u32")
        addr = self._used_idx_addr
        if addr is None:
            raise QueueBroken(f"queue {self.index}: add_used() before attach()")
        count = self._used_count
        _pack_used(self._used, USED_RING_OFFSET + ((count & self._mask) << 3), head, written)
        count += 1
        self._used_count = count
        # §2.7.8.2: id and len are visible before the idx that publishes them.
        _store_release_u16(addr, count & 0xFFFF)
        log = self._log
        if log is not None:
            log.mark_gpa(self._log_addr + USED_RING_OFFSET + (((count - 1) & self._mask) << 3),
                         USED_ELEM_SIZE)
            log.mark_gpa(self._log_addr + USED_IDX_OFFSET, 2)

    def needs_notification(self) -> bool:
        """Whether the driver wants a used buffer notification now (§2.7.7.2).

        With EVENT_IDX: notify if the used idx crossed ``used_event`` since the previous
        call (``vring_need_event``); the first call after start always says yes.
        Without: notify unless the driver set NO_INTERRUPT in the avail flags.
        """
        if self._avail is None:
            raise QueueBroken(f"queue {self.index}: needs_notification() before attach()")
        # Order our used idx store before the loads below (§2.7.7, §2.7.14).
        _fence()
        if self.event_idx:
            new = self._used_count
            old = self._signalled_count
            self._signalled_count = new
            if not self._signalled_valid:
                self._signalled_valid = True
                return True
            delta = new - old
            if delta >= 0x10000:          # the whole u16 window was crossed
                return True
            event = _unpack_u16(self._avail, self._used_event_offset)[0]
            return ((new - event - 1) & 0xFFFF) < delta
        return not _unpack_u16(self._avail, 0)[0] & AVAIL_F_NO_INTERRUPT

    def disable_notification(self) -> None:
        """Ask the driver not to kick (a hint, §2.7.10).

        Without EVENT_IDX: set NO_NOTIFY in the used flags.  With EVENT_IDX the flags
        must stay 0 (§2.7.10.2); ``avail_event`` is left where it is, behind the avail
        idx, so the driver will not reach it again until it wraps.
        """
        if self._used_flags_addr is None:
            raise QueueBroken(f"queue {self.index}: disable_notification() before attach()")
        if not self.event_idx:
            _store_release_u16(self._used_flags_addr, USED_F_NO_NOTIFY)
            if self._log is not None:
                self._log.mark_gpa(self._log_addr, 2)

    def enable_notification(self) -> None:
        """Ask the driver to kick for the next buffer, then fence.

        With EVENT_IDX, ``avail_event = last_avail_idx``: a kick when the driver writes
        the entry we will pop next.  The caller must re-check for buffers (pop()) after
        this returns: a buffer published before the store took effect raised no kick
        (§2.7.10, the re-check pattern of §2.7.14).
        """
        if self._used_flags_addr is None:
            raise QueueBroken(f"queue {self.index}: enable_notification() before attach()")
        if self.event_idx:
            _store_release_u16(self._avail_event_addr, self.last_avail_idx)
        else:
            _store_release_u16(self._used_flags_addr, 0)
        log = self._log
        if log is not None:
            log.mark_gpa(self._log_addr + (USED_RING_OFFSET + USED_ELEM_SIZE * self.size
                                           if self.event_idx else 0), 2)
        # Store -> load ordering against the avail idx re-check.
        _fence()

    def __repr__(self) -> str:
        return (f"SplitQueue(index={self.index}, size={self.size}, event_idx={self.event_idx}, "
                f"last_avail_idx={self.last_avail_idx}, used_idx={self.used_idx})")
