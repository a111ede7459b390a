"""``--inode-file-handles prefer|mandatory``: inodes remembered by file handle, so the
number of O_PATH fds the daemon keeps stays bounded however many inodes the guest holds.

Every inode gets a file handle (name_to_handle_at) when it is first looked up.  At
most ``max_open`` inodes keep their O_PATH fd open (least recently used first out);
the others are re-opened with open_by_handle_at (needs CAP_DAC_READ_SEARCH) by
``get()`` when a request needs them.  One O_RDONLY directory fd per host mount is kept
as the ``mount_fd`` of open_by_handle_at (it refuses O_PATH fds); until a directory of
a mount has been looked up, inodes of that mount keep their fds.

An fd is closed only when no request and no open guest handle can be using it: the
table's own references to the ``Inode`` are the only ones left (CPython's reference
count, checked under the table lock; ``get()`` takes the same lock, so a request that
fetches the inode afterwards sees it closed and re-opens it).  The root, inodes
without a handle (``prefer`` on a filesystem that has none) and inodes in use keep
their fds.

An inode whose file was deleted on the host while the guest only held a lookup
reference (no open file) cannot be re-opened: requests on it fail with ESTALE, as on
NFS.  An open guest file pins its inode's fd, so unlink-while-open is unaffected.
"""
from __future__ import annotations

import collections
import errno
import itertools
import os
import stat
import sys

from vhostfs import hostsys
from vhostfs.fs.passthrough import inodes
from vhostfs.fs.passthrough.inodes import Inode, InodeTable
from vhostfs.log import get_logger

log = get_logger(__name__)

_EMPTY = hostsys.AT_EMPTY_PATH
_EVICT_SCAN = 64


class FileHandleInodes(InodeTable):
    def __init__(self, root_fd: int, *, mandatory: bool, max_open: int = 1024) -> None:
        super().__init__(root_fd)
        if max_open < 1:
            raise ValueError("max_open must be >= 1")
        self.mandatory = mandatory
        self.max_open = max_open
        self._mounts: dict[int, int] = {}          # mnt_id -> O_PATH fd kept as mount_fd
        self._handles: dict[int, tuple[int, bytes, int]] = {}  # nodeid -> (type, handle, mnt)
        self._open: collections.OrderedDict[int, Inode] = collections.OrderedDict()
        self.reopens = 0
        self.evictions = 0
        # Fail early when the handles cannot be used at all (no CAP_DAC_READ_SEARCH, or
        # a shared directory on a filesystem without handles).
        htype, handle, mnt = hostsys.name_to_handle_at(root_fd, b"", _EMPTY)
        mfd = self._mount_fd(root_fd)
        try:
            os.close(hostsys.open_by_handle_at(mfd, htype, handle, os.O_PATH | os.O_CLOEXEC))
        except BaseException:
            os.close(mfd)
            raise
        self._mounts[mnt] = mfd
        self._root_handle = (htype, handle, mnt)
        #: None until the first eviction checks that handles can still be opened: the
        #: daemon may have dropped CAP_DAC_READ_SEARCH since (a sandbox that does not
        #: keep it); then no fd is ever evicted (correct, just not bounded).
        self.reopen_ok: bool | None = None

    @staticmethod
    def _mount_fd(dir_path_fd: int) -> int:
        """An O_RDONLY fd of the directory open at ``dir_path_fd`` (O_PATH)."""
        return os.open(f"{inodes.PROC_SELF_FD}/{dir_path_fd}",
                       os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def open_fds(self) -> int:
        """O_PATH fds held for non-root inodes (bounded by max_open plus pinned ones)."""
        with self._lock:
            return sum(1 for i in self._by_id.values() if i is not self.root and i.fd >= 0)

    def add_ref(self, fd: int, st: hostsys.Statx) -> Inode:
        try:
            htype, handle, mnt = hostsys.name_to_handle_at(fd, b"", _EMPTY)
        except OSError as e:
            if self.mandatory:
                os.close(fd)
                raise OSError(e.errno, f"no file handle for this inode "
                                       f"(--inode-file-handles=mandatory): {e.strerror}") from None
            handle = None
        inode = super().add_ref(fd, st)
        with self._lock:
            if handle is not None and inode is not self.root and inode.nodeid in self._by_id:
                if mnt not in self._mounts and inode.fd >= 0 and inode.ftype == stat.S_IFDIR:
                    try:
                        self._mounts[mnt] = self._mount_fd(inode.fd)
                    except OSError:
                        pass
                if mnt in self._mounts:
                    self._handles.setdefault(inode.nodeid, (htype, handle, mnt))
            if inode.nodeid in self._handles and inode.fd >= 0:
                self._open[inode.nodeid] = inode
                self._open.move_to_end(inode.nodeid)
                self._evict_locked()
        return inode

    def get(self, nodeid: int) -> Inode:
        with self._lock:
            inode = self._by_id.get(nodeid)
            if inode is None:
                raise OSError(errno.ENOENT, f"unknown nodeid {nodeid}")
            if inode.fd < 0:
                self._reopen_locked(inode)
            elif nodeid in self._open:
                self._open.move_to_end(nodeid)
        return inode

    def _reopen_locked(self, inode: Inode) -> None:
        htype, handle, mnt = self._handles[inode.nodeid]
        inode.fd = hostsys.open_by_handle_at(self._mounts[mnt], htype, handle,
                                             os.O_PATH | os.O_CLOEXEC)
        self.reopens += 1
        self._open[inode.nodeid] = inode
        self._evict_locked()

    def _can_reopen(self) -> bool:
        if self.reopen_ok is None:
            htype, handle, mnt = self._root_handle
            try:
                os.close(hostsys.open_by_handle_at(self._mounts[mnt], htype, handle,
                                                   os.O_PATH | os.O_CLOEXEC))
                self.reopen_ok = True
            except OSError as e:
                self.reopen_ok = False
                log.warning("open_by_handle_at refused; inode fds are kept open instead "
                            "(the daemon needs CAP_DAC_READ_SEARCH for --inode-file-handles)",
                            error=e.strerror)
        return self.reopen_ok

    def _evict_locked(self) -> None:
        if len(self._open) <= self.max_open or not self._can_reopen():
            return
        scanned = 0
        for nodeid in list(itertools.islice(self._open, _EVICT_SCAN)):
            if len(self._open) <= self.max_open or scanned >= _EVICT_SCAN:
                return
            scanned += 1
            inode = self._open[nodeid]
            # references: _by_id, _by_key (if it maps to this object), _open, the local
            # variable and getrefcount's argument.  Any other is a request or a handle.
            baseline = 4 + (self._by_key.get(inode.key) is inode)
            if sys.getrefcount(inode) > baseline:
                continue
            fd, inode.fd = inode.fd, -1
            del self._open[nodeid]
            os.close(fd)
            self.evictions += 1

    def forget(self, nodeid: int, nlookup: int) -> None:
        super().forget(nodeid, nlookup)
        with self._lock:
            if nodeid not in self._by_id:
                self._open.pop(nodeid, None)
                self._handles.pop(nodeid, None)

    def clear(self) -> None:
        super().clear()
        with self._lock:
            self._open.clear()
            self._handles.clear()
