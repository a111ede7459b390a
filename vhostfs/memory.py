"""Guest memory: an immutable snapshot of the regions the frontend shared with us.

The frontend (QEMU) describes guest RAM as regions, each backed by a file descriptor
(vhost-user.rst, "Memory regions description" and "Memory access").  Every region has
a guest physical address (GPA), a size, the frontend's own user virtual address (UVA,
the address space vring addresses are given in) and an offset into the fd.

A :class:`GuestMemory` never changes: a new memory table (SET_MEM_TABLE) or a region
added or removed (ADD_MEM_REG / REM_MEM_REG) builds a new snapshot.  Every memoryview
handed out keeps its ``mmap`` alive, so a request still holding views survives a table
swap, and the old snapshot is simply dropped: we never call ``mmap.close()``.

Every lookup is bounds-checked with Python integers, so ``gpa + length`` cannot wrap;
addresses and lengths outside ``[0, 2**64)`` are rejected like any other address that
is not inside a region.  All failures raise :class:`~vhostfs.errors.GuestMemoryError`.
"""
from __future__ import annotations

import bisect
import mmap
import os
import stat

from vhostfs import hostsys
from vhostfs.errors import GuestMemoryError

U64_LIMIT = 1 << 64

__all__ = ["MemoryRegion", "GuestMemory"]


def _check_range(what: str, addr: int, length: int) -> None:
    """Reject negative values and ranges that leave the 64-bit address space."""
    if not 0 <= addr < U64_LIMIT or length < 0 or addr + length > U64_LIMIT:
        raise GuestMemoryError(f"{what} range 0x{addr:x}+0x{length:x} is outside the 64-bit address space")


