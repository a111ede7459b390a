"""Typed wrappers over the compiled helper ``vhostfs._hostsys``.

This is the only module that imports the cffi extension.  Ring atomics live here
because pure Python cannot express acquire/release ordering (virtio 1.2 §2.7.13).
Syscalls that Python's ``os`` lacks are wrapped below, each raising ``OSError``
with the errno the kernel gave.
"""
from __future__ import annotations

from vhostfs._hostsys import ffi, lib

load_acquire_u16 = lib.vhs_load_acquire_u16
store_release_u16 = lib.vhs_store_release_u16
fence_seq_cst = lib.vhs_fence_seq_cst


def buffer_address(buf) -> int:
    """Host virtual address of a writable buffer (an ``mmap``); caller keeps it alive."""
    return int(lib.vhs_buffer_address(ffi.from_buffer(buf, require_writable=True)))



# --- Filesystem syscalls Python's os lacks (cffi_build/parts/10_syscalls.*) ---------------

import os as _os
import threading
from typing import NamedTuple as _NamedTuple

STATX_BASIC_STATS = lib.VHS_STATX_BASIC_STATS
STATX_MNT_ID = lib.VHS_STATX_MNT_ID
STATX_BTIME = lib.VHS_STATX_BTIME
RESOLVE_NO_XDEV = lib.VHS_RESOLVE_NO_XDEV
RESOLVE_NO_MAGICLINKS = lib.VHS_RESOLVE_NO_MAGICLINKS
RESOLVE_NO_SYMLINKS = lib.VHS_RESOLVE_NO_SYMLINKS
RESOLVE_BENEATH = lib.VHS_RESOLVE_BENEATH
RESOLVE_IN_ROOT = lib.VHS_RESOLVE_IN_ROOT
RENAME_NOREPLACE = lib.VHS_RENAME_NOREPLACE
RENAME_EXCHANGE = lib.VHS_RENAME_EXCHANGE
RENAME_WHITEOUT = lib.VHS_RENAME_WHITEOUT
UTIME_NOW = lib.VHS_UTIME_NOW
UTIME_OMIT = lib.VHS_UTIME_OMIT
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100


class Statx(_NamedTuple):
    """The fields of ``struct statx`` the filesystem uses (dev/rdev already makedev'd)."""

    mask: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    ino: int
    size: int
    blocks: int
    blksize: int
    atime: int
    atime_nsec: int
    mtime: int
    mtime_nsec: int
    ctime: int
    ctime_nsec: int
    dev: int
    mnt_id: int
    btime: int = 0           # valid when mask has STATX_BTIME
    btime_nsec: int = 0
    attributes: int = 0      # STATX_ATTR_*
    attributes_mask: int = 0


def _fail(what: str) -> None:
    err = ffi.errno
    raise OSError(err, f"{what}: {_os.strerror(err)}")


def _path(path: bytes | str | None):
    if path is None:
        return ffi.NULL
    return _os.fsencode(path)


_S63, _U64 = 1 << 63, 1 << 64
_statx_local = threading.local()


def statx(dirfd: int, path: bytes | str, flags: int, mask: int = STATX_BASIC_STATS | STATX_MNT_ID) -> Statx:
    """statx(2); ``statx(fd, b"", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`` stats an O_PATH fd."""
    try:
        out = _statx_local.buf
    except AttributeError:
        out = _statx_local.buf = ffi.new("uint64_t[22]")   # one per thread, reused
    if lib.vhs_statx_fields(dirfd, _path(path), flags, mask, out) < 0:
        _fail("statx")
    v = ffi.unpack(out, 22)
    if v[10] >= _S63 or v[12] >= _S63 or v[14] >= _S63 or v[18] >= _S63:   # before 1970 (s64)
        for i in (10, 12, 14, 18):
            if v[i] >= _S63:
                v[i] -= _U64
    return Statx._make(v)


def openat2(dirfd: int, path: bytes | str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2) with ``struct open_how``; returns the new fd."""
    fd = lib.vhs_openat2(dirfd, _path(path), flags, mode, resolve)
    if fd < 0:
        _fail("openat2")
    return fd


def renameat2(olddirfd: int, oldpath: bytes, newdirfd: int, newpath: bytes, flags: int = 0) -> None:
    """renameat2(2): flags are RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT."""
    if lib.vhs_renameat2(olddirfd, _path(oldpath), newdirfd, _path(newpath), flags) < 0:
        _fail("renameat2")


def utimensat(dirfd: int, path: bytes | str | None, atime: tuple[int, int], mtime: tuple[int, int],
              flags: int = 0) -> None:
    """utimensat(2); a nsec of UTIME_NOW / UTIME_OMIT means "now" / "leave unchanged"."""
    if lib.vhs_utimensat(dirfd, _path(path), atime[0], atime[1], mtime[0], mtime[1], flags) < 0:
        _fail("utimensat")


def fchownat(dirfd: int, path: bytes | str, uid: int, gid: int, flags: int = 0) -> None:
    """fchownat(2); uid/gid of 0xFFFFFFFF leave that id unchanged; allows AT_EMPTY_PATH."""
    if lib.vhs_fchownat(dirfd, _path(path), uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, flags) < 0:
        _fail("fchownat")


def setfsuid(uid: int) -> int:
    """Set the calling thread's fsuid; returns the previous one; EPERM if it did not take."""
    prev = lib.vhs_setfsuid(uid)
    if lib.vhs_setfsuid(0xFFFFFFFF) != uid:
        raise OSError(1, f"setfsuid({uid}) refused")
    return prev


