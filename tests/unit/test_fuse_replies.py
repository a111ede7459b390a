"""Byte tables for fuse/replies.py."""
from __future__ import annotations

import pytest

from vhostfs.fs.api import Attr, Entry, StatFs
from vhostfs.fuse import abi, replies

ATTR = Attr(ino=0x11, size=0x22, blocks=3, atime=4, mtime=5, ctime=6, atimensec=7, mtimensec=8,
            ctimensec=9, mode=0o100644, nlink=1, uid=1000, gid=100, rdev=0, blksize=4096)


def le(*fields: tuple[int, int]) -> bytes:
    return b"".join(v.to_bytes(n, "little", signed=v < 0) for v, n in fields)


ATTR_BYTES = le((0x11, 8), (0x22, 8), (3, 8), (4, 8), (5, 8), (6, 8), (7, 4), (8, 4), (9, 4),
                (0o100644, 4), (1, 4), (1000, 4), (100, 4), (0, 4), (4096, 4), (0, 4))


def test_split_timeout():
    assert replies.split_timeout(1.0) == (1, 0)
    assert replies.split_timeout(1.5) == (1, 500_000_000)
    assert replies.split_timeout(0) == (0, 0)
    assert replies.split_timeout(-3) == (0, 0)


def test_entry_out_bytes():
    raw = replies.entry_out(Entry(5, 0, ATTR, 1.5, 2.0))
    assert len(raw) == abi.fuse_entry_out.size == 128
    assert raw == le((5, 8), (0, 8), (1, 8), (2, 8), (500_000_000, 4), (0, 4)) + ATTR_BYTES
    assert abi.fuse_entry_out.unpack(raw)[0] == 5


def test_attr_out_bytes():
    raw = replies.attr_out(ATTR, 0.25)
    assert raw == le((0, 8), (250_000_000, 4), (0, 4)) + ATTR_BYTES
    assert len(raw) == 104


def test_open_write_statfs_out():
    assert replies.open_out(7, 2) == le((7, 8), (2, 4), (0, 4))
    assert replies.write_out(4096) == le((4096, 4), (0, 4))
    raw = replies.statfs_out(StatFs(1, 2, 3, 4, 5, 4096, 255, 512))
    assert raw == le((1, 8), (2, 8), (3, 8), (4, 8), (5, 8), (4096, 4), (255, 4), (512, 4)) + bytes(28)
    assert len(raw) == 80


@pytest.mark.parametrize("name,size", [(b"a", 32), (b"abcdefgh", 32), (b"abcdefghi", 40),
                                       (b"x" * 16, 40)])
def test_dirent_padding(name, size):
    raw = replies.dirent(9, 3, 8, name)
    assert len(raw) == size == replies.dirent_size(len(name), False)
    assert raw == le((9, 8), (3, 8), (len(name), 4), (8, 4)) + name + bytes(size - 24 - len(name))


def test_direntplus_layout_and_padding():
    e = Entry(5, 0, ATTR, 1.0, 1.0)
    raw = replies.direntplus(e, 0x11, 4, 8, b"file")
    assert len(raw) == 160 == replies.dirent_size(4, True)
    assert raw[:128] == replies.entry_out(e)
    assert raw[128:152] == le((0x11, 8), (4, 8), (4, 4), (8, 4))
    assert raw[152:] == b"file" + bytes(4)
    dots = replies.direntplus(None, 2, 1, 4, b".")
    assert dots[:128] == bytes(128) and len(dots) == 160


def test_dir_buffer_fits_exactly():
    buf = replies.DirBuffer(64, plus=False)
    assert buf.fits(b"a")
    buf.add(b"a", 1, 8, 1)
    assert buf.fits(b"b")
    buf.add(b"b", 2, 8, 2)
    assert not buf.fits(b"c")
    with pytest.raises(ValueError):
        buf.add(b"c", 3, 8, 3)
    assert len(buf.data) == 64
