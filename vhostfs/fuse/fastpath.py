"""The hot requests served straight from the chain's views, without Reader and Writer.

The general path (``FuseServer.handle``) builds a Reader and a Writer over the chain,
a Context, dispatches through the opcode table and moves bytes through the Reader's
and Writer's cursors: about 7 µs of Python around a 1 µs preadv for a 4 KiB READ
(docs/performance.md §3), more than the filesystem's own work for GETATTR.  Two lean
paths serve the common requests with the same checks and a fraction of the Python:

* ``serve_io``: READ and WRITE on an open file.  The request starts with
  ``fuse_in_header`` and the operation's arguments in the first device-readable buffer
  or in the first two (Linux puts the header in one buffer and the arguments in the
  next, fs/fuse/virtio_fs.c), and the reply header fits the first device-writable
  buffer.  READ: the request is exactly header + ``fuse_read_in``, and the data goes
  straight into the device-writable buffers after the out header with preadv.  WRITE:
  the request is exactly header + ``fuse_write_in`` + ``size`` bytes, which go straight
  from the device-readable buffers to the file with pwritev.
* ``serve_small``: the quick requests whose handler takes the request body as bytes and
  returns the reply body as bytes (``SMALL_OPS``: LOOKUP, GETATTR, OPEN, CREATE, UNLINK,
  RELEASE, STATFS...), with the header in the first device-readable buffer and the reply header in
  the first device-writable buffer.  Once the handler ran, the request is answered
  here, errors included, exactly as ``handle`` answers it (``replies.errno_of``).

Anything else returns None before the file is touched, and the request takes the
general path, which answers it: another opcode or layout, request extensions, a header
whose ``len`` disagrees with the chain, a session not initialised, a READ larger than
``max_read`` or a WRITE larger than ``max_write``, an offset past 2^63-1, a FIFO or
character device node (it may block: fuse/blocking.py).  For READ and WRITE so does an
error from the filesystem before any byte moved (EBADF for an unknown ``fh``, EIO...):
the general path repeats the operation and answers with the errno, so the guest sees
what the general path alone would have given it.  An error after some bytes moved
returns the count so far, as read(2)/write(2) and ``Writer.read_from_fd`` do: a WRITE
is never repeated once bytes reached the file (an O_APPEND file would get them twice).

Guest values are read once (architecture.md): the header and the arguments are
unpacked from guest memory into locals, the body is copied, and only those copies are
checked and used.  The reply header is written after the data, as on the general path.
"""
from __future__ import annotations

import errno
import os
from time import perf_counter_ns

from vhostfs.errors import VhostfsError
from vhostfs.fs.api import Context
from vhostfs.fuse import abi, blocking, replies
from vhostfs.log import get_logger

log = get_logger("vhostfs.fuse")

_in_header = abi.fuse_in_header
_read_in = abi.fuse_read_in
_write_in = abi.fuse_write_in
_out_header = abi.fuse_out_header
_write_out = abi.fuse_write_out
_HDR = _in_header.size
_OUT = _out_header.size
_READ = abi.Opcode.READ
_WRITE = abi.Opcode.WRITE
#: header + arguments; both argument structs have the same size (fuse.h 7.9+)
_ARGS_END = _HDR + _read_in.size
assert _write_in.size == _read_in.size
_MAX_OFFSET = 0x7FFF_FFFF_FFFF_FFFF

_O = abi.Opcode
#: Quick requests (fuse/blocking.py: neither BULK nor blocking, except OPEN/OPENDIR of a
#: FIFO or device, which the node-type check sends to the general path) whose handlers
#: use neither the Reader nor the Writer.
SMALL_OPS = frozenset((_O.LOOKUP, _O.GETATTR, _O.OPEN, _O.OPENDIR, _O.CREATE, _O.MKDIR,
                       _O.MKNOD, _O.SYMLINK, _O.LINK, _O.READLINK, _O.ACCESS, _O.STATFS,
                       _O.STATX, _O.GETXATTR, _O.LISTXATTR, _O.GETLK, _O.LSEEK, _O.FORGET,
                       _O.BATCH_FORGET, _O.UNLINK, _O.RMDIR, _O.RENAME, _O.RENAME2,
                       _O.FLUSH, _O.RELEASE, _O.RELEASEDIR))
_NO_REPLY = abi.NO_REPLY


