"""Host-visible locks for the guest: POSIX byte-range locks and BSD flock.

POSIX (fcntl) locks: a guest lock owner (the guest kernel's ``fl_owner``, hashed into
``lock_owner``) gets its own open file description per inode, opened from the inode's
O_PATH fd; its locks are OFD locks (``F_OFD_SETLK`` / ``F_OFD_GETLK``) on that
description, so they conflict with every other owner's, with other OFD locks and with
classic POSIX locks taken on the host.  This is how QEMU's C virtiofsd did it.  FLUSH
(each guest close()) drops the owner's description, which releases its locks: POSIX
says closing any descriptor of a file releases all the process's locks on it.

flock: ``flock(2)`` on the open file of the guest handle (FUSE_LK_FLOCK); released by
RELEASE with FUSE_RELEASE_FLOCK_UNLOCK (and by the handle's close in any case).

Waiting (SETLKW) never blocks in the kernel: it retries the non-blocking call with a
growing delay (1 ms .. 20 ms) while polling the request's ``Cancel`` token, so the
runtime can cancel a waiter (EINTR) and a waiter never holds a lock of ours.  The cost
is fairness: waiters are not queued in order.  OFD locks never report EDEADLK.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import threading
import time
from typing import Callable

from vhostfs.fs.api import Cancel, FileLock
from vhostfs.fs.passthrough.inodes import FdOwner

OFFSET_MAX = (1 << 63) - 1
#: struct flock on every 64-bit Linux ABI: short l_type, short l_whence, off_t l_start,
#: off_t l_len, pid_t l_pid (+ 4 bytes of padding).
_flock = struct.Struct("hhqqi4x")
_CONFLICT = (errno.EAGAIN, errno.EACCES)
_FIRST_DELAY, _MAX_DELAY = 0.001, 0.02


class OwnerFile(FdOwner):
    """One lock owner's open file description on one inode (closed with the object)."""

    __slots__ = ("pid",)

    def __init__(self, fd: int, pid: int) -> None:
        self.fd = fd
        self.pid = pid  # the guest pid that last locked through it (for GETLK)


def pack_flock(lock: FileLock) -> bytes:
    length = 0 if lock.end >= OFFSET_MAX else lock.end - lock.start + 1
    return _flock.pack(lock.type, os.SEEK_SET, lock.start, length, 0)


def unpack_flock(data: bytes, asked: FileLock) -> FileLock:
    typ, _whence, start, length, _pid = _flock.unpack(data)
    if typ == fcntl.F_UNLCK:
        return FileLock(asked.start, asked.end, fcntl.F_UNLCK, 0)
    end = OFFSET_MAX if length == 0 else start + length - 1
    return FileLock(start, end, typ, 0)


def wait_until(attempt: Callable[[], bool], cancel: Cancel | None) -> None:
    """Call ``attempt`` until it returns True; between tries sleep (1..20 ms, doubling)
    on the cancel token; EINTR once it is set."""
    delay = _FIRST_DELAY
    while not attempt():
        if cancel is None:
            time.sleep(delay)
        else:
            if cancel.is_set():
                raise OSError(errno.EINTR, "lock wait cancelled")
            # poll, not select: the token's fd may be >= FD_SETSIZE (a guest holding
            # 1024 inodes holds 1024 fds; select() then raises ValueError)
            waiter = select.poll()
            waiter.register(cancel.fileno(), select.POLLIN)
            waiter.poll(delay * 1000)
            if cancel.is_set():
                raise OSError(errno.EINTR, "lock wait cancelled")
        delay = min(delay * 2, _MAX_DELAY)


def _try(fn: Callable[[], object]) -> bool:
    try:
        fn()
    except OSError as e:
        if e.errno in _CONFLICT:
            return False
        raise
    return True