def setfsgid(gid: int) -> int:
    """Set the calling thread's fsgid; returns the previous one; EPERM if it did not take."""
    prev = lib.vhs_setfsgid(gid)
    if lib.vhs_setfsgid(0xFFFFFFFF) != gid:
        raise OSError(1, f"setfsgid({gid}) refused")
    return prev


# --- issue 3: fallocate modes, syncfs, per-thread setgroups, file handles (20_fsops.*) ---

def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (FALLOC_FL_*); Python's os only has mode 0."""
    if lib.vhs_fallocate(fd, mode, offset, length) < 0:
        _fail("fallocate")


def syncfs(fd: int) -> None:
    """syncfs(2): flush the filesystem holding ``fd``."""
    if lib.vhs_syncfs(fd) < 0:
        _fail("syncfs")


def setgroups_thread(groups) -> None:
    """Set the calling thread's supplementary groups (raw syscall: this thread only)."""
    groups = list(groups)
    arr = ffi.new("uint32_t[]", groups or [0])
    if lib.vhs_setgroups_thread(len(groups), arr) < 0:
        _fail("setgroups")


def set_fscreds(fsuid: int, fsgid: int, groups=None) -> None:
    """This thread's fsuid, fsgid and (unless None) supplementary groups, in one call
    (groups first, fsuid last); EPERM if an id did not take."""
    if groups is None:
        rc = lib.vhs_set_fscreds(fsuid, fsgid, -1, ffi.NULL)
    else:
        rc = lib.vhs_set_fscreds(fsuid, fsgid, len(groups), ffi.new("uint32_t[]", groups or [0]))
    if rc < 0:
        raise OSError(-rc, f"setting fsuid {fsuid} fsgid {fsgid} groups {groups}: "
                           f"{_os.strerror(-rc)}")


MAX_HANDLE_SZ = 128


def name_to_handle_at(dirfd: int, path: bytes | str, flags: int) -> tuple[int, bytes, int]:
    """name_to_handle_at(2) -> (handle_type, handle bytes, mount_id)."""
    buf = ffi.new("unsigned char[]", MAX_HANDLE_SZ)
    htype = ffi.new("int *")
    mnt = ffi.new("int *")
    n = lib.vhs_name_to_handle(dirfd, _path(path), flags, buf, MAX_HANDLE_SZ, htype, mnt)
    if n < 0:
        _fail("name_to_handle_at")
    return htype[0], bytes(ffi.buffer(buf, n)), mnt[0]


def open_by_handle_at(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
    """open_by_handle_at(2) (needs CAP_DAC_READ_SEARCH); returns the new fd."""
    fd = lib.vhs_open_by_handle(mount_fd, handle, len(handle), handle_type, flags)
    if fd < 0:
        _fail("open_by_handle_at")
    return fd


# --- Directory streams: getdents64 and a full-range seek (30_dirents.*) -------------------

def getdents64(fd: int, cbuf, size: int) -> int:
    """getdents64(2) into ``cbuf`` (a cffi pointer from ``ffi.from_buffer``, ``size`` bytes
    long); returns the number of bytes of linux_dirent64 records, 0 at the end."""
    n = lib.vhs_getdents64(fd, cbuf, size)
    if n < 0:
        raise OSError(-n, f"getdents64: {_os.strerror(-n)}")
    return n


def dir_seek(fd: int, off: int) -> None:
    """lseek(fd, off, SEEK_SET) for a directory cookie: ``off`` is the guest's u64, passed
    as the signed 64-bit off_t the kernel reads (a negative one fails with EINVAL there)."""
    off &= (1 << 64) - 1
    r = lib.vhs_dir_seek(fd, off - (1 << 64) if off >= 1 << 63 else off)
    if r < 0:
        raise OSError(-r, f"lseek: {_os.strerror(-r)}")


def dirent_buffer(size: int):
    """A bytearray for getdents64 and the cffi pointer to it (keep both together)."""
    buf = bytearray(size)
    return buf, ffi.from_buffer(buf, require_writable=True)
