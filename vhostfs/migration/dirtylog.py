"""The vhost-user dirty log: one bit per 4 KiB page of guest physical memory.

vhost-user.rst, "Migration": while VHOST_F_LOG_ALL is negotiated, every write the
back-end makes into guest memory marks its pages in the shared log
(``log[page / 8] |= 1 << page % 8``, page = gpa / 0x1000), and writes into a used ring
whose SET_VRING_ADDR carried VHOST_VRING_F_LOG are logged at ``log_guest_addr`` plus
the offset in the ring.  QEMU reads and clears the log concurrently (an atomic
exchange per word); our read-modify-write of one byte can therefore only re-set a bit
QEMU just took (a spurious dirty page), never lose one; our own writers are
serialised by a lock.

The data path finds a guest address from the host address of the view it wrote
(:meth:`DirtyLog.mark_host`), so nothing but the writers needs to know about logging,
and nothing costs anything while logging is off (the hook is None).

``witness``: when set (VHOSTFS_DIRTY_WITNESS=FILE, a test aid), every page marked is
also remembered and written to FILE (one page number a line) when the device state is
saved, so a test can compare exactly those pages of source and destination RAM.
"""
from __future__ import annotations

import bisect
import mmap
import threading

from vhostfs import hostsys

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class DirtyLog:
    def __init__(self, mapping: mmap.mmap, memory, *, witness: bool = False) -> None:
        self.mapping = mapping
        self.size = len(mapping)
        self._lock = threading.Lock()
        self._ranges: list[tuple[int, int, int]] = []   # (host start, host end, gpa)
        self._starts: list[int] = []
        self.pages_marked = 0
        self.out_of_range = 0
        self.witness: set[int] | None = set() if witness else None
        if memory is not None:
            self.add_memory(memory)

    def add_memory(self, memory) -> None:
        """Learn the host addresses of a memory snapshot's regions.  Old snapshots stay
        known: a request still writing through a view of one must be logged too."""
        with self._lock:
            for r in memory.regions:
                entry = (r.host_addr, r.host_addr + r.size, r.guest_phys_addr)
                if entry not in self._ranges:
                    self._ranges.append(entry)
            self._ranges.sort()
            self._starts = [e[0] for e in self._ranges]

    def mark_gpa(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        first, last = gpa >> PAGE_SHIFT, (gpa + length - 1) >> PAGE_SHIFT
        log = self.mapping
        with self._lock:
            for page in range(first, last + 1):
                byte = page >> 3
                if byte >= self.size:
                    self.out_of_range += 1
                    continue
                log[byte] |= 1 << (page & 7)
                self.pages_marked += 1
                if self.witness is not None:
                    self.witness.add(page)

    def mark_host(self, addr: int, length: int) -> None:
        """Mark the pages of ``length`` bytes written at host address ``addr``."""
        while length > 0:
            i = bisect.bisect_right(self._starts, addr) - 1
            if i < 0 or addr >= self._ranges[i][1]:
                self.out_of_range += 1
                return
            start, end, gpa = self._ranges[i]
            n = min(length, end - addr)
            self.mark_gpa(gpa + (addr - start), n)
            addr += n
            length -= n

    def mark_view(self, view, offset: int, length: int) -> None:
        """Mark ``length`` bytes written at ``offset`` of a guest memoryview."""
        if length > 0:
            self.mark_host(hostsys.buffer_address(view) + offset, length)

    def witness_pages(self) -> list[int]:
        with self._lock:
            return sorted(self.witness or ())