class MemoryRegion:
    """One vhost-user memory region, mmapped from the fd the frontend passed."""

    __slots__ = ("guest_phys_addr", "size", "user_addr", "mmap_offset", "view", "host_addr", "_mmap")

    def __init__(self, guest_phys_addr: int, size: int, user_addr: int, mmap_offset: int,
                 mapping: mmap.mmap) -> None:
        self.guest_phys_addr = guest_phys_addr
        self.size = size
        self.user_addr = user_addr
        self.mmap_offset = mmap_offset
        self._mmap = mapping
        self.view = memoryview(mapping)[mmap_offset:mmap_offset + size]
        self.host_addr = hostsys.buffer_address(mapping) + mmap_offset

    @classmethod
    def map(cls, guest_phys_addr: int, size: int, user_addr: int, mmap_offset: int,
            fd: int) -> MemoryRegion:
        """Map ``fd`` (shared, read/write) and return the region.

        Does not close ``fd``; the caller owns it and may close it at once (Python's
        ``mmap`` keeps a private dup of it until the mapping is freed, which happens
        when the last snapshot or view using the region goes).  The file is mapped from offset 0 for
        ``mmap_offset + size`` bytes (mmap offsets must be page aligned, region offsets
        need not be) and the region's view starts at ``mmap_offset``.
        """
        desc = f"region gpa=0x{guest_phys_addr:x} size=0x{size:x} uva=0x{user_addr:x} offset=0x{mmap_offset:x}"
        if size <= 0:
            raise GuestMemoryError(f"{desc}: zero-size region")
        _check_range(f"{desc}: guest", guest_phys_addr, size)
        _check_range(f"{desc}: user", user_addr, size)
        _check_range(f"{desc}: mmap", mmap_offset, size)
        length = mmap_offset + size
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise GuestMemoryError(f"{desc}: cannot stat its fd: {exc.strerror}") from None
        # Touching a page past the end of a file raises SIGBUS, which would kill the
        # process: only regular files (memfd, shm, hugetlbfs, plain files) large enough
        # to cover the region are accepted.
        if not stat.S_ISREG(st.st_mode):
            raise GuestMemoryError(f"{desc}: fd is not a regular file or memfd")
        if st.st_size < length:
            raise GuestMemoryError(f"{desc}: backing file is only 0x{st.st_size:x} bytes")
        try:
            mapping = mmap.mmap(fd, length, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        except (OSError, ValueError, OverflowError) as exc:
            raise GuestMemoryError(f"{desc}: mmap failed: {exc}") from None
        return cls(guest_phys_addr, size, user_addr, mmap_offset, mapping)

    @property
    def gpa_end(self) -> int:
        return self.guest_phys_addr + self.size

    @property
    def uva_end(self) -> int:
        return self.user_addr + self.size

    def __repr__(self) -> str:
        return (f"MemoryRegion(gpa=0x{self.guest_phys_addr:x}, size=0x{self.size:x}, "
                f"uva=0x{self.user_addr:x}, mmap_offset=0x{self.mmap_offset:x})")


def _check_disjoint(regions: list[MemoryRegion], key, what: str) -> None:
    ordered = sorted(regions, key=key)
    for prev, cur in zip(ordered, ordered[1:]):
        if key(cur) < key(prev) + prev.size:
            raise GuestMemoryError(f"overlapping {what} ranges: {prev!r} and {cur!r}")


class GuestMemory:
    """An immutable snapshot of the guest's memory regions."""

    __slots__ = ("regions", "_starts")

    def __init__(self, regions=()) -> None:
        ordered = sorted(regions, key=lambda r: r.guest_phys_addr)
        # Guest addresses must be unambiguous.  User addresses may alias (two guest
        # ranges backed by the same frontend memory); uva_to_gpa takes the first region
        # that holds the whole range, as libvhost-user and rust-vmm do.
        _check_disjoint(ordered, lambda r: r.guest_phys_addr, "guest physical address")
        self.regions: tuple[MemoryRegion, ...] = tuple(ordered)
        self._starts = [r.guest_phys_addr for r in self.regions]

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_table(cls, table) -> GuestMemory:
        """Build a snapshot from ``[(gpa, size, uva, mmap_offset, fd), ...]``.

        Takes ownership of every fd: all are closed before returning or raising (the
        mappings stay valid after the fd is closed).
        """
        try:
            regions = [MemoryRegion.map(gpa, size, uva, off, fd) for gpa, size, uva, off, fd in table]
            return cls(regions)
        finally:
            for entry in table:
                _close_quietly(entry[4])

    def with_region(self, region: MemoryRegion) -> GuestMemory:
        """A new snapshot with ``region`` added (rejected if it overlaps another)."""
        return GuestMemory(self.regions + (region,))

    def without_region(self, gpa: int, size: int, uva: int) -> GuestMemory:
        """A new snapshot without the region identified by (gpa, size, uva).

        vhost-user.rst, VHOST_USER_REM_MEM_REG: the region is identified by its guest
        address, user address and size; the mmap offset is ignored.
        """
        for region in self.regions:
            if (region.guest_phys_addr, region.size, region.user_addr) == (gpa, size, uva):
                return GuestMemory(r for r in self.regions if r is not region)
        raise GuestMemoryError(f"no region gpa=0x{gpa:x} size=0x{size:x} uva=0x{uva:x} to remove")

    def __len__(self) -> int:
        return len(self.regions)

    # -- lookups --------------------------------------------------------------------
    def _region_at(self, gpa: int) -> MemoryRegion | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self.regions[i]
            if gpa < region.guest_phys_addr + region.size:
                return region
        return None

    def _one_region(self, gpa: int, length: int) -> MemoryRegion:
        _check_range("guest", gpa, length)
        if length == 0:
            raise GuestMemoryError(f"zero-length access at gpa 0x{gpa:x}")
        region = self._region_at(gpa)
        if region is None or gpa + length > region.guest_phys_addr + region.size:
            raise GuestMemoryError(
                f"guest range 0x{gpa:x}+0x{length:x} does not lie inside one memory region")
        return region

    def translate(self, gpa: int, length: int) -> list[memoryview]:
        """Writable views covering ``[gpa, gpa+length)``, split where regions end.

        A zero length gives an empty list.  Raises GuestMemoryError if any byte of the
        range lies outside the regions (including gaps between adjacent regions).
        """
        _check_range("guest", gpa, length)
        views: list[memoryview] = []
        addr, remaining = gpa, length
        while remaining:
            region = self._region_at(addr)
            if region is None:
                raise GuestMemoryError(
                    f"guest range 0x{gpa:x}+0x{length:x}: address 0x{addr:x} is not in guest memory")
            offset = addr - region.guest_phys_addr
            n = min(remaining, region.size - offset)
            views.append(region.view[offset:offset + n])
            addr += n
            remaining -= n
        return views

    def contiguous(self, gpa: int, length: int) -> memoryview:
        """One writable view of ``[gpa, gpa+length)``; the range must lie in one region."""
        region = self._one_region(gpa, length)
        offset = gpa - region.guest_phys_addr
        return region.view[offset:offset + length]

    def host_address(self, gpa: int, length: int) -> int:
        """Host virtual address of ``gpa``, checking ``length`` bytes lie in one region.

        The address is valid only while this snapshot (or a view from it) is alive.
        """
        region = self._one_region(gpa, length)
        return region.host_addr + (gpa - region.guest_phys_addr)

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """Translate a frontend user address (vring addresses are UVAs) to a GPA.

        vhost-user.rst, "Memory access": user addresses map to the region containing
        that user address.  The whole ``length`` must lie inside that one region.
        """
        _check_range("user", uva, length)
        if length == 0:
            raise GuestMemoryError(f"zero-length access at uva 0x{uva:x}")
        # Only ring setup calls this (not the data path): a scan is fine, and it is
        # correct when user ranges alias.
        for region in self.regions:
            if region.user_addr <= uva and uva + length <= region.user_addr + region.size:
                return region.guest_phys_addr + (uva - region.user_addr)
        raise GuestMemoryError(f"user range 0x{uva:x}+0x{length:x} does not lie inside one memory region")

    def __repr__(self) -> str:
        return f"GuestMemory({list(self.regions)!r})"


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
