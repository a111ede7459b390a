"""Descriptor chain walk with limits (virtio 1.2 §2.7.5, §2.7.4).

:func:`walk_chain` turns the head index the driver placed in the available ring into a
:class:`DescriptorChain`: the device-readable views first, then the device-writable
ones, each a ``memoryview`` straight on guest memory (no copies).

Every descriptor is read exactly once, with one ``unpack_from`` into locals, and only
those locals are checked and used: the guest may rewrite the table while we walk it.

Rules enforced (each raises :class:`BadChain`, a :class:`~vhostfs.errors.ChainError`
carrying ``head`` so the caller returns the chain with used length 0; the avail slot
is consumed all the same):

* ``next`` (or the head) must index the table it is in: the queue's table of ``size``
  descriptors, or the indirect table of ``len / 16`` descriptors.
* At most ``size`` descriptors in the direct part of a chain (§2.7.5.3.1: "A driver MUST
  NOT create a descriptor chain longer than the Queue Size of the device"), and at most
  as many descriptors as an indirect table holds inside it.  Exceeding either is how a
  loop shows up, so loops are caught in O(limit) without a visited set.
* INDIRECT (§2.7.5.3): only if the descriptor does not also have NEXT (§2.7.5.3.1
  "MUST NOT set both"), never inside an indirect table ("only one table per
  descriptor"), table length a non-zero multiple of 16 and at most
  ``MAX_INDIRECT_DESCRIPTORS`` entries.  Zero or more direct descriptors may precede the
  indirect one (§2.7.5.3.2).  The WRITE flag of the descriptor that points at a table is
  ignored (§2.7.5.3.2 "MUST ignore").  The table itself may straddle two adjacent
  memory regions (it is then copied once).
* No device-readable descriptor after a device-writable one (§2.7.4.2), zero-length
  ones included.
* The total length, readable plus writable, fits in 32 bits (§2.7.5.2).
* Every byte of every buffer lies in guest memory (GuestMemoryError becomes BadChain).

Zero-length descriptors are allowed and contribute no view.  The walk does not use the
ring's ``avail`` at all: :mod:`vhostfs.virtqueue.split` reads the head.
"""
from __future__ import annotations

from vhostfs.errors import ChainError, GuestMemoryError
from vhostfs.virtqueue.layout import (
    DESC, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MAX_CHAIN_BYTES, MAX_INDIRECT_DESCRIPTORS,
)

__all__ = ["BadChain", "DescriptorChain", "walk_chain"]

_unpack_desc = DESC.unpack_from
_MAX_INDIRECT_BYTES = MAX_INDIRECT_DESCRIPTORS * 16


class BadChain(ChainError):
    """A malformed descriptor chain.  ``head`` is to be returned with used length 0."""

    def __init__(self, head: int, reason: str) -> None:
        super().__init__(f"descriptor chain {head}: {reason}")
        self.head = head
        self.reason = reason


class DescriptorChain:
    """One popped request: guest buffers as views, readable part then writable part.

    ``memory`` is the GuestMemory snapshot the views come from (the views keep its
    mappings alive on their own; the reference is for code that needs to translate
    more addresses consistently).
    """

    __slots__ = ("head", "memory", "readable", "writable", "readable_len", "writable_len")

    def __init__(self, head, memory, readable, writable, readable_len, writable_len) -> None:
        self.head = head
        self.memory = memory
        self.readable: list[memoryview] = readable
        self.writable: list[memoryview] = writable
        self.readable_len: int = readable_len
        self.writable_len: int = writable_len

    def __repr__(self) -> str:
        return (f"DescriptorChain(head={self.head}, readable={self.readable_len}B/"
                f"{len(self.readable)}, writable={self.writable_len}B/{len(self.writable)})")


def _indirect_table(memory, addr: int, length: int):
    """The indirect table as one buffer: a live view, or one copy if it spans regions."""
    try:
        return memory.contiguous(addr, length)
    except GuestMemoryError:
        pass
    # translate() raises GuestMemoryError (-> BadChain in the caller) if any byte is
    # outside guest memory.
    return b"".join(memory.translate(addr, length))


def walk_chain(memory, table, size: int, head: int) -> DescriptorChain:
    """Walk the chain starting at ``head`` in ``table`` (a view of ``size`` descriptors).

    ``head < size`` is the caller's job (an out-of-range head breaks the queue).
    Raises BadChain; never returns a partial chain.
    """
    translate = memory.translate
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    readable_len = 0
    writable_len = 0
    seen_write = False
    in_indirect = False
    limit = size
    count = 0
    index = head
    try:
        while True:
            if index >= limit:
                raise BadChain(head, f"next index {index} is outside the "
                                     f"{'indirect ' if in_indirect else ''}table of {limit}")
            count += 1
            if count > limit:
                raise BadChain(head, f"more than {limit} descriptors "
                                     f"{'in the indirect table' if in_indirect else 'in the chain'} (loop?)")
            addr, length, flags, nxt = _unpack_desc(table, index << 4)
            if flags & DESC_F_INDIRECT:
                if in_indirect:
                    raise BadChain(head, "INDIRECT descriptor inside an indirect table")
                if flags & DESC_F_NEXT:
                    raise BadChain(head, "descriptor has both INDIRECT and NEXT")
                if length == 0 or length & 15 or length > _MAX_INDIRECT_BYTES:
                    raise BadChain(head, f"indirect table length {length} is not a non-zero "
                                         f"multiple of 16 of at most {_MAX_INDIRECT_BYTES}")
                table = _indirect_table(memory, addr, length)
                limit = length >> 4
                in_indirect = True
                count = 0
                index = 0
                continue
            if flags & DESC_F_WRITE:
                seen_write = True
                if length:
                    writable_len += length
                    writable += translate(addr, length)
            else:
                if seen_write:
                    raise BadChain(head, "device-readable descriptor after a device-writable one")
                if length:
                    readable_len += length
                    readable += translate(addr, length)
            if not flags & DESC_F_NEXT:
                break
            index = nxt
    except GuestMemoryError as exc:
        raise BadChain(head, f"buffer outside guest memory: {exc}") from None
    if readable_len + writable_len > MAX_CHAIN_BYTES:
        raise BadChain(head, f"total length {readable_len + writable_len} does not fit in 32 bits")
    return DescriptorChain(head, memory, readable, writable, readable_len, writable_len)
