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
import struct

from vhostfs.fs.api import FileLock
from vhostfs.fuse import abi, replies

OFFSET_MAX = (1 << 63) - 1
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
SEEK_DATA, SEEK_HOLE = 3, 4
#: FALLOC_FL_KEEP_SIZE | PUNCH_HOLE | NO_HIDE_STALE | COLLAPSE_RANGE | ZERO_RANGE |
#: INSERT_RANGE | UNSHARE_RANGE: every mode Linux defines; the host FS decides.
FALLOC_MODES = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20 | 0x40
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
            (O.INTERRUPT, self._interrupt), (O.SETXATTR, self._setxattr),
            (O.GETXATTR, self._getxattr), (O.LISTXATTR, self._listxattr),
            (O.REMOVEXATTR, self._removexattr), (O.FALLOCATE, self._fallocate),
            (O.LSEEK, self._lseek), (O.COPY_FILE_RANGE, self._copy_file_range),
            (O.SYNCFS, self._syncfs), (O.TMPFILE, self._tmpfile), (O.IOCTL, self._ioctl),
            (O.POLL, self._poll), (O.BMAP, self._bmap), (O.STATX, self._statx),
        ):
            table[op] = fn
        # SETXATTR carries a value of up to XATTR_SIZE_MAX after the name.
        self.max_body = max(self.max_body, abi.fuse_setxattr_in.size + XATTR_NAME_MAX + 1
                             + XATTR_SIZE_MAX)

    # --- request extensions ------------------------------------------------------------
    @staticmethod
    def _extensions(body: bytes, extlen: int):
        """Split the extensions (``extlen`` 8-byte units at the end of the body) off ->
        (body, supplementary groups, security contexts).

        Each extension starts like fuse_ext_header {size, type}.  FUSE_EXT_GROUPS (32)
        carries fuse_supp_groups; types 0..FUSE_MAX_NR_SECCTX (31) are a
        fuse_secctx_header whose type field is nr_secctx, followed by nr_secctx records
        {fuse_secctx {size, padding}, name NUL, context[size]}, 8-byte aligned.  Other
        types are skipped (never negotiated)."""
        n = extlen * 8
        if n > len(body):
            raise _einval("extensions longer than the request")
        ext, body = body[len(body) - n:], body[:len(body) - n]
        groups: tuple[int, ...] = ()
        secctx: list[tuple[bytes, bytes]] = []
        pos = 0
        hdr = abi.fuse_ext_header.size
        while pos < n:
            size, typ = abi.fuse_ext_header.unpack_from(ext, pos)
            if size < hdr or size % 8 or pos + size > n:
                raise _einval("bad extension header")
            end = pos + size
            if typ == abi.FUSE_EXT_GROUPS:
                (nr,) = abi.fuse_supp_groups.unpack_from(ext, pos + hdr)
                if hdr + 4 + 4 * nr > size:
                    raise _einval("supplementary groups beyond their extension")
                groups = struct.unpack_from(f"<{nr}I", ext, pos + hdr + 4)
            elif typ <= abi.FUSE_MAX_NR_SECCTX:
                rec = pos + hdr
                for _ in range(typ):
                    if rec + abi.fuse_secctx.size > end:
                        raise _einval("security context beyond its extension")
                    ctxlen, _pad = abi.fuse_secctx.unpack_from(ext, rec)
                    nstart = rec + abi.fuse_secctx.size
                    nul = ext.find(b"\0", nstart, end)
                    if nul < 0 or nul - nstart > XATTR_NAME_MAX or nul == nstart:
                        raise _einval("bad security context name")
                    if nul + 1 + ctxlen > end or ctxlen > XATTR_SIZE_MAX:
                        raise _einval("security context beyond its extension")
                    secctx.append((ext[nstart:nul], ext[nul + 1:nul + 1 + ctxlen]))
                    rec += (abi.fuse_secctx.size + (nul + 1 - nstart) + ctxlen + 7) & ~7
            pos = end
        return body, groups, tuple(secctx)

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

    # --- extended attributes --------------------------------------------------------------
    @staticmethod
    def _xattr_name(body: bytes, start: int) -> tuple[bytes, int]:
        end = body.find(b"\0", start)
        if end < 0:
            raise _einval("xattr name not NUL-terminated")
        name = body[start:end]
        if not name:
            raise _einval("empty xattr name")
        if len(name) > XATTR_NAME_MAX:
            raise OSError(errno.ERANGE, "xattr name too long")
        return name, end + 1

    def _setxattr(self, ctx, nodeid, body, reader, writer):
        if self.flags & abi.FUSE_SETXATTR_EXT:
            size, flags, setxattr_flags, _ = _unpack(body, abi.fuse_setxattr_in)
            pos = abi.fuse_setxattr_in.size
        else:
            size, flags = _unpack(body, abi.fuse_setxattr_in_compat)
            setxattr_flags, pos = 0, abi.FUSE_COMPAT_SETXATTR_IN_SIZE
        if size > XATTR_SIZE_MAX:
            raise OSError(errno.E2BIG, "xattr value too large")
        name, pos = self._xattr_name(body, pos)
        value = body[pos:pos + size]
        if len(value) != size:
            raise _einval("xattr value shorter than its size")
        if flags & ~(0x1 | 0x2):  # XATTR_CREATE | XATTR_REPLACE
            raise _einval("unknown setxattr flags")
        self.fs.setxattr(ctx, nodeid, name, value, flags, setxattr_flags)
        return b""

    def _getxattr(self, ctx, nodeid, body, reader, writer):
        size, _ = _unpack(body, abi.fuse_getxattr_in)
        name, _ = self._xattr_name(body, abi.fuse_getxattr_in.size)
        out = self.fs.getxattr(ctx, nodeid, name, min(size, XATTR_SIZE_MAX))
        return self._sized(out, size)

    def _listxattr(self, ctx, nodeid, body, reader, writer):
        size, _ = _unpack(body, abi.fuse_getxattr_in)
        return self._sized(self.fs.listxattr(ctx, nodeid, min(size, XATTR_LIST_MAX)), size)

    @staticmethod
    def _sized(out, size: int) -> bytes:
        if size == 0:
            n = out if isinstance(out, int) else len(out)
            return abi.fuse_getxattr_out.pack(n, 0)
        if isinstance(out, int) or len(out) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return bytes(out)

    def _removexattr(self, ctx, nodeid, body, reader, writer):
        name, _ = self._xattr_name(body, 0)
        self.fs.removexattr(ctx, nodeid, name)
        return b""

    # --- data: fallocate, lseek, copy_file_range, syncfs ------------------------------------
    def _fallocate(self, ctx, nodeid, body, reader, writer):
        fh, offset, length, mode, _ = _unpack(body, abi.fuse_fallocate_in)
        if mode & ~FALLOC_MODES:
            raise OSError(errno.EOPNOTSUPP, "unknown fallocate mode")
        if offset > OFFSET_MAX or length == 0 or length > OFFSET_MAX or offset + length > OFFSET_MAX:
            raise _einval("bad fallocate range")
        self.fs.fallocate(ctx, nodeid, fh, offset, length, mode)
        return b""

    def _lseek(self, ctx, nodeid, body, reader, writer):
        fh, offset, whence, _ = _unpack(body, abi.fuse_lseek_in)
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise _einval("LSEEK serves SEEK_DATA and SEEK_HOLE only")
        if offset > OFFSET_MAX:
            raise OSError(errno.ENXIO, "offset beyond any file")
        return abi.fuse_lseek_out.pack(self.fs.lseek(ctx, nodeid, fh, offset, whence))

    def _copy_file_range(self, ctx, nodeid, body, reader, writer):
        fh_in, off_in, nodeid_out, fh_out, off_out, length, flags = _unpack(
            body, abi.fuse_copy_file_range_in)
        if flags:
            raise _einval("copy_file_range flags must be 0")
        if off_in > OFFSET_MAX or off_out > OFFSET_MAX:
            raise _einval("offset out of range")
        length = min(length, 1 << 30)  # a short copy is fine: the guest loops
        n = self.fs.copy_file_range(ctx, nodeid, fh_in, off_in, nodeid_out, fh_out, off_out,
                                    length, flags)
        return abi.fuse_write_out.pack(n, 0)

    def _syncfs(self, ctx, nodeid, body, reader, writer):
        _unpack(body, abi.fuse_syncfs_in)
        self.fs.syncfs(ctx, nodeid)
        return b""

    # --- TMPFILE: fuse_create_in + a name the kernel fills with "/" (ignored) --------------
    def _tmpfile(self, ctx, nodeid, body, reader, writer):
        flags, mode, umask, _ = _unpack(body, abi.fuse_create_in)
        ctx.umask = umask & 0o777
        entry, fh, open_flags = self.fs.tmpfile(ctx, nodeid, mode, flags)
        return replies.entry_out(entry) + replies.open_out(fh, open_flags)

    # --- STATX -------------------------------------------------------------------------
    def _statx(self, ctx, nodeid, body, reader, writer):
        getattr_flags, _, fh, sx_flags, sx_mask = _unpack(body, abi.fuse_statx_in)
        sx, timeout = self.fs.statx(ctx, nodeid, fh if getattr_flags & abi.FUSE_GETATTR_FH
                                    else None, sx_flags, sx_mask)
        return replies.statx_out(sx, timeout)

    # --- IOCTL, POLL, BMAP ----------------------------------------------------------------
    def _ioctl(self, ctx, nodeid, body, reader, writer):
        fh, flags, cmd, arg, in_size, out_size = _unpack(body, abi.fuse_ioctl_in)
        if flags & abi.FUSE_IOCTL_UNRESTRICTED:
            raise OSError(errno.ENOTTY, "unrestricted ioctls are CUSE-only")
        if flags & abi.FUSE_IOCTL_32BIT:
            raise OSError(errno.ENOTTY, "32-bit compat ioctls are not served")
        data = body[abi.fuse_ioctl_in.size:abi.fuse_ioctl_in.size + in_size]
        if len(data) != in_size:
            raise _einval("ioctl input shorter than in_size")
        if out_size > 4096:
            raise _einval("ioctl output too large")
        result, out = self.fs.ioctl(ctx, nodeid, fh, flags, cmd, arg, data, out_size)
        out = bytes(out[:out_size])
        return abi.fuse_ioctl_out.pack(result, 0, 0, 0) + out

    def _poll(self, ctx, nodeid, body, reader, writer):
        fh, kh, flags, events = _unpack(body, abi.fuse_poll_in)
        return abi.fuse_poll_out.pack(self.fs.poll(ctx, nodeid, fh, kh, flags, events) & 0xFFFF, 0)

    def _bmap(self, ctx, nodeid, body, reader, writer):
        block, blocksize, _ = _unpack(body, abi.fuse_bmap_in)
        return abi.fuse_bmap_out.pack(self.fs.bmap(ctx, nodeid, blocksize, block))

    # --- interrupt ------------------------------------------------------------------------
    def _interrupt(self, ctx, nodeid, body, reader, writer):
        (unique,) = _unpack(body, abi.fuse_interrupt_in)
        hook = self.interrupt_hook
        if hook is not None:
            hook(unique)
        return None  # INTERRUPT has no reply of its own; the interrupted request replies