class PosixLocks:
    """The (inode, owner) -> OwnerFile table; an inode's owners live in ``inode.plocks``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @staticmethod
    def _open(inode, fallback_accmode: int) -> int:
        path = inode.proc_path
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY):
                raise
        return os.open(path, fallback_accmode | os.O_CLOEXEC | os.O_NOCTTY)

    def _owner(self, inode, owner: int) -> OwnerFile | None:
        with self._lock:
            return inode.plocks.get(owner) if inode.plocks else None

    def _owner_or_open(self, inode, owner: int, accmode: int, pid: int) -> OwnerFile:
        of = self._owner(inode, owner)
        if of is not None:
            of.pid = pid
            return of
        new = OwnerFile(self._open(inode, accmode), pid)
        with self._lock:
            if inode.plocks is None:
                inode.plocks = {}
            of = inode.plocks.setdefault(owner, new)
        of.pid = pid
        return of  # a racing twin is closed when ``new`` is dropped

    def getlk(self, inode, owner: int, lock: FileLock, handle_fd: int | None) -> FileLock:
        of = self._owner(inode, owner)
        tmp = None
        if of is not None:
            fd = of.fd
        elif handle_fd is not None:
            fd = handle_fd  # carries no OFD lock of ours: as good as a fresh description
        else:
            tmp = OwnerFile(self._open(inode, os.O_RDONLY), 0)
            fd = tmp.fd
        out = unpack_flock(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, pack_flock(lock)), lock)
        if out.type != fcntl.F_UNLCK:
            out.pid = self._holder_pid(inode, owner, lock)
        return out

    def _holder_pid(self, inode, asker: int, lock: FileLock) -> int:
        """The guest pid of the owner whose lock conflicts: an owner holds it when the same
        test through its own description (which ignores its own locks) finds no conflict.
        0 when the holder is not a guest owner (e.g. a host process)."""
        with self._lock:
            others = [(o, f) for o, f in (inode.plocks or {}).items() if o != asker][:64]
        for _o, of in others:
            res = fcntl.fcntl(of.fd, fcntl.F_OFD_GETLK, pack_flock(lock))
            if _flock.unpack(res)[0] == fcntl.F_UNLCK:
                return of.pid
        return 0

    def setlk(self, inode, owner: int, lock: FileLock, accmode: int, sleep: bool,
              cancel: Cancel | None) -> None:
        if lock.type == fcntl.F_UNLCK:
            of = self._owner(inode, owner)
            if of is not None:
                fcntl.fcntl(of.fd, fcntl.F_OFD_SETLK, pack_flock(lock))
            return
        arg = pack_flock(lock)
        while True:
            of = self._owner_or_open(inode, owner, accmode, lock.pid)
            attempt = lambda: _try(lambda: fcntl.fcntl(of.fd, fcntl.F_OFD_SETLK, arg))
            if sleep:
                wait_until(attempt, cancel)
            elif not attempt():
                raise OSError(errno.EAGAIN, "lock held by another owner")
            with self._lock:
                if inode.plocks is None:
                    inode.plocks = {}
                current = inode.plocks.setdefault(owner, of)
            if current is of:
                return
            # A FLUSH dropped the description while we waited and the owner has a new
            # one: move the lock there.
            fcntl.fcntl(of.fd, fcntl.F_OFD_SETLK, pack_flock(FileLock(0, OFFSET_MAX, fcntl.F_UNLCK, 0)))

    def release_owner(self, inode, owner: int) -> None:
        """FLUSH: release every lock ``owner`` holds on ``inode`` (close its description)."""
        with self._lock:
            of = inode.plocks.pop(owner, None) if inode.plocks else None
        if of is not None:
            try:
                fcntl.fcntl(of.fd, fcntl.F_OFD_SETLK,
                            pack_flock(FileLock(0, OFFSET_MAX, fcntl.F_UNLCK, 0)))
            finally:
                del of


def flock(fd: int, lock: FileLock, sleep: bool, cancel: Cancel | None) -> None:
    """BSD flock on a guest handle's open file; F_RDLCK/F_WRLCK/F_UNLCK -> SH/EX/UN."""
    if lock.type == fcntl.F_UNLCK:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
    op = (fcntl.LOCK_SH if lock.type == fcntl.F_RDLCK else fcntl.LOCK_EX) | fcntl.LOCK_NB
    attempt = lambda: _try(lambda: fcntl.flock(fd, op))
    if sleep:
        wait_until(attempt, cancel)
    elif not attempt():
        raise OSError(errno.EAGAIN, "flock held by another open file")
