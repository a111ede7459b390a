"""Packing of FUSE replies (no I/O): fs values -> wire bytes."""
from __future__ import annotations

import errno

from vhostfs.fs.api import Attr, Entry, StatFs, StatxAttr
from vhostfs.fuse import abi

_entry_out = abi.fuse_entry_out
_attr_out = abi.fuse_attr_out
_dirent = abi.fuse_dirent
_direntplus = abi.fuse_direntplus

_ZERO_ATTR = (0,) * 16


def errno_of(exc: OSError) -> int:
    """The errno a failed request's reply carries (negated in fuse_out_header.error).

    The one place an OSError becomes a reply's errno: a value outside 1..4095 (a
    handler bug) becomes EIO, and EMFILE (our own fd budget, not the guest process's)
    becomes ENFILE."""
    err = exc.errno if isinstance(exc.errno, int) and 0 < exc.errno < 4096 else errno.EIO
    return errno.ENFILE if err == errno.EMFILE else err


def split_timeout(seconds: float) -> tuple[int, int]:
    """A timeout in seconds -> (sec, nsec) for the wire; negative clamps to 0."""
    if seconds <= 0:
        return 0, 0
    sec = int(seconds)
    return sec, min(int((seconds - sec) * 1_000_000_000), 999_999_999)


#: (entry timeout, attr timeout) -> (entry sec, attr sec, entry nsec, attr nsec): a
#: filesystem uses one or two timeouts, and every LOOKUP/READDIRPLUS entry packs them.
_timeouts: dict[tuple[float, float], tuple[int, int, int, int]] = {}


def _entry_timeouts(entry_timeout: float, attr_timeout: float) -> tuple[int, int, int, int]:
    key = (entry_timeout, attr_timeout)
    got = _timeouts.get(key)
    if got is None:
        es, ens = split_timeout(entry_timeout)
        at, ans = split_timeout(attr_timeout)
        got = (es, at, ens, ans)
        if len(_timeouts) < 64:   # a filesystem computing timeouts per entry stays bounded
            _timeouts[key] = got
    return got


def attr_values(a: Attr) -> tuple:
    return (a.ino, a.size, a.blocks, a.atime, a.mtime, a.ctime, a.atimensec, a.mtimensec,
            a.ctimensec, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.blksize, a.flags)


def entry_values(e: Entry) -> tuple:
    a = e.attr
    return (e.nodeid, e.generation, *_entry_timeouts(e.entry_timeout, e.attr_timeout),
            a.ino, a.size, a.blocks, a.atime, a.mtime, a.ctime, a.atimensec, a.mtimensec,
            a.ctimensec, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.blksize, a.flags)


def entry_out(e: Entry) -> bytes:
    return _entry_out.pack(*entry_values(e))


def attr_out(a: Attr, timeout: float) -> bytes:
    _, sec, _, nsec = _entry_timeouts(timeout, timeout)
    return _attr_out.pack(sec, nsec, 0, a.ino, a.size, a.blocks, a.atime, a.mtime, a.ctime,
                          a.atimensec, a.mtimensec, a.ctimensec, a.mode, a.nlink, a.uid, a.gid,
                          a.rdev, a.blksize, a.flags)


def statx_out(sx: StatxAttr, timeout: float) -> bytes:
    """fuse_statx_out; rdev goes back from new_encode_dev() form to major/minor, and
    dev is 0 (the guest reports its own superblock's)."""
    a = sx.attr
    sec, nsec = split_timeout(timeout)
    rdev = a.rdev
    return abi.fuse_statx_out.pack(
        sec, nsec, 0, sx.mask, a.blksize, sx.attributes, a.nlink, a.uid, a.gid, a.mode & 0xFFFF,
        a.ino, a.size, a.blocks, sx.attributes_mask, a.atime, a.atimensec, 0,
        sx.btime, sx.btimensec, 0, a.ctime, a.ctimensec, 0, a.mtime, a.mtimensec, 0,
        (rdev >> 8) & 0xFFF, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00), 0, 0)


def open_out(fh: int, open_flags: int) -> bytes:
    return abi.fuse_open_out.pack(fh, open_flags, 0)


def write_out(size: int) -> bytes:
    return abi.fuse_write_out.pack(size, 0)


def statfs_out(s: StatFs) -> bytes:
    return abi.fuse_kstatfs.pack(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize,
                                 s.namelen, s.frsize, 0, 0, 0, 0, 0, 0, 0)


def dirent_size(namelen: int, plus: bool) -> int:
    """FUSE_DIRENT_SIZE / FUSE_DIRENTPLUS_SIZE: header + name, padded to 8 bytes."""
    base = _direntplus.size if plus else _dirent.size
    return (base + namelen + 7) & ~7


def dirent(ino: int, off: int, dtype: int, name: bytes) -> bytes:
    """One struct fuse_dirent with its name, zero-padded to a multiple of 8."""
    rec = _dirent.pack(ino, off, len(name), dtype) + name
    return rec + bytes(-len(rec) & 7)


def direntplus(entry: Entry | None, ino: int, off: int, dtype: int, name: bytes) -> bytes:
    """One struct fuse_direntplus; a missing entry packs as zeros (nodeid 0: no lookup)."""
    head = entry_values(entry) if entry is not None else (0, 0, 0, 0, 0, 0) + _ZERO_ATTR
    rec = _direntplus.pack(*head, ino, off, len(name), dtype) + name
    return rec + bytes(-len(rec) & 7)


class DirBuffer:
    """A READDIR(PLUS) reply under construction; satisfies fs.api.DirSink."""

    __slots__ = ("size", "plus", "data")

    def __init__(self, size: int, plus: bool) -> None:
        self.size = size
        self.plus = plus
        self.data = bytearray()

    def fits(self, name: bytes) -> bool:
        return len(self.data) + dirent_size(len(name), self.plus) <= self.size

    def add(self, name: bytes, ino: int, dtype: int, off: int, entry: Entry | None = None) -> None:
        if self.plus:
            rec = direntplus(entry, ino, off, dtype, name)
        else:
            rec = dirent(ino, off, dtype, name)
        if len(self.data) + len(rec) > self.size:
            raise ValueError("dirent does not fit: call fits() first")
        self.data += rec
