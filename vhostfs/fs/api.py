"""The filesystem contract the FUSE server calls.

One method per FUSE opcode, named after it, each raising ``OSError(ENOSYS)`` by default.
Errors are ``OSError``; ``vhostfs.fuse.server`` turns them into ``-errno`` replies.  Each
docstring states the method's effect on the kernel's lookup count of a nodeid: methods
that return an ``Entry`` with a non-zero ``nodeid`` give the kernel one reference (+1),
which it later gives back through ``forget``.

Guest buffers reach a filesystem only through the ``ReadSink`` / ``WriteSource`` /
``DirSink`` protocols below, never through ``vhostfs.virtqueue``.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Iterable, Protocol


class Cancel(Protocol):
    """A request's cancellation token, given by the runtime (``FuseServer.handle(...,
    cancel=)``).  A filesystem that waits (SETLKW) polls ``fileno()`` (readable once the
    request is cancelled) and checks ``is_set()``; it then fails the request with EINTR."""

    def fileno(self) -> int: ...

    def is_set(self) -> bool: ...


class EventCancel:
    """A ``Cancel`` backed by an eventfd: ``set()`` cancels (from any thread)."""

    __slots__ = ("_fd", "_set")

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._set = False

    def fileno(self) -> int:
        return self._fd

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set and self._fd >= 0:
            self._set = True
            os.eventfd_write(self._fd, 1)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


@dataclass(slots=True)
class Context:
    """Who is asking: the guest caller's ids, for create-type ops its umask, and the
    request's cancellation token (None: the request cannot be cancelled)."""

    uid: int
    gid: int
    pid: int
    umask: int = 0
    cancel: Cancel | None = None
    #: OPEN/CREATE with FUSE_OPEN_KILL_SUIDGID (KILLPRIV_V2: an O_TRUNC open by a caller
    #: without CAP_FSETID must clear setuid/setgid)
    kill_suidgid: bool = False
    #: supplementary groups the request carries (FUSE_CREATE_SUPP_GROUP, Linux >= 6.7)
    groups: tuple = ()
    #: security contexts of a create-type request (FUSE_SECURITY_CTX): (xattr name, value)
    secctx: tuple = ()


@dataclass(slots=True)
class Attr:
    """struct fuse_attr, in host terms (times as seconds + nanoseconds)."""

    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int = 0


@dataclass(slots=True)
class StatxAttr:
    """FUSE_STATX's answer: the fuse_attr fields, which of them (and btime) are valid
    (STATX_* ``mask``), and what only statx(2) reports."""

    attr: Attr
    mask: int
    btime: int = 0
    btimensec: int = 0
    attributes: int = 0
    attributes_mask: int = 0


@dataclass(slots=True)
class Entry:
    """A lookup result. ``nodeid`` 0 means "no inode" (a negative entry, or . and .. in
    READDIRPLUS) and carries no lookup reference."""

    nodeid: int
    generation: int
    attr: Attr
    entry_timeout: float
    attr_timeout: float


# SetAttr.valid bits and open()/opendir() reply flags: the FUSE values (fuse.h), part of
# this contract so that fs/ never imports fuse/ (tests check they equal fuse/abi.py's).
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
# DAX (fuse.h 7.31/7.36): SETUPMAPPING flags, fuse_attr.flags bit, INIT flag bits.
SETUPMAPPING_FLAG_WRITE = 1 << 0
SETUPMAPPING_FLAG_READ = 1 << 1
ATTR_DAX = 1 << 1
INIT_MAP_ALIGNMENT = 1 << 26
INIT_HAS_INODE_DAX = 1 << 33
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11
RELEASE_FLOCK_UNLOCK = 1 << 1       # FUSE_RELEASE_FLOCK_UNLOCK
WRITE_KILL_SUIDGID = 1 << 2         # FUSE_WRITE_KILL_SUIDGID
OPEN_KILL_SUIDGID = 1 << 0          # FUSE_OPEN_KILL_SUIDGID (fuse_open_in/create_in.open_flags)
ATTR_SUBMOUNT = 1 << 0              # FUSE_ATTR_SUBMOUNT (fuse_attr.flags)
# INIT flags a FileSystem may ask for in init() (the FUSE_* values, 64-bit).
INIT_POSIX_LOCKS = 1 << 1
INIT_FLOCK_LOCKS = 1 << 10
INIT_DO_READDIRPLUS = 1 << 13
INIT_READDIRPLUS_AUTO = 1 << 14
INIT_WRITEBACK_CACHE = 1 << 16
INIT_HANDLE_KILLPRIV = 1 << 19
INIT_POSIX_ACL = 1 << 20
INIT_SUBMOUNTS = 1 << 27
INIT_HANDLE_KILLPRIV_V2 = 1 << 28
INIT_SETXATTR_EXT = 1 << 29
INIT_SECURITY_CTX = 1 << 32
INIT_CREATE_SUPP_GROUP = 1 << 34
INIT_DIRECT_IO_ALLOW_MMAP = 1 << 36


