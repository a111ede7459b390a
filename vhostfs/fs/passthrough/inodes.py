"""The inode table: nodeid -> host inode held by an O_PATH | O_NOFOLLOW fd.

An inode is identified by (st_dev, st_ino, mnt_id).  Nodeids come from a monotonic
counter and are never reused, so a nodeid the guest still holds can never name another
file (nor change file type).  Lookup counts are exact; the fd is closed when the count
reaches 0 *and* no request in flight still uses the ``Inode`` object (the fd's lifetime
is the object's: a concurrent FORGET cannot make a running request use a recycled fd
number).  The root is never dropped.
"""
from __future__ import annotations

import errno
import os
import stat
import threading

from vhostfs import hostsys

_STATX_FLAGS = hostsys.AT_EMPTY_PATH | hostsys.AT_SYMLINK_NOFOLLOW
ROOT_ID = 1
#: Where this process's fds appear as magic links.  The sandbox (vhostfs/sandbox) sets it
#: to "." with /proc/self/fd as the working directory once the host's /proc is gone.
PROC_SELF_FD = "/proc/self/fd"
#: Default bound on the inodes the guest may hold at once (root included).  A guest
#: that never sends FORGET gets ENFILE for new inodes once it holds this many; the
#: daemon sets it from --max-inodes (docs/hostile-inputs.md: resource limits).
DEFAULT_MAX_INODES = 1 << 20


class FdOwner:
    """Owns one host fd (``-1`` once closed) and closes it exactly once, when the last
    reference goes: a request still using the object keeps the fd number valid, so a
    recycled number is never used by mistake."""

    __slots__ = ("fd", "__weakref__")

    def __del__(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class Inode(FdOwner):
    __slots__ = ("nodeid", "key", "ftype", "nlookup", "plocks")

    def __init__(self, nodeid: int, fd: int, key: tuple[int, int, int], ftype: int) -> None:
        self.nodeid = nodeid
        self.fd = fd          # O_PATH | O_NOFOLLOW, owned by this object
        self.key = key
        self.ftype = ftype    # stat.S_IFMT bits; fixed for the nodeid's life
        self.nlookup = 0
        self.plocks = None    # {lock owner: locks.OwnerFile}, created on the first lock

    @property
    def proc_path(self) -> str:
        """/proc/self/fd/N: re-opens the inode itself (the magic link never resolves by name)."""
        return f"{PROC_SELF_FD}/{self.fd}"



def stat_fd(fd: int) -> hostsys.Statx:
    return hostsys.statx(fd, b"", _STATX_FLAGS)


def key_of(st: hostsys.Statx) -> tuple[int, int, int]:
    return (st.dev, st.ino, st.mnt_id)


class InodeTable:
    def __init__(self, root_fd: int) -> None:
        st = stat_fd(root_fd)
        if not stat.S_ISDIR(st.mode):
            raise NotADirectoryError(errno.ENOTDIR, "shared directory is not a directory")
        self._lock = threading.Lock()
        self.max_inodes = DEFAULT_MAX_INODES
        self._next = ROOT_ID + 1
        self.root = Inode(ROOT_ID, root_fd, key_of(st), stat.S_IFDIR)
        self.root.nlookup = 1
        self._by_id: dict[int, Inode] = {ROOT_ID: self.root}
        self._by_key: dict[tuple[int, int, int], Inode] = {self.root.key: self.root}

    def reroot(self, root_fd: int) -> None:
        """Serve the directory open at ``root_fd`` (O_PATH, taken over) as the root.

        For the sandbox, before the guest sent anything: the same shared directory as
        seen from inside the new root, so no fd from outside it stays in use."""
        st = stat_fd(root_fd)
        if not stat.S_ISDIR(st.mode):
            os.close(root_fd)
            raise NotADirectoryError(errno.ENOTDIR, "new root is not a directory")
        with self._lock:
            if len(self._by_id) != 1:
                os.close(root_fd)
                raise RuntimeError("reroot with inodes in use")
            self.root = Inode(ROOT_ID, root_fd, key_of(st), stat.S_IFDIR)
            self.root.nlookup = 1
            self._by_id = {ROOT_ID: self.root}
            self._by_key = {self.root.key: self.root}

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, nodeid: int) -> Inode:
        try:
            return self._by_id[nodeid]
        except KeyError:
            raise OSError(errno.ENOENT, f"unknown nodeid {nodeid}") from None

    def find_id(self, nodeid: int) -> Inode | None:
        return self._by_id.get(nodeid)

    def find(self, key: tuple[int, int, int]) -> Inode | None:
        return self._by_key.get(key)

    def add_ref(self, fd: int, st: hostsys.Statx) -> Inode:
        """Account one lookup of the inode open at ``fd`` (an O_PATH fd this call takes
        over: it is closed if the inode is already known)."""
        key = key_of(st)
        ftype = stat.S_IFMT(st.mode)
        with self._lock:
            inode = self._by_key.get(key)
            if inode is not None and inode.ftype == ftype and inode.nlookup > 0:
                inode.nlookup += 1
                dup = True
            elif len(self._by_id) >= self.max_inodes:
                inode = None
            else:
                inode = Inode(self._next, fd, key, ftype)
                self._next += 1
                inode.nlookup = 1
                self._by_id[inode.nodeid] = inode
                self._by_key[key] = inode
                dup = False
        if inode is None:
            os.close(fd)
            raise OSError(errno.ENFILE, f"inode table full ({self.max_inodes} inodes held by "
                                        f"the guest; FORGET releases them)")
        if dup:
            os.close(fd)
        return inode

    def forget(self, nodeid: int, nlookup: int) -> None:
        if nodeid == ROOT_ID:
            return
        with self._lock:
            inode = self._by_id.get(nodeid)
            if inode is None:
                return
            inode.nlookup = max(inode.nlookup - nlookup, 0)
            if inode.nlookup:
                return
            del self._by_id[nodeid]
            if self._by_key.get(inode.key) is inode:
                del self._by_key[inode.key]
        # the fd closes when the last in-flight request drops the object

    def clear(self) -> None:
        """Drop every inode but the root (DESTROY)."""
        with self._lock:
            self._by_id = {ROOT_ID: self.root}
            self._by_key = {self.root.key: self.root}
