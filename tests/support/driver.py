"""The driver (guest) side of a split virtqueue, over fake guest memory, for tests.

Two pieces:

:class:`FakeGuestMemory`
    Guest RAM made of memfd-backed regions with the same lookup API as
    ``vhostfs.memory.GuestMemory`` (``translate``, ``contiguous``, ``host_address``,
    ``uva_to_gpa``, ``regions``), plus driver helpers ``read``/``write``/``alloc``.
    The default layout (:meth:`FakeGuestMemory.default`) has a 16 MiB main region at
    GPA 0, eight adjacent 64 KiB "stripe" regions at 16 MiB (buffers allocated with
    ``straddle=True`` cross their boundaries, so ``translate`` splits them), a gap, and
    a 1 MiB "far" region at 1 GiB.  UVAs are ``UVA_BASE + gpa``.  ``table()`` returns
    ``[(gpa, size, uva, mmap_offset, fd)]`` with duplicated fds, the shape of
    ``GuestMemory.from_table`` and of a vhost-user SET_MEM_TABLE.

:class:`Driver`
    Lays out the three rings in that memory and plays the guest::

        mem = FakeGuestMemory.default()
        drv = Driver(mem, size=256, event_idx=True)
        q = drv.device_queue()                    # a SplitQueue attached to mem
        head = drv.add_chain([b"request"], [4096])   # readable bytes, writable lengths
        chain = q.pop()                           # ... the device serves it ...
        q.add_used(chain.head, n)
        [done] = drv.used()                       # Completion(head, length, data)
        drv.kick_needed()                         # did the device ask for a kick?

    ``add_chain`` options: ``indirect=True`` (one indirect table),
    ``direct_prefix=k`` (k direct descriptors before the indirect one),
    ``straddle=True`` (every buffer crosses a region boundary), ``far=True`` (buffers
    in the far region, so a chain spans regions), ``publish=False`` (batch, then
    :meth:`Driver.publish`).

    Hostile chains: the raw API (:meth:`Driver.take_descriptors`,
    :meth:`Driver.write_desc`, :meth:`Driver.indirect_table`, :meth:`Driver.push_head`,
    :meth:`Driver.set_avail_idx`) or :func:`add_hostile` with a name from
    :data:`HOSTILE_KINDS`.

Ring writes the device reads concurrently (avail idx) use the release store of
``vhostfs.hostsys``; the used idx is read with an acquire load, so the driver also
works against a device in another thread or process sharing the memfds.
"""
from __future__ import annotations

import bisect
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

from vhostfs import hostsys
from vhostfs.errors import GuestMemoryError

