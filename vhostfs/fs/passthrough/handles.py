"""Open file and directory handles: fh (monotonic, never reused) -> host state."""
from __future__ import annotations

import errno
import os
import threading

from vhostfs.fs.passthrough.inodes import Inode


class FileHandle:
    __slots__ = ("fd", "inode", "flags", "__weakref__")

    def __init__(self, fd: int, inode: Inode, flags: int) -> None:
        self.fd = fd
        self.inode = inode
        self.flags = flags

    def __del__(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class DirHandle:
    """A directory stream: an O_RDONLY|O_DIRECTORY fd and a listing snapshot.

    The snapshot is taken at offset 0 (opendir/rewinddir) and entry i is reported with
    d_off = i + 1, so READDIR at any offset the kernel got from us resumes exactly.
    """

    __slots__ = ("fd", "inode", "entries", "lock", "__weakref__")

    def __init__(self, fd: int, inode: Inode) -> None:
        self.fd = fd
        self.inode = inode
        self.entries: list[tuple[bytes, int, int]] | None = None  # (name, ino, d_type)
        self.lock = threading.Lock()

    def __del__(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


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
