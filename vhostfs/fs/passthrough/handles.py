"""Open file and directory handles: fh (monotonic, never reused) -> host state."""
from __future__ import annotations

import errno
import struct
import threading

from vhostfs import hostsys
from vhostfs.fs.passthrough.inodes import FdOwner, Inode

# struct linux_dirent64 {u64 d_ino; s64 d_off; u16 d_reclen; u8 d_type; char d_name[];}
_DIRENT64 = struct.Struct("=QqHB")
DIRENT64_UNPACK = _DIRENT64.unpack_from
DIRENT64_NAME = _DIRENT64.size


class FileHandle(FdOwner):
    __slots__ = ("inode", "flags")

    def __init__(self, fd: int, inode: Inode, flags: int) -> None:
        self.fd = fd
        self.inode = inode
        self.flags = flags


_scratch = threading.local()


def _getdents_buffer():
    """The calling thread's getdents64 buffer (one per worker thread, reused)."""
    try:
        return _scratch.buf, _scratch.cbuf
    except AttributeError:
        _scratch.buf, _scratch.cbuf = hostsys.dirent_buffer(DirHandle.BUF_SIZE)
        return _scratch.buf, _scratch.cbuf


class DirHandle(FdOwner):
    """A directory stream: an O_RDONLY|O_DIRECTORY fd read in place with getdents64.

    Entries are reported with the kernel's own d_off cookie, so READDIR at any offset
    the guest got from us resumes with ``lseek(fd, off)``.  Memory stays bounded: the
    records of the last getdents64 (at most ``BUF_SIZE`` bytes, read into the worker
    thread's buffer) are kept as ``data`` while a listing is in progress and dropped at
    its end; ``data[pos:]`` are the entries not yet emitted (those that did not fit in
    the last reply), and ``next_off`` the cookie the guest passes to get the first of
    them (None: unknown, seek).  ``lock`` serialises the stream: two READDIRs of one
    handle may run on two workers.
    """

    BUF_SIZE = 16 * 1024

    __slots__ = ("inode", "lock", "data", "pos", "next_off")

    def __init__(self, fd: int, inode: Inode) -> None:
        self.fd = fd
        self.inode = inode
        self.lock = threading.Lock()
        self.data = b""
        self.pos = 0
        self.next_off: int | None = 0  # a freshly opened directory fd is at its start

    def seek(self, off: int) -> None:
        """Make the entry after cookie ``off`` the next one (0: rewind, re-reading the
        directory).  Without a change of position the pending entries are kept."""
        if off == 0 or off != self.next_off:
            self.data, self.pos, self.next_off = b"", 0, None
            hostsys.dir_seek(self.fd, off)
            self.next_off = off

    def fill(self) -> bytes:
        """Read the next records (``data``, ``pos`` = 0); b"" at the end of the directory.
        On an error the handle is left as it was."""
        buf, cbuf = _getdents_buffer()
        n = hostsys.getdents64(self.fd, cbuf, self.BUF_SIZE)
        self.data = data = bytes(memoryview(buf)[:n]) if n else b""
        self.pos = 0
        return data


class HandleTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 1
        self._handles: dict[int, FileHandle | DirHandle] = {}

    def __len__(self) -> int:
        return len(self._handles)

    def add(self, handle: FileHandle | DirHandle) -> int:
        with self._lock:
            fh = self._next
            self._next += 1
            self._handles[fh] = handle
        return fh

    def file(self, fh: int, nodeid: int | None = None) -> FileHandle:
        h = self._handles.get(fh)
        if not isinstance(h, FileHandle) or (nodeid is not None and h.inode.nodeid != nodeid):
            raise OSError(errno.EBADF, f"unknown file handle {fh}")
        return h

    def dir(self, fh: int, nodeid: int | None = None) -> DirHandle:
        h = self._handles.get(fh)
        if not isinstance(h, DirHandle) or (nodeid is not None and h.inode.nodeid != nodeid):
            raise OSError(errno.EBADF, f"unknown directory handle {fh}")
        return h

    def remove(self, fh: int, kind: type) -> None:
        with self._lock:
            h = self._handles.get(fh)
            if not isinstance(h, kind):
                raise OSError(errno.EBADF, f"unknown handle {fh}")
            del self._handles[fh]

    def clear(self) -> None:
        with self._lock:
            self._handles = {}
