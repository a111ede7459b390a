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

Two implementations of the same rules: :class:`ChainWalker` (the queue's hot path) walks
and translates in one call of the cffi helper (``vhs_walk_chain`` in
``cffi_build/parts/00_ring.c``) and only builds the views in Python; :func:`walk_chain`
is the pure-Python reference, used when the helper's segment array is too small for a
chain and by the tests, which check that both agree on random and hostile chains.  Both
raise the same BadChain messages (the ``_why_*`` functions below).  The C walk merges
pieces of adjacent descriptors that are contiguous in one region into one view (a
Linux guest's 1 MiB request is 256 page descriptors, often physically contiguous): the
bytes, lengths and order are the same, only the number of views may be smaller.  A chain
of more than ``LAZY_SEGMENTS`` segments comes back as a :class:`SegmentChain`: the same
chain, whose views are built when first asked for, and whose data the FUSE fast path moves
with one C call over the walk's segment array (``vhs_segs_io``, which checks every segment
against its region again) instead of 257 memoryviews.
"""
from __future__ import annotations

import os

from vhostfs import hostsys
from vhostfs.errors import ChainError, GuestMemoryError
from vhostfs.virtqueue.layout import (
    DESC, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MAX_CHAIN_BYTES, MAX_INDIRECT_DESCRIPTORS,
)

__all__ = ["BadChain", "ChainWalker", "DescriptorChain", "SegmentChain", "make_walker",
           "walk_chain"]

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


class SegmentChain(DescriptorChain):
    """A chain of many segments from the C walk (a Linux guest's 1 MiB request is 257
    page buffers): its views are built only when ``readable``/``writable`` are first
    read (~0.2 µs each, ~50 µs for such a chain).  ``head_views`` gives the first few,
    for the headers, and ``segment_io`` moves file data straight between a part of the
    chain and a file descriptor over the walk's segment array (``vhs_segs_io``), so a
    READ or WRITE served that way never builds the rest.

    The chain holds the walker's whole-region views (they keep the mappings alive: a
    memory-table change cannot unmap what the I/O writes to) and its C region table.
    """

    __slots__ = ("_segs", "_nr", "_n", "_region_views", "_cregions", "_nregions", "_r", "_w")

    def __init__(self, head, memory, segs: bytes, nr: int, n: int, region_views, cregions,
                 nregions: int, readable_len: int, writable_len: int) -> None:
        self.head = head
        self.memory = memory
        self.readable_len = readable_len
        self.writable_len = writable_len
        self._segs = segs
        self._nr = nr
        self._n = n
        self._region_views = region_views
        self._cregions = cregions
        self._nregions = nregions
        self._r = self._w = None

    def _views(self, start: int, stop: int) -> list[memoryview]:
        vals = memoryview(self._segs).cast("Q")[3 * start:3 * stop].tolist()
        it = iter(vals)
        views = self._region_views
        return [views[r][o:o + ln] for r, o, ln in zip(it, it, it)]

    @property
    def readable(self) -> list[memoryview]:
        if self._r is None:
            self._r = self._views(0, self._nr)
        return self._r

    @property
    def writable(self) -> list[memoryview]:
        if self._w is None:
            self._w = self._views(self._nr, self._n)
        return self._w

    def head_views(self, nr: int, nw: int) -> tuple[list[memoryview], list[memoryview]]:
        """The first (up to) ``nr`` readable and ``nw`` writable views."""
        return (self._views(0, min(nr, self._nr)),
                self._views(self._nr, self._nr + min(nw, self._n - self._nr)))

    def segment_io(self, fd: int, offset: int, to_guest: bool, skip: int, count: int) -> int:
        """preadv into the writable part (``to_guest``) or pwritev from the readable part,
        from ``skip`` bytes into it, at most ``count`` bytes, looping on short transfers;
        the bytes moved.  OSError if nothing moved."""
        first, n = (self._nr, self._n - self._nr) if to_guest else (0, self._nr)
        got = _segs_io(fd, offset, self._cregions, self._nregions,
                       _ffi.from_buffer("uint64_t[]", self._segs), first, n, skip, count,
                       1 if to_guest else 0)
        if got < 0:
            raise OSError(-got, os.strerror(-got))
        return got


# The reasons, shared by both walks so that they cannot drift apart.
def _why_next_range(index: int, limit: int, in_indirect) -> str:
    return f"next index {index} is outside the {'indirect ' if in_indirect else ''}table of {limit}"


def _why_too_long(limit: int, in_indirect) -> str:
    return (f"more than {limit} descriptors "
            f"{'in the indirect table' if in_indirect else 'in the chain'} (loop?)")


_WHY_NESTED = "INDIRECT descriptor inside an indirect table"
_WHY_INDIRECT_NEXT = "descriptor has both INDIRECT and NEXT"
_WHY_READ_AFTER_WRITE = "device-readable descriptor after a device-writable one"


def _why_indirect_len(length: int) -> str:
    return (f"indirect table length {length} is not a non-zero "
            f"multiple of 16 of at most {_MAX_INDIRECT_BYTES}")


def _why_memory(exc) -> str:
    return f"buffer outside guest memory: {exc}"


def _why_total(total: int) -> str:
    return f"total length {total} does not fit in 32 bits"


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
                raise BadChain(head, _why_next_range(index, limit, in_indirect))
            count += 1
            if count > limit:
                raise BadChain(head, _why_too_long(limit, in_indirect))
            addr, length, flags, nxt = _unpack_desc(table, index << 4)
            if flags & DESC_F_INDIRECT:
                if in_indirect:
                    raise BadChain(head, _WHY_NESTED)
                if flags & DESC_F_NEXT:
                    raise BadChain(head, _WHY_INDIRECT_NEXT)
                if length == 0 or length & 15 or length > _MAX_INDIRECT_BYTES:
                    raise BadChain(head, _why_indirect_len(length))
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
                    raise BadChain(head, _WHY_READ_AFTER_WRITE)
                if length:
                    readable_len += length
                    readable += translate(addr, length)
            if not flags & DESC_F_NEXT:
                break
            index = nxt
    except GuestMemoryError as exc:
        raise BadChain(head, _why_memory(exc)) from None
    if readable_len + writable_len > MAX_CHAIN_BYTES:
        raise BadChain(head, _why_total(readable_len + writable_len))
    return DescriptorChain(head, memory, readable, writable, readable_len, writable_len)


# --- the C walk ---------------------------------------------------------------------------
_ffi = hostsys.ffi
_lib = hostsys.lib
_c_walk = _lib.vhs_walk_chain
_segs_io = _lib.vhs_segs_io
#: Chains of more segments than this come back as SegmentChain (views built on demand).
LAZY_SEGMENTS = 8
_C_FULL = _lib.VHS_CHAIN_FULL
#: Segments the helper can return per chain, beyond one per descriptor of a full direct
#: chain and a full indirect table; a chain that needs more (many descriptors split at
#: region ends) is walked again by the Python reference.
_EXTRA_SEGMENTS = 64


class ChainWalker:
    """Walks chains of one descriptor table in one memory snapshot with the C helper.

    Built by :meth:`SplitQueue.attach` (a new snapshot or table gets a new walker).  The
    region table, the scratch buffer for an indirect table that straddles two regions
    and the segment array are allocated once here; ``walk`` is not thread-safe (the
    runtime serialises pops per queue).  The region views keep the mappings alive for
    as long as the walker may read the descriptor tables in them.
    """

    __slots__ = ("memory", "_table", "_size", "_views", "_regions", "_scratch", "_segs",
                 "_segview", "_w")

    def __init__(self, memory, table, desc_host: int, size: int) -> None:
        regions = sorted(memory.regions, key=lambda r: r.guest_phys_addr)
        self.memory = memory
        self._table = table            # the Python view of the table, for the fallback
        self._size = size
        self._views = [r.view for r in regions]
        for r, v in zip(regions, self._views):
            # The C walk bounds every segment by r.size: the view must hold that many bytes.
            if v.format != "B" or v.ndim != 1 or len(v) != r.size:
                raise ValueError("region views must be flat byte views of the whole region")
        self._regions = _ffi.new("struct vhs_region[]", max(len(regions), 1))
        for i, r in enumerate(regions):
            self._regions[i].gpa = r.guest_phys_addr
            self._regions[i].size = r.size
            self._regions[i].host = r.host_addr
        cap = size + MAX_INDIRECT_DESCRIPTORS + _EXTRA_SEGMENTS
        self._scratch = _ffi.new("unsigned char[]", _MAX_INDIRECT_BYTES)
        self._segs = _ffi.new("uint64_t[]", 3 * cap)
        self._segview = memoryview(_ffi.buffer(self._segs)).cast("Q")
        w = _ffi.new("struct vhs_walker *")
        w.regions = self._regions
        w.nregions = len(regions)
        w.size = size
        w.desc = desc_host
        w.scratch = self._scratch
        w.segs = self._segs
        w.cap = cap
        self._w = w

    def walk(self, head: int) -> DescriptorChain:
        """Like ``walk_chain(memory, table, size, head)``; ``head < size`` is the caller's job."""
        w = self._w
        rc = _c_walk(w, head)
        if rc:
            return self._failed(rc, head)
        n = w.nsegs
        nr = w.nreadable
        views = self._views
        if n == 2 and nr == 1:   # the common small request: one header+args, one reply
            r0, o0, l0, r1, o1, l1 = self._segview[:6]
            return DescriptorChain(head, self.memory, [views[r0][o0:o0 + l0]],
                                   [views[r1][o1:o1 + l1]], w.readable_len, w.writable_len)
        if n > LAZY_SEGMENTS:
            return SegmentChain(head, self.memory, self._segview[:3 * n].tobytes(), nr, n,
                                views, self._regions, len(views), w.readable_len,
                                w.writable_len)
        vals = iter(self._segview[:3 * n].tolist())
        segs = [views[r][o:o + ln] for r, o, ln in zip(vals, vals, vals)]
        return DescriptorChain(head, self.memory, segs[:nr], segs[nr:],
                               w.readable_len, w.writable_len)

    def _failed(self, rc: int, head: int) -> DescriptorChain:
        w = self._w
        if rc == _C_FULL:
            return walk_chain(self.memory, self._table, self._size, head)
        if rc == _lib.VHS_CHAIN_NEXT_RANGE:
            raise BadChain(head, _why_next_range(w.err_a, w.err_b, w.err_c))
        if rc == _lib.VHS_CHAIN_TOO_LONG:
            raise BadChain(head, _why_too_long(w.err_b, w.err_c))
        if rc == _lib.VHS_CHAIN_NESTED:
            raise BadChain(head, _WHY_NESTED)
        if rc == _lib.VHS_CHAIN_INDIRECT_NEXT:
            raise BadChain(head, _WHY_INDIRECT_NEXT)
        if rc == _lib.VHS_CHAIN_INDIRECT_LEN:
            raise BadChain(head, _why_indirect_len(w.err_a))
        if rc == _lib.VHS_CHAIN_READ_AFTER_WRITE:
            raise BadChain(head, _WHY_READ_AFTER_WRITE)
        if rc == _lib.VHS_CHAIN_TOTAL:
            raise BadChain(head, _why_total(w.err_a))
        if rc == _lib.VHS_CHAIN_MEMORY:
            # The same snapshot fails the same range the same way: its message is the
            # reason (the values are the C walk's single read of the descriptor).
            try:
                self.memory.translate(w.err_a, w.err_b)
            except GuestMemoryError as exc:
                raise BadChain(head, _why_memory(exc)) from None
            raise BadChain(head, _why_memory(f"range 0x{w.err_a:x}+0x{w.err_b:x}"))
        raise BadChain(head, f"descriptor chain walk failed ({rc})")


def make_walker(memory, table, desc_host: int, size: int):
    """A :class:`ChainWalker`, or None when ``memory`` does not expose its regions
    (``regions`` with ``guest_phys_addr``, ``size``, ``host_addr``, ``view``): the queue
    then walks with the Python reference."""
    try:
        return ChainWalker(memory, table, desc_host, size)
    except (AttributeError, TypeError, ValueError):
        return None