@dataclass(slots=True)
class SetAttr:
    """The fields of fuse_setattr_in; ``valid`` holds the FATTR_* bits that apply."""

    valid: int
    fh: int
    size: int
    atime: int
    atimensec: int
    mtime: int
    mtimensec: int
    mode: int
    uid: int
    gid: int


@dataclass(slots=True)
class FileLock:
    """struct fuse_file_lock: a byte range [start, end] (end 2**63-1: to EOF), the lock
    type (fcntl.F_RDLCK / F_WRLCK / F_UNLCK) and the owning guest pid (0: unknown)."""

    start: int
    end: int
    type: int
    pid: int


@dataclass(slots=True)
class StatFs:
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int


class ReadSink(Protocol):
    """Where READ data goes: guest memory (a virtqueue Writer), filled by os.preadv."""

    def read_from_fd(self, fd: int, count: int, offset: int) -> int: ...


class WriteSource(Protocol):
    """Where WRITE data comes from: guest memory (a virtqueue Reader), via os.pwritev."""

    remaining: int

    def write_to_fd(self, fd: int, count: int, offset: int) -> int: ...


class DirSink(Protocol):
    """A READDIR / READDIRPLUS reply being filled.

    ``fits(name)`` says whether one more entry of that name still fits; the filesystem
    asks before it does the lookup for READDIRPLUS, so a lookup is counted only for an
    entry that is actually emitted.  ``add`` appends one entry; ``off`` is the offset
    the kernel passes back to resume after it.
    """

    def fits(self, name: bytes) -> bool: ...

    def add(self, name: bytes, ino: int, dtype: int, off: int, entry: Entry | None = None) -> None: ...


def _enosys():
    return OSError(errno.ENOSYS, "not implemented")


