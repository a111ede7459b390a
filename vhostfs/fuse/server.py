"""FUSE request dispatch: one request in (Reader), at most one reply out (Writer).

The ONE place where ``OSError`` becomes ``-errno``.  Every guest byte is validated here,
once: the header length against the bytes the chain really holds, each fixed struct's
size, every name (NUL-terminated, non-empty, no '/'), every size against the negotiated
limits.  The body is copied out of guest memory once (except WRITE data, which goes
straight from guest memory to the host fd).  An unexpected exception is logged with its
traceback and answered with EIO; protocol-side errors (``vhostfs.errors``) propagate to
the transport.
"""
from __future__ import annotations

import errno
import threading
from time import perf_counter_ns
from typing import Callable

from vhostfs.errors import FuseProtocolError, VhostfsError
from vhostfs.fs.api import Context, FileSystem, SetAttr
from vhostfs.fuse import abi, blocking, fastpath, replies
from vhostfs.fuse.ops import ExtendedOps
from vhostfs.log import get_logger

log = get_logger(__name__)

_in_header = abi.fuse_in_header
_out_header = abi.fuse_out_header
_HDR = _in_header.size
_OUT = _out_header.size
NAME_MAX = 255
PATH_MAX = 4096

#: INIT flags we enable when the kernel offers them (EXPORT_SUPPORT is not implemented,
#: so not offered; locks, WRITEBACK_CACHE etc. come from FileSystem.init()).
WANTED_FLAGS = (
    abi.FUSE_ASYNC_READ | abi.FUSE_ATOMIC_O_TRUNC | abi.FUSE_BIG_WRITES | abi.FUSE_DONT_MASK
    | abi.FUSE_AUTO_INVAL_DATA | abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO
    | abi.FUSE_ASYNC_DIO | abi.FUSE_PARALLEL_DIROPS | abi.FUSE_MAX_PAGES | abi.FUSE_CACHE_SYMLINKS
    | abi.FUSE_INIT_EXT
)

_NO_REPLY = abi.NO_REPLY


def _einval(what: str) -> OSError:
    return OSError(errno.EINVAL, what)


def parse_name(body: bytes, start: int, *, limit: int = NAME_MAX) -> tuple[bytes, int]:
    """One NUL-terminated path component at ``start`` -> (name, offset after the NUL)."""
    end = body.find(b"\0", start)
    if end < 0:
        raise _einval("name not NUL-terminated")
    name = body[start:end]
    if not name:
        raise _einval("empty name")
    if b"/" in name:
        raise _einval("name contains '/'")
    if len(name) > limit:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    return name, end + 1


def _struct(body: bytes, st) -> tuple:
    if len(body) < st.size:
        raise _einval(f"truncated request: {len(body)} < {st.size}")
    return st.unpack_from(body)