def _iovecs(first: memoryview, rest, count: int, total: int) -> list:
    """Views covering the first ``count`` bytes of ``first`` followed by ``rest``
    (``total`` bytes together)."""
    if count >= total:          # all of them: the usual case, Linux sizes them to fit
        return [first, *rest] if len(first) else list(rest)
    iovs = [first[:count]] if len(first) else []
    need = count - len(first)
    for v in rest:
        if need <= 0:
            break
        if len(v) > need:
            v = v[:need]
        iovs.append(v)
        need -= len(v)
    return iovs


def _skip(iovs: list, n: int) -> list:
    """The iovecs after their first ``n`` bytes."""
    out = []
    for v in iovs:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


def _transfer(op, fd: int, iovs: list, count: int, offset: int) -> int:
    """preadv/pwritev, looping on short transfers; stops at EOF.  An error before any
    byte moved raises; after, the count so far is returned."""
    done = op(fd, iovs, offset)
    while 0 < done < count:
        try:
            n = op(fd, _skip(iovs, done), offset + done)
        except OSError:
            break
        if n <= 0:
            break
        done += n
    return done


class _Sink:
    """``ReadSink`` over the device-writable views after the out header (``total``
    bytes)."""

    __slots__ = ("first", "rest", "total")

    def __init__(self, first: memoryview, rest, total: int) -> None:
        self.first, self.rest, self.total = first, rest, total

    def read_from_fd(self, fd: int, count: int, offset: int) -> int:
        if count <= 0:
            return 0
        iovs = _iovecs(self.first, self.rest, count, self.total)
        return _transfer(os.preadv, fd, iovs, count, offset)


class _Source:
    """``WriteSource`` over the device-readable views after the WRITE arguments
    (exactly ``remaining`` bytes)."""

    __slots__ = ("first", "rest", "remaining")

    def __init__(self, first: memoryview, rest, remaining: int) -> None:
        self.first, self.rest, self.remaining = first, rest, remaining

    def write_to_fd(self, fd: int, count: int, offset: int) -> int:
        if count <= 0:
            return 0
        iovs = _iovecs(self.first, self.rest, count, self.remaining)
        return _transfer(os.pwritev, fd, iovs, count, offset)


class _SegSink:
    """``ReadSink`` over a SegmentChain's writable part from byte ``skip``: one C call
    over the walk's segments, no views (virtqueue/chain.py)."""

    __slots__ = ("io", "skip")

    def __init__(self, io, skip: int) -> None:
        self.io, self.skip = io, skip

    def read_from_fd(self, fd: int, count: int, offset: int) -> int:
        return self.io(fd, offset, True, self.skip, count) if count > 0 else 0


class _SegSource:
    """``WriteSource`` over a SegmentChain's readable part from byte ``skip``."""

    __slots__ = ("io", "skip", "remaining")

    def __init__(self, io, skip: int, remaining: int) -> None:
        self.io, self.skip, self.remaining = io, skip, remaining

    def write_to_fd(self, fd: int, count: int, offset: int) -> int:
        return self.io(fd, offset, False, self.skip, count) if count > 0 else 0


def serve(server, chain) -> int | None:
    """Serve ``chain`` if it is a request this module takes (see the module docstring);
    returns the bytes written into the device-writable buffers (0: no reply), or None
    (nothing answered, nothing done: use the general path)."""
    seg_io = getattr(chain, "segment_io", None)
    if seg_io is None:
        readable, writable = chain.readable, chain.writable
    else:           # a SegmentChain: only the views the headers need
        readable, writable = chain.head_views(2, 2)
    if not readable or len(readable[0]) < _HDR:
        return None
    hdr = _in_header.unpack_from(readable[0])
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _pad = hdr
    if length != chain.readable_len or extlen or not server.initialized:
        return None
    if opcode == _READ or opcode == _WRITE:
        return serve_io(server, chain, hdr, readable, writable, seg_io)
    if opcode in SMALL_OPS:
        return serve_small(server, chain, hdr)
    return None