class FileSystem:
    """Base class: every operation fails with ENOSYS until a subclass implements it."""

    #: log2 of the alignment SETUPMAPPING offsets must have; reported in the INIT reply
    #: when ``init`` asked for INIT_MAP_ALIGNMENT (Linux 6.1 refuses values above 21).
    map_alignment: int = 0

    # --- session ---------------------------------------------------------------------
    def init(self, capable: int) -> int:
        """INIT. ``capable``: the 64-bit FUSE_* flags the kernel offered. Returns extra
        flags this filesystem wants (the server intersects them with ``capable``)."""
        return 0

    def destroy(self) -> None:
        """DESTROY: drop every inode reference and handle the kernel held."""

    def init_disable(self) -> int:
        """INIT flags this filesystem wants off even though the server would enable them
        (e.g. READDIRPLUS with --no-readdirplus)."""
        return 0

    def node_type(self, nodeid: int) -> int | None:
        """The S_IFMT bits of a known nodeid, None when unknown (no request: lets the
        runtime tell, e.g., a FIFO's OPEN that may block from a regular file's)."""
        return None

    # --- names and inodes ------------------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        """LOOKUP. Lookup count: +1 on the returned nodeid (if non-zero)."""
        raise _enosys()

    def forget(self, nodeid: int, nlookup: int) -> None:
        """FORGET: lookup count -nlookup; at 0 the nodeid is released. No reply."""

    def batch_forget(self, items: Iterable[tuple[int, int]]) -> None:
        """BATCH_FORGET: ``forget`` for each (nodeid, nlookup). No reply."""
        for nodeid, nlookup in items:
            self.forget(nodeid, nlookup)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[Attr, float]:
        """GETATTR -> (attr, attr timeout). Lookup count unchanged."""
        raise _enosys()

    def statx(self, ctx: Context, nodeid: int, fh: int | None, sx_flags: int, sx_mask: int
              ) -> tuple[StatxAttr, float]:
        """STATX (7.39) -> (attributes incl. birth time, attr timeout).  ENOSYS makes the
        guest fall back to GETATTR for good."""
        raise _enosys()

    def setattr(self, ctx: Context, nodeid: int, attr: SetAttr) -> tuple[Attr, float]:
        """SETATTR -> (new attr, attr timeout). Lookup count unchanged."""
        raise _enosys()

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        """READLINK -> target. Lookup count unchanged."""
        raise _enosys()

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        """SYMLINK, with the caller's ids. Lookup count: +1 on the new nodeid."""
        raise _enosys()

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int) -> Entry:
        """MKNOD, with the caller's ids, mode & ~ctx.umask. Lookup count: +1."""
        raise _enosys()

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int) -> Entry:
        """MKDIR, with the caller's ids, mode & ~ctx.umask. Lookup count: +1."""
        raise _enosys()

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        """UNLINK. Lookup count unchanged (the kernel forgets the nodeid later)."""
        raise _enosys()

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        """RMDIR. Lookup count unchanged."""
        raise _enosys()

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        """RENAME (flags 0) and RENAME2 (RENAME_NOREPLACE/EXCHANGE/WHITEOUT). Counts unchanged."""
        raise _enosys()

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        """LINK. Lookup count: +1 on nodeid (returned in the entry)."""
        raise _enosys()

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        """ACCESS: raise EACCES when the caller may not. Lookup count unchanged."""
        raise _enosys()

    def statfs(self, ctx: Context, nodeid: int) -> StatFs:
        """STATFS. Lookup count unchanged."""
        raise _enosys()

    # --- files -----------------------------------------------------------------------
    def open(self, ctx: Context, nodeid: int, flags: int) -> tuple[int, int]:
        """OPEN -> (fh, FOPEN_* flags). Lookup count unchanged."""
        raise _enosys()

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int
               ) -> tuple[Entry, int, int]:
        """CREATE -> (entry, fh, FOPEN_* flags), with the caller's ids. Lookup count: +1."""
        raise _enosys()

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int,
             sink: ReadSink) -> int:
        """READ: fill ``sink`` with up to ``size`` bytes; returns the count. Counts unchanged."""
        raise _enosys()

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int,
              source: WriteSource, write_flags: int) -> int:
        """WRITE ``size`` bytes from ``source``; returns the count written. Counts unchanged."""
        raise _enosys()

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        """FLUSH (each close() of a guest fd). Lookup count unchanged."""
        raise _enosys()

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int, release_flags: int,
                lock_owner: int) -> None:
        """RELEASE: fh is gone. Lookup count unchanged."""
        raise _enosys()

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        """FSYNC (fdatasync when ``datasync``). Lookup count unchanged."""
        raise _enosys()

    def fallocate(self, ctx: Context, nodeid: int, fh: int, offset: int, length: int,
                  mode: int) -> None:
        """FALLOCATE (FALLOC_FL_* ``mode``). Lookup count unchanged."""
        raise _enosys()

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        """LSEEK (SEEK_DATA / SEEK_HOLE; the kernel handles SET/CUR/END) -> offset."""
        raise _enosys()

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int,
                        nodeid_out: int, fh_out: int, off_out: int, length: int,
                        flags: int) -> int:
        """COPY_FILE_RANGE -> bytes copied. Lookup counts unchanged."""
        raise _enosys()

    def tmpfile(self, ctx: Context, parent: int, mode: int, flags: int
                ) -> tuple[Entry, int, int]:
        """TMPFILE (O_TMPFILE): an unnamed file in ``parent`` -> (entry, fh, FOPEN_*
        flags), with the caller's ids. Lookup count: +1."""
        raise _enosys()

    def ioctl(self, ctx: Context, nodeid: int, fh: int, flags: int, cmd: int, arg: int,
              data: bytes, out_size: int) -> tuple[int, bytes]:
        """IOCTL (restricted: the kernel gave the sizes) -> (result, output bytes).
        Unknown commands: ENOTTY. Lookup count unchanged."""
        raise OSError(errno.ENOTTY, "ioctl not supported")

    def poll(self, ctx: Context, nodeid: int, fh: int, kh: int, flags: int, events: int) -> int:
        """POLL -> revents. Lookup count unchanged."""
        raise _enosys()

    def bmap(self, ctx: Context, nodeid: int, blocksize: int, block: int) -> int:
        """BMAP -> the device block of a file block. Lookup count unchanged."""
        raise _enosys()

    # --- extended attributes -----------------------------------------------------------
    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int,
                 setxattr_flags: int) -> None:
        """SETXATTR (``flags``: XATTR_CREATE/REPLACE; ``setxattr_flags``: the
        SETXATTR_EXT flags, e.g. FUSE_SETXATTR_ACL_KILL_SGID). Lookup count unchanged."""
        raise _enosys()

    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        """GETXATTR: ``size`` 0 -> the value's length (int); else the value (bytes),
        ERANGE when it is longer than ``size``. Lookup count unchanged."""
        raise _enosys()

    def listxattr(self, ctx: Context, nodeid: int, size: int) -> bytes | int:
        """LISTXATTR: NUL-terminated names; ``size`` 0 -> their total length (int)."""
        raise _enosys()

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        """REMOVEXATTR. Lookup count unchanged."""
        raise _enosys()

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        """SYNCFS: flush every host filesystem under the share. Lookup count unchanged."""
        raise _enosys()

    # --- locks -----------------------------------------------------------------------
    def getlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: FileLock) -> FileLock:
        """GETLK: the first lock that would conflict with ``lock`` for ``owner``, or the
        same range with type F_UNLCK when none would. Lookup count unchanged."""
        raise _enosys()

    def setlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: FileLock,
              *, flock: bool, sleep: bool) -> None:
        """SETLK (``sleep`` False: EAGAIN on conflict) / SETLKW (``sleep`` True: wait until
        granted, or EINTR once ``ctx.cancel`` is set).  ``flock``: a BSD flock on the
        open file ``fh`` (FUSE_LK_FLOCK) instead of a POSIX lock of ``owner``.
        Lookup count unchanged."""
        raise _enosys()

    # --- DAX window --------------------------------------------------------------------
    def setupmapping(self, ctx: Context, nodeid: int, fh: int, foffset: int, length: int,
                     flags: int, moffset: int) -> None:
        """SETUPMAPPING: map ``length`` bytes of nodeid at ``foffset`` into the DAX window
        at ``moffset`` (SETUPMAPPING_FLAG_*; ``fh`` is -1 from Linux).  Mapping again at
        the same ``moffset`` replaces what is there.  Lookup count unchanged."""
        raise _enosys()

    def removemapping(self, ctx: Context, entries: list[tuple[int, int]]) -> None:
        """REMOVEMAPPING: unmap each (moffset, len) of the window.  Lookup count unchanged."""
        raise _enosys()

    # --- directories -----------------------------------------------------------------
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> tuple[int, int]:
        """OPENDIR -> (fh, FOPEN_* flags). Lookup count unchanged."""
        raise _enosys()

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int, sink: DirSink) -> None:
        """READDIR from ``offset`` into ``sink`` until it is full. Lookup count unchanged."""
        raise _enosys()

    def readdirplus(self, ctx: Context, nodeid: int, fh: int, offset: int, sink: DirSink) -> None:
        """READDIRPLUS: like readdir with an Entry per name. Lookup count: +1 for every
        emitted entry with a non-zero nodeid (never for . and .., which carry nodeid 0)."""
        raise _enosys()

    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        """RELEASEDIR: fh is gone. Lookup count unchanged."""
        raise _enosys()

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        """FSYNCDIR. Lookup count unchanged."""
        raise _enosys()
