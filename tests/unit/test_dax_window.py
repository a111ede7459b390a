"""vhostfs.dax.window: validation of every guest-supplied value, piece planning, records."""
from __future__ import annotations

import errno
import struct

import pytest

from vhostfs.dax.window import (FLAG_READ, FLAG_WRITE, PAGE_SIZE, RANGE_SIZE, Mapping, Piece, Window,
                                WindowError, plan_pieces)
from vhostfs.fuse import abi

MiB = 1 << 20


def test_constants_match_the_kernel_header():
    # include/uapi/linux/fuse.h (7.31): 40-byte setupmapping_in, 4 + 16 for removemapping
    assert abi.fuse_setupmapping_in.size == 40
    assert abi.fuse_removemapping_in.size == 4
    assert abi.fuse_removemapping_one.size == 16
    assert abi.FUSE_REMOVEMAPPING_MAX_ENTRY == 256
    assert (FLAG_WRITE, FLAG_READ) == (abi.FUSE_SETUPMAPPING_FLAG_WRITE, abi.FUSE_SETUPMAPPING_FLAG_READ)
    assert RANGE_SIZE == 2 * MiB


@pytest.mark.parametrize("size", [0, MiB, 3 * MiB, -2 * MiB])
def test_window_size_must_be_a_multiple_of_2mib(size):
    with pytest.raises(ValueError):
        Window(size)


@pytest.mark.parametrize("moffset,foffset,length,flags,err", [
    (0, 0, 2 * MiB, 0, errno.EINVAL),                     # neither read nor write
    (0, 0, 2 * MiB, 4, errno.EINVAL),                     # unknown flag
    (0, 0, 2 * MiB, FLAG_READ | 1 << 63, errno.EINVAL),
    (MiB, 0, MiB, FLAG_READ, errno.EINVAL),               # moffset not 2 MiB aligned
    (4096, 0, 4096, FLAG_READ, errno.EINVAL),
    (0, 4096, 2 * MiB, FLAG_READ, errno.EINVAL),          # foffset not 2 MiB aligned
    (0, 0, 0, FLAG_READ, errno.EINVAL),                   # zero length
    (0, 0, 4 * MiB, FLAG_READ, errno.EINVAL),             # longer than a range
    (0, 0, 2 * MiB - 1, FLAG_READ, errno.EINVAL),         # not a page multiple
    (8 * MiB, 0, 2 * MiB, FLAG_READ, errno.EINVAL),       # past the window
    ((1 << 64) - 2 * MiB, 0, 2 * MiB, FLAG_READ, errno.EINVAL),
    (0, (1 << 63) - 2 * MiB + 2 * MiB, 2 * MiB, FLAG_READ, errno.EINVAL),  # file offset overflow
    (0, (1 << 64) - 2 * MiB, 2 * MiB, FLAG_READ, errno.EINVAL),
])
def test_check_setup_refuses(moffset, foffset, length, flags, err):
    w = Window(8 * MiB)
    with pytest.raises(WindowError) as info:
        w.check_setup(moffset, foffset, length, flags)
    assert info.value.errno == err
    assert len(w) == 0


def test_check_setup_accepts_what_linux_sends():
    w = Window(8 * MiB)
    assert w.check_setup(6 * MiB, 100 * 2 * MiB, 2 * MiB, FLAG_READ) is False
    assert w.check_setup(0, 0, 2 * MiB, FLAG_READ | FLAG_WRITE) is True
    assert w.check_setup(0, 0, 4096, FLAG_WRITE) is True


@pytest.mark.parametrize("size,expected", [
    (1, [Piece(0, PAGE_SIZE, 0, True)]),                                 # 1 byte: shadow page only
    (4096, [Piece(0, 4096, 0)]),                                          # page aligned: no shadow
    (2 * MiB - 1, [Piece(0, 2 * MiB - 4096, 0), Piece(2 * MiB - 4096, 4096, 0, True)]),
    (2 * MiB, [Piece(0, 2 * MiB, 0)]),
    (2 * MiB + 1, [Piece(0, 2 * MiB, 0)]),                                # range fully inside
    (100 * MiB, [Piece(0, 2 * MiB, 0)]),
])
def test_plan_pieces_first_range(size, expected):
    assert list(plan_pieces(0, 0, 2 * MiB, size)) == expected


def test_plan_pieces_tail_range_and_past_eof():
    assert plan_pieces(4 * MiB, 2 * MiB, 2 * MiB, 2 * MiB + 1) == (Piece(4 * MiB, 4096, 0, True),)
    assert plan_pieces(4 * MiB, 2 * MiB, 2 * MiB, 2 * MiB + 8192 + 5) == (
        Piece(4 * MiB, 8192, 2 * MiB), Piece(4 * MiB + 8192, 4096, 0, True))
    with pytest.raises(WindowError) as info:
        plan_pieces(0, 2 * MiB, 2 * MiB, 2 * MiB)
    assert info.value.errno == errno.EINVAL


def _mapping(moffset, nodeid=7, pieces=None):
    return Mapping(moffset, nodeid, 0, 2 * MiB, False,
                   pieces if pieces is not None else (Piece(moffset, 2 * MiB, 0),))


def test_records_and_remove_checks():
    w = Window(8 * MiB)
    w.record(_mapping(0))
    w.record(_mapping(2 * MiB, nodeid=8))
    with pytest.raises(WindowError) as info:
        w.record(_mapping(0))                       # a map over a map
    assert info.value.errno == errno.EBUSY
    with pytest.raises(WindowError) as info:
        w.check_remove(4 * MiB, 2 * MiB)            # nothing there
    assert info.value.errno == errno.ENOENT
    with pytest.raises(WindowError) as info:
        w.check_remove(0, 4096)                     # not the whole mapping
    assert info.value.errno == errno.EINVAL
    with pytest.raises(WindowError):
        w.check_remove(MiB, 2 * MiB)                # misaligned
    assert w.check_remove(0, 2 * MiB).nodeid == 7
    assert [m.moffset for m in w.of_inode(7)] == [0]
    w.check_invariants()
    assert w.drop(0).nodeid == 7
    assert not w.has_inode(7) and w.has_inode(8)
    assert [m.moffset for m in w.clear()] == [2 * MiB]
    assert len(w) == 0


def test_record_refuses_pieces_outside_their_range():
    w = Window(8 * MiB)
    with pytest.raises(WindowError):
        w.record(_mapping(0, pieces=(Piece(2 * MiB, 4096, 0),)))
    with pytest.raises(WindowError):
        w.record(_mapping(0, pieces=(Piece(100, 4096, 0),)))
    assert len(w) == 0


def test_removemapping_body_layout():
    body = abi.fuse_removemapping_in.pack(2) + abi.fuse_removemapping_one.pack(0, 2 * MiB) \
        + abi.fuse_removemapping_one.pack(4 * MiB, 2 * MiB)
    assert len(body) == 4 + 32
    assert struct.unpack_from("<QQ", body, 20) == (4 * MiB, 2 * MiB)