class FuseServer(ExtendedOps):
    """Serves one FUSE session (one virtio-fs device) on top of a ``FileSystem``.

    ``handle`` is thread-safe as far as the server goes (INIT/DESTROY state is under a
    lock); the filesystem must be safe for concurrent calls.
    """

    def __init__(self, fs: FileSystem, *, max_write: int = 1 << 20, max_background: int = 64,
                 congestion_threshold: int = 48, time_gran: int = 1) -> None:
        if max_write < 4096 or max_write > (1 << 24):
            raise ValueError("max_write must be within 4 KiB..16 MiB")
        self.fs = fs
        self.max_write = max_write
        self.max_pages = min(max(max_write // 4096, 1), 0xFFFF)
        self.max_read = self.max_pages * 4096
        self.max_background = max_background
        self.congestion_threshold = congestion_threshold
        self.time_gran = time_gran
        self.initialized = False
        self.proto_minor = 0
        self.flags = 0          # negotiated FUSE_* flags (64-bit)
        self._lock = threading.Lock()
        # Called after every request as observer(opcode, unique, nodeid, errno, elapsed_ns)
        # (errno 0 = success); the daemon plugs vhostfs.metrics in here.
        self.observer: Callable[[int, int, int, int, int], None] | None = None
        # Largest non-WRITE body: two names (RENAME) or a name and a symlink target.
        self.max_body = 256 + NAME_MAX + PATH_MAX + 2
        table: list[Callable | None] = [None] * (abi.MAX_OPCODE + 1)
        O = abi.Opcode
        for op, fn in (
            (O.LOOKUP, self._lookup), (O.FORGET, self._forget), (O.GETATTR, self._getattr),
            (O.SETATTR, self._setattr), (O.READLINK, self._readlink), (O.SYMLINK, self._symlink),
            (O.MKNOD, self._mknod), (O.MKDIR, self._mkdir), (O.UNLINK, self._unlink),
            (O.RMDIR, self._rmdir), (O.RENAME, self._rename), (O.LINK, self._link),
            (O.OPEN, self._open), (O.READ, self._read), (O.WRITE, self._write),
            (O.STATFS, self._statfs), (O.RELEASE, self._release), (O.FSYNC, self._fsync),
            (O.FLUSH, self._flush), (O.INIT, self._init), (O.OPENDIR, self._opendir),
            (O.READDIR, self._readdir), (O.RELEASEDIR, self._releasedir),
            (O.FSYNCDIR, self._fsyncdir), (O.ACCESS, self._access), (O.CREATE, self._create),
            (O.DESTROY, self._destroy), (O.BATCH_FORGET, self._batch_forget),
            (O.READDIRPLUS, self._readdirplus), (O.RENAME2, self._rename2),
            (O.SETUPMAPPING, self._setupmapping), (O.REMOVEMAPPING, self._removemapping),
        ):
            table[op] = fn
        self._register_extended(table)
        self.handlers = table

    # --- entry point ---------------------------------------------------------------------
    def serve_fast(self, chain) -> int | None:
        """Serve the hot requests (READ and WRITE on an open file) straight from the
        chain's views: the bytes written, or None when ``chain`` is not such a request
        or failed before any byte moved (nothing answered: serve it with ``handle``).
        fuse/fastpath.py."""
        return fastpath.serve(self, chain)

    def may_block(self, reader) -> int | None:
        """How the runtime should serve the request in ``reader`` (fuse/blocking.py):

        * the ``unique`` a FUSE_INTERRUPT for it would name, if it may wait indefinitely
          (SETLKW, FIFO I/O, fsync): a dedicated thread with a cancel token;
        * ``blocking.BULK`` if it is bounded but its host work can be long (SETATTR,
          READDIRPLUS, FALLOCATE...): the worker pool;
        * None if it is quick: the runtime may serve it inline on its queue thread.

        Decodes the header once and keeps the copy in ``reader.decoded``; ``handle``
        serves the request from that same copy (the cursor does not move; the handler
        skips the header bytes).  A guest that rewrites its header after this
        call therefore cannot turn a request routed as prompt (inline, or onto a pool
        thread) into a SETLKW or fsync (architecture.md: guest values are read once)."""
        if reader.remaining < _HDR:
            return None
        hdr = reader.decoded = reader.peek(_in_header)
        node_type = getattr(self.fs, "node_type", None)
        if blocking.may_block(hdr[1], hdr[3], node_type):
            return hdr[2]
        return blocking.BULK if hdr[1] in blocking.BULK_OPS else None

    def handle(self, reader, writer, cancel=None) -> int:
        """Serve one request; returns the bytes written to ``writer`` (0: no reply).

        ``cancel``: the request's ``fs.api.Cancel`` token (a request that waits, SETLKW,
        fails with EINTR once it is set); None: the request cannot be cancelled.

        Raises ``FuseProtocolError`` when not even a FUSE header can be read or no reply
        header fits in the writable buffer; ``vhostfs.errors`` from the Reader/Writer
        propagate unchanged.
        """
        avail = reader.remaining
        if avail < _HDR:
            raise FuseProtocolError(f"request of {avail} bytes is shorter than fuse_in_header")
        hdr = getattr(reader, "decoded", None)
        if hdr is None:
            hdr = reader.unpack(_in_header)
        else:   # may_block's copy of this reader's header (read once, see may_block)
            reader.skip(_HDR)
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _pad = hdr
        t0 = perf_counter_ns()
        err = errno.EIO   # for the metrics: 0 once the handler returned, its errno if it raised
        try:
            no_reply = opcode in _NO_REPLY
            if not no_reply and writer.capacity < _OUT:
                raise FuseProtocolError(f"opcode {opcode}: reply buffer of {writer.capacity} bytes")
            try:
                if length != avail:
                    raise _einval(f"header len {length} != {avail} bytes available")
                if extlen and not self.flags & (abi.FUSE_CREATE_SUPP_GROUP | abi.FUSE_SECURITY_CTX):
                    raise _einval("request extensions were not negotiated")
                if not self.initialized:
                    if opcode != abi.Opcode.INIT:
                        raise OSError(errno.EIO, "request before INIT")
                elif opcode == abi.Opcode.INIT:
                    raise OSError(errno.EPROTO, "second INIT")
                handler = self.handlers[opcode] if opcode <= abi.MAX_OPCODE else None
                if handler is None:
                    raise OSError(errno.ENOSYS, "opcode not implemented")
                if opcode == abi.Opcode.WRITE:
                    body = reader.read(min(length - _HDR, abi.fuse_write_in.size))
                else:
                    if length - _HDR > self.max_body:
                        raise _einval("request body too large")
                    body = reader.read(length - _HDR)
                groups = secctx = ()
                if extlen:  # supplementary groups, security contexts: at the body's end
                    body, groups, secctx = self._extensions(body, extlen)
                result = handler(Context(uid, gid, pid, cancel=cancel, groups=groups,
                                         secctx=secctx), nodeid, body, reader, writer)
                err = 0
            except OSError as e:
                err = replies.errno_of(e)
                if no_reply:
                    return 0
                return self._reply_error(writer, unique, err)
            except VhostfsError:
                raise
            except Exception:
                log.exception("fuse request failed", opcode=opcode, unique=unique, nodeid=nodeid)
                if no_reply:
                    return 0
                return self._reply_error(writer, unique, errno.EIO)
            if result is None:
                return 0
            if isinstance(result, int):  # payload already in writer after a reserved header
                total = _OUT + result
                writer.write_at(0, _out_header.pack(total, 0, unique))
                return total
            total = _OUT + len(result)
            if total > writer.capacity:
                log.warning("reply does not fit the guest buffer", opcode=opcode, size=total,
                            capacity=writer.capacity)
                err = errno.EIO
                return self._reply_error(writer, unique, errno.EIO)
            writer.write(_out_header.pack(total, 0, unique))
            if result:
                writer.write(result)
            return total
        finally:
            # Metrics and per-request tracing (vhostfs/metrics.py); errno 0 = success.
            if self.observer is not None:
                self.observer(opcode, unique, nodeid, err, perf_counter_ns() - t0)

    @staticmethod
    def _reply_error(writer, unique: int, err: int) -> int:
        header = _out_header.pack(_OUT, -err, unique)
        if writer.written:
            writer.write_at(0, header)
        else:
            writer.write(header)
        return _OUT

    # --- session -----------------------------------------------------------------------
    def _init(self, ctx, nodeid, body, reader, writer):
        if len(body) < abi.FUSE_COMPAT_INIT_IN_SIZE:
            raise _einval("truncated fuse_init_in")
        padded = bytes(body[:abi.fuse_init_in.size]).ljust(abi.fuse_init_in.size, b"\0")
        major, minor, max_readahead, flags, flags2, *_ = abi.fuse_init_in.unpack(padded)
        if major < abi.KERNEL_VERSION:
            raise OSError(errno.EPROTO, f"unsupported FUSE major {major}")
        if major > abi.KERNEL_VERSION:
            # The kernel retries INIT with our major.
            return abi.fuse_init_out.pack(abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION,
                                          *([0] * 16))
        capable = flags
        if flags & abi.FUSE_INIT_EXT:
            capable |= flags2 << 32
        want = (WANTED_FLAGS | self.fs.init(capable)) & ~self.fs.init_disable()
        agreed = want & capable
        out_minor = min(minor, abi.KERNEL_MINOR_VERSION)
        out = abi.fuse_init_out.pack(
            abi.KERNEL_VERSION, out_minor, max_readahead, agreed & 0xFFFFFFFF,
            self.max_background, self.congestion_threshold, self.max_write, self.time_gran,
            self.max_pages if agreed & abi.FUSE_MAX_PAGES else 0,
            self.fs.map_alignment if agreed & abi.FUSE_MAP_ALIGNMENT else 0,
            (agreed >> 32) & 0xFFFFFFFF, *([0] * 7))
        with self._lock:
            self.proto_minor = out_minor
            self.flags = agreed
            self.initialized = True
        if out_minor < 5:
            return out[:abi.FUSE_COMPAT_INIT_OUT_SIZE]
        if out_minor < 23:
            return out[:abi.FUSE_COMPAT_22_INIT_OUT_SIZE]
        return out

    def _destroy(self, ctx, nodeid, body, reader, writer):
        self.fs.destroy()
        with self._lock:
            self.initialized = False
            self.flags = 0
        return b""

    # --- names and inodes ---------------------------------------------------------------
    def _lookup(self, ctx, nodeid, body, reader, writer):
        name, _ = parse_name(body, 0)
        return replies.entry_out(self.fs.lookup(ctx, nodeid, name))

    def _forget(self, ctx, nodeid, body, reader, writer):
        (nlookup,) = _struct(body, abi.fuse_forget_in)
        self.fs.forget(nodeid, nlookup)
        return None

    def _batch_forget(self, ctx, nodeid, body, reader, writer):
        count, _ = _struct(body, abi.fuse_batch_forget_in)
        one = abi.fuse_forget_one
        start = abi.fuse_batch_forget_in.size
        count = min(count, (len(body) - start) // one.size)
        self.fs.batch_forget([one.unpack_from(body, start + i * one.size) for i in range(count)])
        return None

    def _getattr(self, ctx, nodeid, body, reader, writer):
        fh = None
        if body:  # fuse_getattr_in since 7.9
            flags, _, fh_in = _struct(body, abi.fuse_getattr_in)
            if flags & abi.FUSE_GETATTR_FH:
                fh = fh_in
        attr, timeout = self.fs.getattr(ctx, nodeid, fh)
        return replies.attr_out(attr, timeout)

    def _setattr(self, ctx, nodeid, body, reader, writer):
        (valid, _, fh, size, _lo, atime, mtime, _ct, atimensec, mtimensec, _ctn, mode, _u4,
         uid, gid, _u5) = _struct(body, abi.fuse_setattr_in)
        if valid & (abi.FATTR_ATIME | abi.FATTR_MTIME) and (atimensec > 999_999_999
                                                           or mtimensec > 999_999_999):
            raise _einval("nanoseconds out of range")
        attr, timeout = self.fs.setattr(ctx, nodeid, SetAttr(valid, fh, size, atime, atimensec,
                                                             mtime, mtimensec, mode, uid, gid))
        return replies.attr_out(attr, timeout)

    def _readlink(self, ctx, nodeid, body, reader, writer):
        return self.fs.readlink(ctx, nodeid)

    def _symlink(self, ctx, nodeid, body, reader, writer):
        name, pos = parse_name(body, 0)
        end = body.find(b"\0", pos)
        if end < 0 or end == pos:
            raise _einval("symlink target empty or not NUL-terminated")
        if end - pos >= PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, "symlink target too long")
        return replies.entry_out(self.fs.symlink(ctx, nodeid, name, body[pos:end]))

    def _mknod(self, ctx, nodeid, body, reader, writer):
        mode, rdev, umask, _ = _struct(body, abi.fuse_mknod_in)
        name, _ = parse_name(body, abi.fuse_mknod_in.size)
        ctx.umask = umask & 0o777
        return replies.entry_out(self.fs.mknod(ctx, nodeid, name, mode, rdev))

    def _mkdir(self, ctx, nodeid, body, reader, writer):
        mode, umask = _struct(body, abi.fuse_mkdir_in)
        name, _ = parse_name(body, abi.fuse_mkdir_in.size)
        ctx.umask = umask & 0o777
        return replies.entry_out(self.fs.mkdir(ctx, nodeid, name, mode))

    def _unlink(self, ctx, nodeid, body, reader, writer):
        self.fs.unlink(ctx, nodeid, parse_name(body, 0)[0])
        return b""

    def _rmdir(self, ctx, nodeid, body, reader, writer):
        self.fs.rmdir(ctx, nodeid, parse_name(body, 0)[0])
        return b""

    def _rename(self, ctx, nodeid, body, reader, writer):
        (newdir,) = _struct(body, abi.fuse_rename_in)
        old, pos = parse_name(body, abi.fuse_rename_in.size)
        new, _ = parse_name(body, pos)
        self.fs.rename(ctx, nodeid, old, newdir, new, 0)
        return b""

    def _rename2(self, ctx, nodeid, body, reader, writer):
        newdir, flags, _ = _struct(body, abi.fuse_rename2_in)
        old, pos = parse_name(body, abi.fuse_rename2_in.size)
        new, _ = parse_name(body, pos)
        self.fs.rename(ctx, nodeid, old, newdir, new, flags)
        return b""

    def _link(self, ctx, nodeid, body, reader, writer):
        (oldnodeid,) = _struct(body, abi.fuse_link_in)
        name, _ = parse_name(body, abi.fuse_link_in.size)
        return replies.entry_out(self.fs.link(ctx, oldnodeid, nodeid, name))

    def _access(self, ctx, nodeid, body, reader, writer):
        mask, _ = _struct(body, abi.fuse_access_in)
        self.fs.access(ctx, nodeid, mask)
        return b""

    def _statfs(self, ctx, nodeid, body, reader, writer):
        return replies.statfs_out(self.fs.statfs(ctx, nodeid))

    # --- files ----------------------------------------------------------------------------
    def _open(self, ctx, nodeid, body, reader, writer):
        flags, open_in_flags = _struct(body, abi.fuse_open_in)
        ctx.kill_suidgid = bool(open_in_flags & abi.FUSE_OPEN_KILL_SUIDGID)
        fh, open_flags = self.fs.open(ctx, nodeid, flags)
        return replies.open_out(fh, open_flags)

    def _create(self, ctx, nodeid, body, reader, writer):
        flags, mode, umask, open_in_flags = _struct(body, abi.fuse_create_in)
        name, _ = parse_name(body, abi.fuse_create_in.size)
        ctx.kill_suidgid = bool(open_in_flags & abi.FUSE_OPEN_KILL_SUIDGID)
        ctx.umask = umask & 0o777
        entry, fh, open_flags = self.fs.create(ctx, nodeid, name, mode, flags)
        return replies.entry_out(entry) + replies.open_out(fh, open_flags)

    def _read(self, ctx, nodeid, body, reader, writer):
        fh, offset, size, _rf, _lo, _fl, _ = _struct(body, abi.fuse_read_in)
        if size > self.max_read:
            raise _einval(f"read of {size} bytes exceeds {self.max_read}")
        if offset > 0x7FFF_FFFF_FFFF_FFFF:
            raise _einval("offset out of range")
        size = min(size, writer.capacity - _OUT)
        writer.write(bytes(_OUT))  # header placeholder; the data goes straight after it
        return self.fs.read(ctx, nodeid, fh, offset, size, writer)

    def _write(self, ctx, nodeid, body, reader, writer):
        fh, offset, size, write_flags, _lo, _fl, _ = _struct(body, abi.fuse_write_in)
        if size > self.max_write:
            raise _einval(f"write of {size} bytes exceeds max_write {self.max_write}")
        if size > reader.remaining:
            raise _einval(f"write of {size} bytes but {reader.remaining} in the request")
        if offset > 0x7FFF_FFFF_FFFF_FFFF:
            raise _einval("offset out of range")
        n = self.fs.write(ctx, nodeid, fh, offset, size, reader, write_flags)
        return replies.write_out(n)

    def _flush(self, ctx, nodeid, body, reader, writer):
        fh, _, _, lock_owner = _struct(body, abi.fuse_flush_in)
        self.fs.flush(ctx, nodeid, fh, lock_owner)
        return b""

    def _release(self, ctx, nodeid, body, reader, writer):
        fh, flags, release_flags, lock_owner = _struct(body, abi.fuse_release_in)
        self.fs.release(ctx, nodeid, fh, flags, release_flags, lock_owner)
        return b""

    def _fsync(self, ctx, nodeid, body, reader, writer):
        fh, fsync_flags, _ = _struct(body, abi.fuse_fsync_in)
        self.fs.fsync(ctx, nodeid, fh, bool(fsync_flags & abi.FUSE_FSYNC_FDATASYNC))
        return b""

    # --- DAX window (fuse.h 7.31; docs/dax.md) ---------------------------------------------
    def _setupmapping(self, ctx, nodeid, body, reader, writer):
        fh, foffset, length, flags, moffset = _struct(body, abi.fuse_setupmapping_in)
        self.fs.setupmapping(ctx, nodeid, fh, foffset, length, flags, moffset)
        return b""

    def _removemapping(self, ctx, nodeid, body, reader, writer):
        (count,) = _struct(body, abi.fuse_removemapping_in)
        one = abi.fuse_removemapping_one
        start = abi.fuse_removemapping_in.size
        if count == 0 or count > abi.FUSE_REMOVEMAPPING_MAX_ENTRY:
            raise _einval(f"REMOVEMAPPING count {count} not in 1..{abi.FUSE_REMOVEMAPPING_MAX_ENTRY}")
        if len(body) != start + count * one.size:
            raise _einval(f"REMOVEMAPPING of {count} entries in a {len(body)}-byte body")
        self.fs.removemapping(ctx, [one.unpack_from(body, start + i * one.size) for i in range(count)])
        return b""

    # --- directories ----------------------------------------------------------------------
    def _opendir(self, ctx, nodeid, body, reader, writer):
        flags, _ = _struct(body, abi.fuse_open_in)
        fh, open_flags = self.fs.opendir(ctx, nodeid, flags)
        return replies.open_out(fh, open_flags)

    def _dir(self, ctx, nodeid, body, writer, plus: bool):
        fh, offset, size, _rf, _lo, _fl, _ = _struct(body, abi.fuse_read_in)
        if size > self.max_read:
            raise _einval(f"readdir of {size} bytes exceeds {self.max_read}")
        buf = replies.DirBuffer(min(size, writer.capacity - _OUT), plus)
        if plus:
            self.fs.readdirplus(ctx, nodeid, fh, offset, buf)
        else:
            self.fs.readdir(ctx, nodeid, fh, offset, buf)
        return bytes(buf.data)

    def _readdir(self, ctx, nodeid, body, reader, writer):
        return self._dir(ctx, nodeid, body, writer, False)

    def _readdirplus(self, ctx, nodeid, body, reader, writer):
        return self._dir(ctx, nodeid, body, writer, True)

    def _releasedir(self, ctx, nodeid, body, reader, writer):
        fh, _, _, _ = _struct(body, abi.fuse_release_in)
        self.fs.releasedir(ctx, nodeid, fh)
        return b""

    def _fsyncdir(self, ctx, nodeid, body, reader, writer):
        fh, fsync_flags, _ = _struct(body, abi.fuse_fsync_in)
        self.fs.fsyncdir(ctx, nodeid, fh, bool(fsync_flags & abi.FUSE_FSYNC_FDATASYNC))
        return b""