UVA_BASE = 0x7F00_0000_0000
MAIN_SIZE = 16 << 20
STRIPE_BASE = 16 << 20
STRIPE_REGION = 64 << 10
STRIPE_COUNT = 6          # main + 6 stripes + far = 8 regions, QEMU's vhost-user baseline
FAR_BASE = 1 << 30
FAR_SIZE = 1 << 20
GAP_GPA = 512 << 20       # inside no region (stripes end well below, far starts at 1 GiB)

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class FakeRegion:
    __slots__ = ("guest_phys_addr", "size", "user_addr", "mmap_offset", "fd", "mmap", "view",
                 "host_addr")

    def __init__(self, gpa: int, size: int, uva: int) -> None:
        self.guest_phys_addr = gpa
        self.size = size
        self.user_addr = uva
        self.mmap_offset = 0
        self.fd = os.memfd_create(f"guest-ram-{gpa:x}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mmap = mmap.mmap(self.fd, size)
        self.view = memoryview(self.mmap)
        self.host_addr = hostsys.buffer_address(self.mmap)


class FakeGuestMemory:
    """Guest RAM for tests; same lookup API and errors as ``vhostfs.memory.GuestMemory``."""

    def __init__(self, layout: Iterable[tuple[int, int]], *, stripe_region: int = STRIPE_REGION,
                 stripe_count: int = STRIPE_COUNT) -> None:
        self.stripe_region = stripe_region
        self.stripe_end = STRIPE_BASE + stripe_region * stripe_count
        self.regions = tuple(sorted((FakeRegion(gpa, size, UVA_BASE + gpa) for gpa, size in layout),
                                    key=lambda r: r.guest_phys_addr))
        self._starts = [r.guest_phys_addr for r in self.regions]
        self._uva_starts = [r.user_addr for r in self.regions]
        self._bump = {r.guest_phys_addr: r.guest_phys_addr for r in self.regions}
        self._stripe_ptr = STRIPE_BASE

    @classmethod
    def default(cls, *, stripe_region: int = STRIPE_REGION, stripe_count: int = STRIPE_COUNT
                ) -> FakeGuestMemory:
        """Main region, ``stripe_count`` adjacent stripes (``stripe_count - 1`` boundaries a
        straddling buffer can cross, one buffer per boundary), the far region.  The default
        is 8 regions, which a vhost-user frontend may always send."""
        layout = [(0, MAIN_SIZE), (FAR_BASE, FAR_SIZE)]
        layout += [(STRIPE_BASE + i * stripe_region, stripe_region) for i in range(stripe_count)]
        return cls(layout, stripe_region=stripe_region, stripe_count=stripe_count)

    def table(self) -> list[tuple[int, int, int, int, int]]:
        """``[(gpa, size, uva, mmap_offset, fd)]`` with fresh fds the caller owns."""
        return [(r.guest_phys_addr, r.size, r.user_addr, 0, os.dup(r.fd)) for r in self.regions]

    def close(self) -> None:
        for r in self.regions:
            if r.fd >= 0:
                os.close(r.fd)
                r.fd = -1

    # -- the GuestMemory API -------------------------------------------------------------------
    def _region_at(self, gpa: int):
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self.regions[i].guest_phys_addr + self.regions[i].size:
            return self.regions[i]
        return None

    def translate(self, gpa: int, length: int) -> list[memoryview]:
        if gpa < 0 or length < 0 or gpa + length > 1 << 64:
            raise GuestMemoryError(f"range 0x{gpa:x}+0x{length:x} outside the address space")
        out = []
        while length:
            r = self._region_at(gpa)
            if r is None:
                raise GuestMemoryError(f"gpa 0x{gpa:x} is not in guest memory")
            off = gpa - r.guest_phys_addr
            n = min(length, r.size - off)
            out.append(r.view[off:off + n])
            gpa += n
            length -= n
        return out

    def _one(self, gpa: int, length: int):
        r = self._region_at(gpa) if gpa >= 0 and length > 0 else None
        if r is None or gpa + length > r.guest_phys_addr + r.size:
            raise GuestMemoryError(f"range 0x{gpa:x}+0x{length:x} is not inside one region")
        return r

    def contiguous(self, gpa: int, length: int) -> memoryview:
        r = self._one(gpa, length)
        off = gpa - r.guest_phys_addr
        return r.view[off:off + length]

    def host_address(self, gpa: int, length: int) -> int:
        r = self._one(gpa, length)
        return r.host_addr + gpa - r.guest_phys_addr

    def uva_to_gpa(self, uva: int, length: int) -> int:
        i = bisect.bisect_right(self._uva_starts, uva) - 1
        if length > 0 and i >= 0:
            r = self.regions[i]
            if r.user_addr <= uva and uva + length <= r.user_addr + r.size:
                return r.guest_phys_addr + uva - r.user_addr
        raise GuestMemoryError(f"uva range 0x{uva:x}+0x{length:x} is not inside one region")

    # -- driver helpers --------------------------------------------------------------------------
    def gpa_to_uva(self, gpa: int) -> int:
        return self._one(gpa, 1).user_addr + gpa - self._one(gpa, 1).guest_phys_addr

    def read(self, gpa: int, length: int) -> bytes:
        return b"".join(v.tobytes() for v in self.translate(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        pos = 0
        for v in self.translate(gpa, len(data)):
            v[:] = data[pos:pos + len(v)]
            pos += len(v)

    def alloc(self, size: int, *, align: int = 16, region: int = 0, straddle: bool = False) -> int:
        """Bump-allocate ``size`` bytes; ``straddle`` places them across a stripe boundary."""
        if straddle and size >= 2:
            half = size // 2
            b = STRIPE_BASE + self.stripe_region
            end = self.stripe_end
            while b < end:
                start = b - half      # unaligned on purpose: guest buffers need none
                if start >= self._stripe_ptr and start < b < start + size <= end:
                    self._stripe_ptr = start + size
                    return start
                b += self.stripe_region
            raise MemoryError("no region boundary left to straddle (use more stripes)")
        base = region
        r = self._one(base, 1)
        ptr = (self._bump[base] + align - 1) & ~(align - 1)
        if ptr + size > r.guest_phys_addr + r.size:
            raise MemoryError("fake guest memory exhausted")
        self._bump[base] = ptr + size
        return ptr


class Completion(NamedTuple):
    head: int
    length: int
    data: bytes          # the first ``length`` bytes of the chain's writable buffers


class Desc(NamedTuple):
    addr: int
    length: int
    flags: int = 0
    next: int = 0


@dataclass
class _Pending:
    descriptors: list[int]
    writable: list[tuple[int, int]]


def vring_need_event(event: int, new: int, old: int) -> bool:
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class Driver:
    """The guest side of one split virtqueue (see the module docstring)."""

    def __init__(self, memory: FakeGuestMemory, size: int = 256, *, event_idx: bool = False,
                 start_idx: int = 0, ring_region: int = 0) -> None:
        self.memory = memory
        self.size = size
        self.event_idx = event_idx
        self.desc_gpa = memory.alloc(16 * size, align=4096, region=ring_region)
        self.avail_gpa = memory.alloc(6 + 2 * size, align=4096, region=ring_region)
        self.used_gpa = memory.alloc(6 + 8 * size, align=4096, region=ring_region)
        memory.write(self.desc_gpa, bytes(16 * size))
        memory.write(self.avail_gpa, bytes(6 + 2 * size))
        memory.write(self.used_gpa, bytes(6 + 8 * size))
        self._avail_host = memory.host_address(self.avail_gpa, 6 + 2 * size)
        self._used_host = memory.host_address(self.used_gpa, 6 + 8 * size)
        self._avail = memory.contiguous(self.avail_gpa, 6 + 2 * size)
        self._used = memory.contiguous(self.used_gpa, 6 + 8 * size)
        self._desc = memory.contiguous(self.desc_gpa, 16 * size)
        # Both indices start at start_idx (a device restarted mid-stream, or wraparound tests).
        self.avail_idx = start_idx & 0xFFFF        # next value to publish
        self._published = self.avail_idx
        self._kick_checked = self.avail_idx
        self.last_used = start_idx & 0xFFFF
        _U16.pack_into(self._avail, 2, self.avail_idx)
        _U16.pack_into(self._used, 2, self.last_used)
        self._free = list(range(size - 1, -1, -1))
        self._pending: dict[int, _Pending] = {}

    # -- device-side view --------------------------------------------------------------------
    @property
    def desc_uva(self) -> int:
        return self.memory.gpa_to_uva(self.desc_gpa)

    @property
    def avail_uva(self) -> int:
        return self.memory.gpa_to_uva(self.avail_gpa)

    @property
    def used_uva(self) -> int:
        return self.memory.gpa_to_uva(self.used_gpa)

    def device_queue(self, index: int = 0, memory=None):
        """A SplitQueue over this ring, attached to ``memory`` (default: the fake)."""
        from vhostfs.virtqueue.split import SplitQueue

        q = SplitQueue(index, self.size, self.desc_uva, self.avail_uva, self.used_uva,
                       event_idx=self.event_idx, last_avail_idx=self.avail_idx)
        q.attach(memory if memory is not None else self.memory)
        return q

    # -- building chains ---------------------------------------------------------------------
    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    def take_descriptors(self, n: int) -> list[int]:
        """Reserve ``n`` descriptor indices (raw API); freed when their head is used."""
        if n > len(self._free):
            raise RuntimeError(f"driver: {n} descriptors wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        _DESC.pack_into(self._desc, 16 * index, addr, length, flags, next)

    def indirect_table(self, entries: Sequence[Desc], *, straddle: bool = False) -> tuple[int, int]:
        """Write an indirect table into guest memory; returns (gpa, length in bytes)."""
        raw = b"".join(_DESC.pack(*e) for e in entries)
        gpa = self.memory.alloc(max(len(raw), 16), straddle=straddle)
        self.memory.write(gpa, raw)
        return gpa, len(raw)

    def _buffers(self, readable, writable, straddle, far):
        region = FAR_BASE if far else 0
        out = []
        for data in readable:
            gpa = self.memory.alloc(max(len(data), 1), straddle=straddle, region=region)
            self.memory.write(gpa, bytes(data))
            out.append((gpa, len(data), 0))
        for n in writable:
            gpa = self.memory.alloc(max(n, 1), straddle=straddle, region=region)
            out.append((gpa, n, F_WRITE))
        return out

    def add_chain(self, readable: Sequence[bytes] = (), writable: Sequence[int] = (), *,
                  indirect: bool = False, direct_prefix: int = 0, straddle: bool = False,
                  far: bool = False, publish: bool = True) -> int:
        """Add a chain: device-readable buffers holding ``readable``, then device-writable
        buffers of the ``writable`` lengths.  Returns the head index."""
        bufs = self._buffers(readable, writable, straddle, far)
        writable_bufs = [(gpa, n) for gpa, n, f in bufs if f & F_WRITE]
        if indirect:
            direct_prefix = min(direct_prefix, len(bufs) - 1)   # the table gets at least one
            direct, rest = bufs[:direct_prefix], bufs[direct_prefix:]
            table = [Desc(gpa, n, f | (F_NEXT if i + 1 < len(rest) else 0), i + 1)
                     for i, (gpa, n, f) in enumerate(rest)]
            tgpa, tlen = self.indirect_table(table, straddle=straddle)
            links = direct + [(tgpa, tlen, F_INDIRECT)]
        else:
            links = bufs
        if not links:
            raise ValueError("a chain needs at least one buffer")
        idx = self.take_descriptors(len(links))
        for k, (gpa, n, f) in enumerate(links):
            last = k + 1 == len(links)
            self.write_desc(idx[k], gpa, n, f | (0 if last else F_NEXT), 0 if last else idx[k + 1])
        self._pending[idx[0]] = _Pending(idx, writable_bufs)
        self.push_head(idx[0], publish=publish)
        return idx[0]

    def push_head(self, head: int, *, publish: bool = True, descriptors: Sequence[int] = (),
                  writable: Sequence[tuple[int, int]] = ()) -> None:
        """Place ``head`` in the next avail ring slot (raw API: ``descriptors`` are the
        indices to free when it is used)."""
        if head not in self._pending:
            self._pending[head] = _Pending(list(descriptors) or [head], list(writable))
        _U16.pack_into(self._avail, 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self) -> None:
        """Expose every pushed head: store the avail idx with release semantics."""
        hostsys.store_release_u16(self._avail_host + 2, self.avail_idx)
        self._published = self.avail_idx

    def set_avail_idx(self, value: int) -> None:
        """Hostile: store any avail idx."""
        hostsys.store_release_u16(self._avail_host + 2, value & 0xFFFF)

    def write_avail_slot(self, slot: int, head: int) -> None:
        """Hostile: write any value into avail ring slot ``slot``."""
        _U16.pack_into(self._avail, 4 + 2 * (slot % self.size), head)

    # -- notifications -----------------------------------------------------------------------
    def set_used_event(self, value: int) -> None:
        _U16.pack_into(self._avail, 4 + 2 * self.size, value & 0xFFFF)

    def set_no_interrupt(self, on: bool) -> None:
        _U16.pack_into(self._avail, 0, 1 if on else 0)

    @property
    def used_flags(self) -> int:
        return _U16.unpack_from(self._used, 0)[0]

    @property
    def avail_event(self) -> int:
        return _U16.unpack_from(self._used, 4 + 8 * self.size)[0]

    def kick_needed(self) -> bool:
        """After publish(): whether the device asked to be notified (§2.7.10.1).

        With EVENT_IDX, over the avail idx range published since the previous call.
        """
        hostsys.fence_seq_cst()
        new, old = self._published, self._kick_checked
        self._kick_checked = new
        if self.event_idx:
            return vring_need_event(self.avail_event, new, old)
        return not self.used_flags & 1

    # -- completions ---------------------------------------------------------------------------
    @property
    def used_idx(self) -> int:
        return hostsys.load_acquire_u16(self._used_host + 2)

    def used(self) -> list[Completion]:
        """Completions published since the last call; frees their descriptors."""
        out = []
        idx = self.used_idx
        while self.last_used != idx:
            head, length = _USED_ELEM.unpack_from(self._used, 4 + 8 * (self.last_used % self.size))
            self.last_used = (self.last_used + 1) & 0xFFFF
            pending = self._pending.pop(head, None)
            data = b""
            if pending is not None:
                self._free.extend(pending.descriptors)
                chunks, left = [], length
                for gpa, n in pending.writable:
                    take = min(n, left)
                    if take:
                        chunks.append(self.memory.read(gpa, take))
                    left -= take
                data = b"".join(chunks)
            out.append(Completion(head, length, data))
        return out


# -- hostile chains ------------------------------------------------------------------------------
HOSTILE_KINDS = (
    "loop", "self_loop", "next_out_of_range", "too_long_indirect_loop", "indirect_next_out_of_range",
    "nested_indirect", "indirect_with_next", "indirect_len_zero", "indirect_len_unaligned",
    "indirect_too_large", "indirect_outside_memory", "read_after_write", "read_after_write_indirect",
    "length_overflow", "outside_memory", "in_gap", "straddles_gap", "address_wraps",
)


def add_hostile(drv: Driver, kind: str, *, publish: bool = True) -> int:
    """Add one malformed chain of the given kind (see HOSTILE_KINDS); returns its head.

    Every kind must make the device raise a ChainError carrying this head.
    """
    mem = drv.memory
    buf = mem.alloc(64)
    out = mem.alloc(64)
    if kind == "loop":
        a, b, c = idx = drv.take_descriptors(3)
        drv.write_desc(a, buf, 8, F_NEXT, b)
        drv.write_desc(b, buf, 8, F_NEXT, c)
        drv.write_desc(c, buf, 8, F_NEXT, a)
    elif kind == "self_loop":
        idx = drv.take_descriptors(1)
        drv.write_desc(idx[0], buf, 8, F_NEXT, idx[0])
    elif kind == "next_out_of_range":
        idx = drv.take_descriptors(1)
        drv.write_desc(idx[0], buf, 8, F_NEXT, drv.size)
    elif kind in ("too_long_indirect_loop", "indirect_next_out_of_range", "nested_indirect",
                  "read_after_write_indirect"):
        if kind == "too_long_indirect_loop":
            table = [Desc(buf, 8, F_NEXT, 1), Desc(buf, 8, F_NEXT, 0)]
        elif kind == "indirect_next_out_of_range":
            table = [Desc(buf, 8, F_NEXT, 2), Desc(buf, 8)]
        elif kind == "nested_indirect":
            inner, ilen = drv.indirect_table([Desc(buf, 8)])
            table = [Desc(buf, 8, F_NEXT, 1), Desc(inner, ilen, F_INDIRECT)]
        else:
            table = [Desc(out, 8, F_WRITE | F_NEXT, 1), Desc(buf, 8)]
        tgpa, tlen = drv.indirect_table(table)
        idx = drv.take_descriptors(1)
        drv.write_desc(idx[0], tgpa, tlen, F_INDIRECT)
    elif kind == "indirect_with_next":
        tgpa, tlen = drv.indirect_table([Desc(buf, 8)])
        idx = drv.take_descriptors(2)
        drv.write_desc(idx[0], tgpa, tlen, F_INDIRECT | F_NEXT, idx[1])
        drv.write_desc(idx[1], out, 8, F_WRITE)
    elif kind in ("indirect_len_zero", "indirect_len_unaligned", "indirect_too_large",
                  "indirect_outside_memory"):
        tgpa, tlen = drv.indirect_table([Desc(buf, 8), Desc(buf, 8)])
        tlen = {"indirect_len_zero": 0, "indirect_len_unaligned": 24,
                "indirect_too_large": 16 * 4097, "indirect_outside_memory": tlen}[kind]
        if kind == "indirect_outside_memory":
            tgpa = GAP_GPA
        idx = drv.take_descriptors(1)
        drv.write_desc(idx[0], tgpa, tlen, F_INDIRECT)
    elif kind == "read_after_write":
        idx = drv.take_descriptors(2)
        drv.write_desc(idx[0], out, 8, F_WRITE | F_NEXT, idx[1])
        drv.write_desc(idx[1], buf, 8, 0)
    elif kind == "length_overflow":
        # Every buffer is inside memory, but 257 x 16 MiB > 2^32 - 1 bytes in total
        # (an indirect table, so any queue size can hold it).
        n = (1 << 32) // MAIN_SIZE + 1
        table = [Desc(0, MAIN_SIZE, F_NEXT if i + 1 < n else 0, i + 1) for i in range(n)]
        tgpa, tlen = drv.indirect_table(table)
        idx = drv.take_descriptors(1)
        drv.write_desc(idx[0], tgpa, tlen, F_INDIRECT)
    elif kind == "outside_memory":
        idx = drv.take_descriptors(1)
        drv.write_desc(idx[0], FAR_BASE + FAR_SIZE - 4, 8, 0)   # runs off the end of the far region
    elif kind == "in_gap":
        idx = drv.take_descriptors(1)
        drv.write_desc(idx[0], GAP_GPA, 8, 0)
    elif kind == "straddles_gap":
        idx = drv.take_descriptors(1)
        drv.write_desc(idx[0], mem.stripe_end - 8, 16, F_WRITE)
    elif kind == "address_wraps":
        idx = drv.take_descriptors(1)
        drv.write_desc(idx[0], (1 << 64) - 8, 16, 0)
    else:
        raise ValueError(f"unknown hostile chain kind {kind!r}")
    drv.push_head(idx[0], publish=publish, descriptors=idx)
    return idx[0]
