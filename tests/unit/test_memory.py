"""GuestMemory: mapping, translation and its edge cases."""
from __future__ import annotations

import os
import socket

import pytest
from hypothesis import given, settings, strategies as st

from vhostfs.errors import GuestMemoryError
from vhostfs.memory import GuestMemory, MemoryRegion

PAGE = 4096


def memfd(size: int, fill: int | None = None) -> int:
    fd = os.memfd_create("test-guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill is not None:
        os.pwrite(fd, bytes([fill]) * size, 0)
    return fd


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def two_regions():
    """gpa [0x0, 0x2000) and [0x2000, 0x3000) adjacent, plus [0x10000, 0x11000)."""
    a = memfd(0x3000, 0xA1)
    b = memfd(0x1000, 0xB2)
    c = memfd(0x1000, 0xC3)
    return GuestMemory.from_table([
        (0x0, 0x2000, 0x7000_0000, 0x1000, a),     # view starts at file offset 0x1000
        (0x2000, 0x1000, 0x7100_0000, 0, b),
        (0x10000, 0x1000, 0x7200_0000, 0, c),
    ]), (a, b, c)


def test_from_table_maps_and_closes_fds():
    mem, fds = two_regions()
    assert not any(is_open(fd) for fd in fds)
    assert [r.guest_phys_addr for r in mem.regions] == [0, 0x2000, 0x10000]
    assert bytes(mem.contiguous(0, 4)) == b"\xa1" * 4


def test_mmap_offset_is_honoured():
    fd = memfd(0x2000)
    os.pwrite(fd, b"AT-OFFSET", 0x1000)
    mem = GuestMemory.from_table([(0x5000, 0x1000, 0x9000, 0x1000, fd)])
    assert bytes(mem.contiguous(0x5000, 9)) == b"AT-OFFSET"


def test_writes_are_shared_with_the_fd():
    fd = memfd(PAGE)
    dup = os.dup(fd)
    mem = GuestMemory.from_table([(0, PAGE, 0x1000, 0, fd)])
    mem.contiguous(100, 3)[:] = b"xyz"
    assert os.pread(dup, 3, 100) == b"xyz"
    os.close(dup)


def test_translate_splits_at_region_boundary():
    mem, _ = two_regions()
    views = mem.translate(0x1ffe, 4)
    assert [len(v) for v in views] == [2, 2]
    assert bytes(views[0]) == b"\xa1\xa1" and bytes(views[1]) == b"\xb2\xb2"


def test_translate_zero_length_is_empty():
    mem, _ = two_regions()
    assert mem.translate(0xdead_0000, 0) == []


@pytest.mark.parametrize("gpa,length", [
    (0x2fff, 2),            # runs off the end of the adjacent pair into the gap
    (0x3000, 1),            # in the gap
    (0x10fff, 2),           # runs off the last region
    (0xFFFF_FFFF_FFFF_FFFF, 2),   # gpa + len wraps 2**64
    (-1, 1),
    (0, -1),
    (1 << 64, 0),
])
def test_translate_rejects_outside(gpa, length):
    mem, _ = two_regions()
    with pytest.raises(GuestMemoryError):
        mem.translate(gpa, length)


def test_contiguous_requires_one_region():
    mem, _ = two_regions()
    assert len(mem.contiguous(0x1000, 0x1000)) == 0x1000
    with pytest.raises(GuestMemoryError):
        mem.contiguous(0x1fff, 2)   # adjacent regions are still two regions
    with pytest.raises(GuestMemoryError):
        mem.contiguous(0, 0)


def test_host_address_matches_the_view():
    import ctypes
    mem, _ = two_regions()
    addr = mem.host_address(0x2010, 2)
    view = mem.contiguous(0x2010, 2)
    view[:] = b"hi"
    assert ctypes.string_at(addr, 2) == b"hi"
    with pytest.raises(GuestMemoryError):
        mem.host_address(0x2fff, 2)


def test_uva_to_gpa():
    mem, _ = two_regions()
    assert mem.uva_to_gpa(0x7100_0010, 16) == 0x2010
    assert mem.uva_to_gpa(0x7000_0000, 0x2000) == 0
    with pytest.raises(GuestMemoryError):
        mem.uva_to_gpa(0x7000_1fff, 2)
    with pytest.raises(GuestMemoryError):
        mem.uva_to_gpa(0x6fff_ffff, 1)
    with pytest.raises(GuestMemoryError):
        mem.uva_to_gpa(0xFFFF_FFFF_FFFF_FFFF, 2)


@pytest.mark.parametrize("table", [
    [(0, 0x2000, 0x10000, 0), (0x1000, 0x1000, 0x20000, 0)],   # gpa overlap
    [(0, 0, 0x10000, 0)],                                      # zero size
    [((1 << 64) - 0x1000, 0x2000, 0x10000, 0)],                # gpa wraps
    [(0, 0x1000, (1 << 64) - 0x10, 0)],                        # uva wraps
])
def test_bad_tables_are_rejected_and_fds_closed(table):
    fds = [memfd(0x2000) for _ in table]
    with pytest.raises(GuestMemoryError):
        GuestMemory.from_table([row + (fd,) for row, fd in zip(table, fds)])
    assert not any(is_open(fd) for fd in fds)


def test_aliased_user_addresses_are_allowed():
    fd1, fd2 = memfd(0x2000, 0x11), memfd(0x2000, 0x22)
    mem = GuestMemory.from_table([(0, 0x2000, 0x10000, 0, fd1), (0x100000, 0x2000, 0x11000, 0, fd2)])
    assert mem.uva_to_gpa(0x10800, 0x100) == 0x800            # first region holding it
    assert mem.uva_to_gpa(0x11800, 0x1000) == 0x100800        # only the second holds all of it
    with pytest.raises(GuestMemoryError):
        mem.uva_to_gpa(0x11800, 0x2000)


def test_file_too_small_is_rejected_not_sigbus():
    fd = memfd(0x1000)
    with pytest.raises(GuestMemoryError, match="only 0x1000 bytes"):
        GuestMemory.from_table([(0, 0x1000, 0, 0x1000, fd)])


def test_non_regular_fd_is_rejected():
    a, b = socket.socketpair()
    fd = a.detach()
    with pytest.raises(GuestMemoryError, match="not a regular file"):
        GuestMemory.from_table([(0, 0x1000, 0, 0, fd)])
    b.close()


def test_with_and_without_region():
    mem, _ = two_regions()
    fd = memfd(PAGE, 0xD4)
    region = MemoryRegion.map(0x20000, PAGE, 0x7300_0000, 0, fd)
    os.close(fd)
    bigger = mem.with_region(region)
    assert len(bigger) == 4 and len(mem) == 3
    assert bytes(bigger.contiguous(0x20000, 1)) == b"\xd4"
    with pytest.raises(GuestMemoryError):
        bigger.with_region(region)                 # overlaps itself
    smaller = bigger.without_region(0x2000, 0x1000, 0x7100_0000)
    assert len(smaller) == 3
    with pytest.raises(GuestMemoryError):
        smaller.translate(0x2000, 1)
    with pytest.raises(GuestMemoryError):
        smaller.without_region(0x2000, 0x1000, 0x7100_0000)
    with pytest.raises(GuestMemoryError):
        bigger.without_region(0x20000, PAGE, 0x1234)  # uva must match too


def test_views_survive_the_snapshot():
    mem, _ = two_regions()
    view = mem.contiguous(0x10000, 4)
    del mem
    import gc
    gc.collect()
    assert bytes(view) == b"\xc3" * 4


# -- property: translate agrees with a byte-by-byte model ----------------------------
@st.composite
def layouts(draw):
    n = draw(st.integers(1, 4))
    regions, gpa = [], draw(st.integers(0, 4)) * PAGE
    for i in range(n):
        size = draw(st.integers(1, 3)) * PAGE
        regions.append((gpa, size, 0x1000_0000 * (i + 1), 0))
        gpa += size + draw(st.sampled_from([0, 0, PAGE]))   # adjacent or with a gap
    return regions


@settings(max_examples=60, deadline=None)
@given(layouts(), st.data())
def test_translate_matches_model(layout, data):
    table = []
    owner = {}
    for idx, (gpa, size, uva, off) in enumerate(layout):
        fd = memfd(size)
        os.pwrite(fd, bytes((idx * 7 + j) & 0xFF for j in range(size)), 0)
        table.append((gpa, size, uva, off, fd))
        for j in range(size):
            owner[gpa + j] = (idx * 7 + j) & 0xFF
    mem = GuestMemory.from_table(table)
    top = layout[-1][0] + layout[-1][1]
    gpa = data.draw(st.integers(0, top + PAGE))
    length = data.draw(st.integers(0, 4 * PAGE))
    inside = all(a in owner for a in range(gpa, gpa + length))
    if not inside:
        with pytest.raises(GuestMemoryError):
            mem.translate(gpa, length)
        return
    views = mem.translate(gpa, length)
    assert b"".join(bytes(v) for v in views) == bytes(owner[a] for a in range(gpa, gpa + length))
    assert all(len(v) > 0 for v in views)
    assert len(views) <= len(layout)
