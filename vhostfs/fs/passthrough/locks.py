"""Host-visible locks for the guest: POSIX byte-range locks and BSD flock.

POSIX (fcntl) locks: a guest lock owner (the guest kernel's ``fl_owner``, hashed into
``lock_owner``) gets its own open file description per inode, opened from the inode's
O_PATH fd; its locks are OFD locks (``F_OFD_SETLK`` / ``F_OFD_GETLK``) on that
description, so they conflict with every other owner's, with other OFD locks and with
classic POSIX locks taken on the host.  This is how QEMU's C virtiofsd did it.  FLUSH
(each guest close()) drops the owner's description, which releases its locks: POSIX
says closing any descriptor of a file releases all the process's locks on it.

Beside the kernel's locks we keep a table of what we granted to guest owners: each
owner's held ranges (``OwnerFile.held``, kept exactly as the kernel keeps an OFD's
locks: split on change, merged when adjacent) and the queue of SETLKW waiters, in
arrival order.  The kernel stays the judge of conflicts (host processes take part);
the table gives the guest what OFD locks lack:

* EDEADLK (fcntl(2), POSIX: "If a deadlock is detected, EDEADLK"): when a SETLKW
  arrives and a guest owner holding a conflicting range is itself waiting, directly or
  through other waiters, for the caller's owner, the request fails with EDEADLK
  instead of waiting forever.  The wait-for graph has one node per guest lock owner
  (owner ids are the same on every inode of one mount, so cycles across files are
  found) and an edge from each waiter's owner to each guest owner holding a range
  that conflicts with its request.  Host processes are not in the graph: we cannot see
  what they wait for, so a wait on a host-held lock is never a detected deadlock (and
  never a false one).  Like Linux (posix_locks_deadlock), detection runs when a
  request is about to wait; a cycle closed later by a grant to an owner that has a
  second, already waiting thread is not found.  OFD locks taken by the guest reach us
  with the same kind of owner id (the open file), so they get detection too, which
  Linux does not do for its own OFD locks.
* Fair order: a waiter does not try the lock while an earlier waiter on the same inode
  whose request conflicts with its own (overlapping, one of them a write, another
  owner) is still queued, so conflicting waiters are granted in arrival order, while a
  waiter that conflicts with no earlier one proceeds on its own.  Yielding is skipped
  when the earlier waiter waits (directly or through others, counting queue order) for
  this waiter's owner: an upgrade of a lock the earlier waiter is blocked by must not
  queue behind it, or fairness itself would deadlock.  A non-blocking SETLK does not
  queue: it is granted whenever no conflicting lock is held, as on Linux.

Waiting never blocks in the kernel: a waiter retries the non-blocking call, sleeping
between tries on its own wake-up eventfd (written whenever the inode's table or queue
changes: a grant, an unlock, a FLUSH, a waiter arriving or leaving) and on the
request's ``Cancel`` token.  A waiter the kernel refused sleeps 1 ms .. 20 ms (doubling:
a host process's unlock is not signalled); a waiter yielding to an earlier one sleeps
until woken (re-checking every 0.2 s for changes on other inodes), so a long queue
costs no polling.  So the runtime can cancel a waiter (EINTR) and a waiter never holds
a lock of ours.  One
``threading.Lock`` guards the table and is held around each non-blocking
``F_OFD_SETLK`` so the table and the kernel agree; it is never held while sleeping.

flock: ``flock(2)`` on the open file of the guest handle (FUSE_LK_FLOCK); released by
RELEASE with FUSE_RELEASE_FLOCK_UNLOCK (and by the handle's close in any case).  Linux
has no deadlock detection for flock (flock(2) lists EWOULDBLOCK and EINTR, not
EDEADLK), so flock waiters just retry as above, in no particular order.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import threading
import time
from typing import Callable, Iterable

from vhostfs.fs.api import Cancel, FileLock
from vhostfs.fs.passthrough.inodes import FdOwner

OFFSET_MAX = (1 << 63) - 1
#: struct flock on every 64-bit Linux ABI: short l_type, short l_whence, off_t l_start,
#: off_t l_len, pid_t l_pid (+ 4 bytes of padding).
_flock = struct.Struct("hhqqi4x")
_CONFLICT = (errno.EAGAIN, errno.EACCES)
_FIRST_DELAY, _MAX_DELAY = 0.001, 0.02
#: A waiter yielding to an earlier one depends on guest state only, so it sleeps until
#: woken; it re-checks this often anyway, for changes on other inodes (which can make
#: the earlier waiter wait for it: then it must stop yielding).
_YIELD_RECHECK = 0.2

#: _attempt's outcomes
GRANTED, CONFLICT, YIELD = 0, 1, 2
#: A held range: (start, end, type, guest pid), end inclusive.
Range = tuple[int, int, int, int]


class OwnerFile(FdOwner):
    """One lock owner's open file description on one inode (closed with the object) and
    the ranges it holds there, as the kernel holds them."""

    __slots__ = ("pid", "held")

    def __init__(self, fd: int, pid: int) -> None:
        self.fd = fd
        self.pid = pid  # the guest pid that last locked through it
        self.held: list[Range] = []


def pack_flock(lock: FileLock) -> bytes:
    length = 0 if lock.end >= OFFSET_MAX else lock.end - lock.start + 1
    return _flock.pack(lock.type, os.SEEK_SET, lock.start, length, 0)


def unpack_flock(data: bytes, asked: FileLock) -> FileLock:
    typ, _whence, start, length, _pid = _flock.unpack(data)
    if typ == fcntl.F_UNLCK:
        return FileLock(asked.start, asked.end, fcntl.F_UNLCK, 0)
    end = OFFSET_MAX if length == 0 else start + length - 1
    return FileLock(start, end, typ, 0)


def conflicts(a_start: int, a_end: int, a_type: int, b_start: int, b_end: int,
              b_type: int) -> bool:
    """Two locks of different owners conflict when they overlap and one is a write lock."""
    return (a_start <= b_end and b_start <= a_end
            and fcntl.F_WRLCK in (a_type, b_type))


def apply_range(held: list[Range], lock: FileLock) -> list[Range]:
    """An owner's ranges after it sets ``lock`` (F_UNLCK too): POSIX replaces the owner's
    own locks on the bytes it names; like the kernel, adjacent same-type ranges merge."""
    out: list[Range] = []
    for s, e, t, p in held:
        if e < lock.start or s > lock.end:
            out.append((s, e, t, p))
            continue
        if s < lock.start:
            out.append((s, lock.start - 1, t, p))
        if e > lock.end:
            out.append((lock.end + 1, e, t, p))
    if lock.type != fcntl.F_UNLCK:
        out.append((lock.start, lock.end, lock.type, lock.pid))
    out.sort()
    merged: list[Range] = []
    for r in out:
        if merged and merged[-1][2] == r[2] and merged[-1][1] + 1 >= r[0]:
            s, e, t, p = merged[-1]
            merged[-1] = (s, max(e, r[1]), t, lock.pid if lock.type == t else p)
        else:
            merged.append(r)
    return merged


def _sleep(cancel: Cancel | None, wake_fd: int | None, delay: float) -> bool:
    """Sleep up to ``delay`` s on the cancel token and the wake-up fd; EINTR once the
    token is set.  True when woken by ``wake_fd`` (drained)."""
    if cancel is not None and cancel.is_set():
        raise OSError(errno.EINTR, "lock wait cancelled")
    if cancel is None and wake_fd is None:
        time.sleep(delay)
        return False
    # poll, not select: the fds may be >= FD_SETSIZE (a guest holding 1024 inodes holds
    # 1024 fds; select() then raises ValueError)
    waiter = select.poll()
    if cancel is not None:
        waiter.register(cancel.fileno(), select.POLLIN)
    if wake_fd is not None:
        waiter.register(wake_fd, select.POLLIN)
    ready = waiter.poll(delay * 1000)
    if cancel is not None and cancel.is_set():
        raise OSError(errno.EINTR, "lock wait cancelled")
    if wake_fd is not None and any(fd == wake_fd for fd, _ev in ready):
        try:
            os.eventfd_read(wake_fd)
        except BlockingIOError:
            pass
        return True
    return False


def wait_until(attempt: Callable[[], bool], cancel: Cancel | None) -> None:
    """Call ``attempt`` until it returns True; between tries sleep (1..20 ms, doubling)
    on the cancel token; EINTR once it is set."""
    delay = _FIRST_DELAY
    while not attempt():
        _sleep(cancel, None, delay)
        delay = min(delay * 2, _MAX_DELAY)


def _try(fn: Callable[[], object]) -> bool:
    try:
        fn()
    except OSError as e:
        if e.errno in _CONFLICT:
            return False
        raise
    return True


class _Waiter:
    """One queued SETLKW: its request and the eventfd that wakes it."""

    __slots__ = ("inode", "owner", "lock", "wake")

    def __init__(self, inode, owner: int, lock: FileLock) -> None:
        self.inode = inode
        self.owner = owner
        self.lock = lock
        self.wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def close(self) -> None:
        fd, self.wake = self.wake, -1
        if fd >= 0:
            os.close(fd)

    def conflicts_with(self, other: "_Waiter") -> bool:
        a, b = self.lock, other.lock
        return (self.inode is other.inode and self.owner != other.owner
                and conflicts(a.start, a.end, a.type, b.start, b.end, b.type))


class PosixLocks:
    """The (inode, owner) -> OwnerFile table (an inode's owners live in ``inode.plocks``)
    and the SETLKW queue; ``_lock`` guards both."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: list[_Waiter] = []   # arrival order, every inode
        self._version = 0                   # bumped by every change of table or queue
        self._reverse: tuple[int, dict[int, set[int]]] = (-1, {})

    # --- the table (all with self._lock held) ----------------------------------------
    @staticmethod
    def _holders(inode, owner: int, lock: FileLock) -> set[int]:
        """The guest owners other than ``owner`` holding a range that conflicts with
        ``lock`` on ``inode`` (host processes are not seen here)."""
        out = set()
        for o, of in (inode.plocks or {}).items():
            if o != owner and any(conflicts(s, e, t, lock.start, lock.end, lock.type)
                                  for s, e, t, _p in of.held):
                out.add(o)
        return out

    def _graph(self, queue_order: bool) -> dict[int, set[int]]:
        """owner -> owners it waits for: the holders blocking each of its waiters, and
        with ``queue_order`` also the earlier conflicting waiters it may yield to."""
        graph: dict[int, set[int]] = {}
        for i, w in enumerate(self._waiters):
            succ = graph.setdefault(w.owner, set())
            succ |= self._holders(w.inode, w.owner, w.lock)
            if queue_order:
                succ.update(e.owner for e in self._waiters[:i] if w.conflicts_with(e))
        return graph

    @staticmethod
    def _reaches(graph: dict[int, set[int]], start: Iterable[int], target: int) -> bool:
        seen: set[int] = set()
        todo = list(start)
        while todo:
            o = todo.pop()
            if o == target:
                return True
            if o not in seen:
                seen.add(o)
                todo.extend(graph.get(o, ()))
        return False

    def _waits_for(self, target: int) -> set[int]:
        """The owners that wait for ``target``, directly or through others, counting queue
        order (the reverse graph is built once per change of the table or queue)."""
        if self._reverse[0] != self._version:
            reverse: dict[int, set[int]] = {}
            for o, succ in self._graph(queue_order=True).items():
                for t in succ:
                    reverse.setdefault(t, set()).add(o)
            self._reverse = (self._version, reverse)
        reverse = self._reverse[1]
        seen: set[int] = set()
        todo = [target]
        while todo:
            for o in reverse.get(todo.pop(), ()):
                if o not in seen:
                    seen.add(o)
                    todo.append(o)
        return seen

    def _must_yield(self, w: _Waiter) -> bool:
        """Fair order: is there an earlier queued waiter whose request conflicts with
        ``w``'s and that does not itself wait (through anything) for ``w``'s owner?"""
        earlier = []
        for e in self._waiters:
            if e is w:
                break
            if w.conflicts_with(e):
                earlier.append(e)
        if not earlier:
            return False
        waiting_for_w = self._waits_for(w.owner)
        return any(e.owner not in waiting_for_w for e in earlier)

    def _changed(self, inode) -> None:
        """The table or the queue changed: wake the inode's waiters to try again."""
        self._version += 1
        for w in self._waiters:
            if w.inode is inode and w.wake >= 0:
                os.eventfd_write(w.wake, 1)

    # --- opening owner files ---------------------------------------------------------
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
            out.pid = self._holder_pid(inode, owner, lock, out)
        return out

    def _holder_pid(self, inode, asker: int, lock: FileLock, found: FileLock) -> int:
        """The guest pid of the owner holding the conflicting lock the kernel reported:
        the owner whose range is exactly it, else one whose conflicting range overlaps
        it; 0 when no guest owner holds it (e.g. a host process)."""
        fallback = 0
        with self._lock:
            for o, of in (inode.plocks or {}).items():
                if o == asker:
                    continue
                for s, e, t, p in of.held:
                    if (s, e, t) == (found.start, found.end, found.type):
                        return p
                    if (not fallback and t == found.type
                            and conflicts(s, e, t, lock.start, lock.end, lock.type)
                            and s <= found.end and found.start <= e):
                        fallback = p
        return fallback

    # --- setting ---------------------------------------------------------------------
    def _attempt(self, inode, owner: int, lock: FileLock, accmode: int,
                 waiter: _Waiter | None) -> int:
        """One non-blocking try, table and kernel together: GRANTED, CONFLICT, or
        YIELD while ``waiter`` must let an earlier one go first."""
        arg = pack_flock(lock)
        spare: OwnerFile | None = None
        while True:
            with self._lock:
                if waiter is not None and self._must_yield(waiter):
                    return YIELD
                of = inode.plocks.get(owner) if inode.plocks else None
                if of is None and spare is not None:
                    if inode.plocks is None:
                        inode.plocks = {}
                    of = inode.plocks[owner] = spare
                if of is not None:
                    if not _try(lambda: fcntl.fcntl(of.fd, fcntl.F_OFD_SETLK, arg)):
                        return CONFLICT
                    of.held = apply_range(of.held, lock)
                    of.pid = lock.pid
                    if waiter is not None:
                        self._waiters.remove(waiter)
                    self._changed(inode)
                    return GRANTED
            # first lock of this owner here: open outside the table lock, then retry
            # (a racing twin's file is dropped, and closed, with ``spare``)
            spare = OwnerFile(self._open(inode, accmode), lock.pid)

    def setlk(self, inode, owner: int, lock: FileLock, accmode: int, sleep: bool,
              cancel: Cancel | None) -> None:
        if lock.type == fcntl.F_UNLCK:
            with self._lock:
                of = inode.plocks.get(owner) if inode.plocks else None
                if of is not None:
                    fcntl.fcntl(of.fd, fcntl.F_OFD_SETLK, pack_flock(lock))
                    of.held = apply_range(of.held, lock)
                    self._changed(inode)
            return
        if not sleep:
            if self._attempt(inode, owner, lock, accmode, None) != GRANTED:
                raise OSError(errno.EAGAIN, "lock held by another owner")
            return
        with self._lock:
            holders = self._holders(inode, owner, lock)
            if holders and self._reaches(self._graph(queue_order=False), holders, owner):
                raise OSError(errno.EDEADLK, "waiting would deadlock")
            waiter = _Waiter(inode, owner, lock)
            self._waiters.append(waiter)
            self._changed(inode)
        try:
            delay = _FIRST_DELAY
            while (got := self._attempt(inode, owner, lock, accmode, waiter)) != GRANTED:
                if got == YIELD:       # only guest changes end it: they wake us
                    _sleep(cancel, waiter.wake, _YIELD_RECHECK)
                    delay = _FIRST_DELAY
                elif _sleep(cancel, waiter.wake, delay):
                    delay = _FIRST_DELAY
                else:                  # a host process may hold it: poll
                    delay = min(delay * 2, _MAX_DELAY)
        finally:
            with self._lock:
                if waiter in self._waiters:      # cancelled or failed: let the next go
                    self._waiters.remove(waiter)
                    self._changed(inode)
                waiter.close()

    def release_owner(self, inode, owner: int) -> None:
        """FLUSH: release every lock ``owner`` holds on ``inode`` (close its description)."""
        with self._lock:
            of = inode.plocks.pop(owner, None) if inode.plocks else None
            if of is None:
                return
            of.held = []
            try:
                fcntl.fcntl(of.fd, fcntl.F_OFD_SETLK,
                            pack_flock(FileLock(0, OFFSET_MAX, fcntl.F_UNLCK, 0)))
            finally:
                self._changed(inode)
        del of

    def queued(self, inode=None) -> list[tuple[int, FileLock]]:
        """The SETLKW waiters in arrival order, as (owner, lock) (for tests and logs)."""
        with self._lock:
            return [(w.owner, w.lock) for w in self._waiters
                    if inode is None or w.inode is inode]


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