def serve_io(server, chain, hdr: tuple, readable, writable, seg_io) -> int | None:
    """READ or WRITE (``hdr``: the header ``serve`` unpacked and checked; ``readable``
    and ``writable``: the chain's views, or with ``seg_io`` only its first ones)."""
    avail = chain.readable_len
    if avail < _ARGS_END or not writable or len(writable[0]) < _OUT:
        return None
    r0 = readable[0]
    if len(r0) >= _ARGS_END:                 # header and arguments in one buffer
        args_view, args_at, data_from = r0, _HDR, 0
    elif len(r0) == _HDR and len(readable) > 1 and len(readable[1]) >= _read_in.size:
        args_view, args_at, data_from = readable[1], 0, 1   # Linux: header, then arguments
    else:
        return None
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _pad = hdr
    if opcode == _READ:
        if avail != _ARGS_END:
            return None
        fh, offset, size, _rf, _lo, _fl, _p = _read_in.unpack_from(args_view, args_at)
        if size > server.max_read:
            return None
    elif opcode == _WRITE:
        fh, offset, size, write_flags, _lo, _fl, _p = _write_in.unpack_from(args_view, args_at)
        if size > server.max_write or avail != _ARGS_END + size:
            return None
    else:
        return None
    fs = server.fs
    if offset > _MAX_OFFSET or blocking.may_block(opcode, nodeid, getattr(fs, "node_type", None)):
        return None
    if opcode == _WRITE and sum(len(v) for v in writable) < _OUT + _write_out.size:
        return None     # (with seg_io only the first two views are here: Linux's [16][8])
    out = writable[0]
    t0 = perf_counter_ns()
    try:
        if opcode == _READ:
            room = chain.writable_len - _OUT
            sink = (_Sink(out[_OUT:], writable[1:], room) if seg_io is None
                    else _SegSink(seg_io, _OUT))
            n = fs.read(Context(uid, gid, pid), nodeid, fh, offset, min(size, room), sink)
            total = _OUT + n
        else:
            if seg_io is not None:
                source = _SegSource(seg_io, _ARGS_END, size)
            else:
                d = readable[data_from]     # the data follows the arguments
                first = d[_ARGS_END:] if data_from == 0 else d[_read_in.size:]
                source = _Source(first, readable[data_from + 1:], size)
            n = fs.write(Context(uid, gid, pid), nodeid, fh, offset, size, source, write_flags)
            total = _OUT + _write_out.size
            _scatter(writable, _OUT, _write_out.pack(n, 0))
    except OSError:
        return None
    _out_header.pack_into(out, 0, total, 0, unique)
    observer = server.observer
    if observer is not None:
        observer(opcode, unique, nodeid, 0, perf_counter_ns() - t0)
    return total


def _scatter(views, pos: int, data: bytes) -> None:
    """Copy ``data`` into the views from byte ``pos`` of their concatenation (the
    caller checked that they hold that many bytes)."""
    done = 0
    for v in views:
        if pos >= len(v):
            pos -= len(v)
            continue
        k = min(len(v) - pos, len(data) - done)
        v[pos:pos + k] = data[done:done + k]
        done += k
        pos = 0
        if done == len(data):
            return


def serve_small(server, chain, hdr: tuple) -> int | None:
    """A SMALL_OPS request (``hdr``: the header ``serve`` unpacked and checked)."""
    length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = hdr
    no_reply = opcode in _NO_REPLY
    writable = chain.writable
    if not no_reply and (not writable or len(writable[0]) < _OUT):
        return None
    if length - _HDR > server.max_body:
        return None
    if blocking.may_block(opcode, nodeid, getattr(server.fs, "node_type", None)):
        return None
    handler = server.handlers[opcode]
    if handler is None:             # not served by this server: ENOSYS from handle
        return None
    readable = chain.readable
    if len(readable) == 1:
        body = bytes(readable[0][_HDR:])
    elif len(readable) == 2 and len(readable[0]) == _HDR:
        body = bytes(readable[1])            # Linux: the arguments in a buffer of their own
    else:
        body = b"".join(bytes(v) for v in readable)[_HDR:]
    t0 = perf_counter_ns()
    err = errno.EIO
    try:
        try:
            result = handler(Context(uid, gid, pid), nodeid, body, None, None)
            err = 0
        except OSError as e:
            err = replies.errno_of(e)
            return 0 if no_reply else _reply_error(writable[0], unique, err)
        except VhostfsError:
            raise
        except Exception:
            log.exception("fuse request failed", opcode=opcode, unique=unique, nodeid=nodeid)
            return 0 if no_reply else _reply_error(writable[0], unique, errno.EIO)
        if result is None or no_reply:
            return 0
        total = _OUT + len(result)
        if total > chain.writable_len:
            log.warning("reply does not fit the guest buffer", opcode=opcode, size=total,
                        capacity=chain.writable_len)
            err = errno.EIO
            return _reply_error(writable[0], unique, errno.EIO)
        out = writable[0]
        if result:
            if len(out) >= total:
                out[_OUT:total] = result
            else:
                _scatter(writable, _OUT, result)
        _out_header.pack_into(out, 0, total, 0, unique)
        return total
    finally:
        observer = server.observer
        if observer is not None:
            observer(opcode, unique, nodeid, err, perf_counter_ns() - t0)


def _reply_error(out: memoryview, unique: int, err: int) -> int:
    _out_header.pack_into(out, 0, _OUT, -err, unique)
    return _OUT
