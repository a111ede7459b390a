"""FUSE handlers beyond the walking skeleton: locks, xattrs, FALLOCATE, LSEEK,
COPY_FILE_RANGE, SYNCFS, TMPFILE, IOCTL, POLL, BMAP, INTERRUPT.

A mixin of ``FuseServer`` (kept apart so that ``server.py`` stays the session and the
skeleton's dispatch).  Same rules as there: each handler validates its fixed struct and
names once, calls the filesystem, and returns the reply payload (bytes), ``None`` for
no reply, or raises ``OSError`` (turned into ``-errno`` by ``FuseServer.handle``).
"""
from __future__ import annotations

import errno
import fcntl

from vhostfs.fs.api import FileLock
from vhostfs.fuse import abi

OFFSET_MAX = (1 << 63) - 1
_LOCK_TYPES = (fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK)


def _einval(what: str) -> OSError:
    return OSError(errno.EINVAL, what)


def _unpack(body: bytes, st) -> tuple:
    if len(body) < st.size:
        raise _einval(f"truncated request: {len(body)} < {st.size}")
    return st.unpack_from(body)


def parse_file_lock(start: int, end: int, typ: int, pid: int) -> FileLock:
    """struct fuse_file_lock from the guest -> FileLock, validated (EINVAL)."""
    if typ not in _LOCK_TYPES:
        raise _einval(f"bad lock type {typ}")
    if start > OFFSET_MAX or end > OFFSET_MAX or end < start:
        raise _einval("bad lock range")
    return FileLock(start, end, typ, pid)


class ExtendedOps:
    """Handlers mixed into FuseServer; ``_register_extended`` fills the dispatch table."""

    #: Called with the ``unique`` of the request the guest wants interrupted (FUSE
    #: INTERRUPT).  The runtime sets it (it knows which worker serves that request and
    #: holds its Cancel token); None: interrupts are ignored, which FUSE allows.  Note:
    #: Linux's virtio-fs driver (6.1) does not send INTERRUPT at all.
    interrupt_hook = None

    def _register_extended(self, table: list) -> None:
        O = abi.Opcode
        for op, fn in (
            (O.GETLK, self._getlk), (O.SETLK, self._setlk), (O.SETLKW, self._setlkw),
            (O.INTERRUPT, self._interrupt),
        ):
            table[op] = fn

    # --- locks --------------------------------------------------------------------------
    def _lk(self, body: bytes):
        fh, owner, start, end, typ, pid, lk_flags, _ = _unpack(body, abi.fuse_lk_in)
        return fh, owner, parse_file_lock(start, end, typ, pid), lk_flags

    def _getlk(self, ctx, nodeid, body, reader, writer):
        fh, owner, lock, _flags = self._lk(body)
        if lock.type == fcntl.F_UNLCK:
            raise _einval("GETLK of F_UNLCK")
        out = self.fs.getlk(ctx, nodeid, fh, owner, lock)
        return abi.fuse_lk_out.pack(out.start, out.end, out.type, out.pid)

    def _setlk(self, ctx, nodeid, body, reader, writer, sleep: bool = False):
        fh, owner, lock, lk_flags = self._lk(body)
        self.fs.setlk(ctx, nodeid, fh, owner, lock, flock=bool(lk_flags & abi.FUSE_LK_FLOCK),
                      sleep=sleep)
        return b""

    def _setlkw(self, ctx, nodeid, body, reader, writer):
        return self._setlk(ctx, nodeid, body, reader, writer, sleep=True)

    # --- interrupt ------------------------------------------------------------------------
    def _interrupt(self, ctx, nodeid, body, reader, writer):
        (unique,) = _unpack(body, abi.fuse_interrupt_in)
        hook = self.interrupt_hook
        if hook is not None:
            hook(unique)
        return None  # INTERRUPT has no reply of its own; the interrupted request replies
