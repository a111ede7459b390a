"""PassthroughFs operations beyond the walking skeleton: extended attributes (with
--xattrmap and POSIX ACLs), FALLOCATE, LSEEK, COPY_FILE_RANGE, SYNCFS, TMPFILE, IOCTL
(a safe subset), POLL and BMAP.

A mixin of ``PassthroughFs`` (it uses its inode/handle tables and helpers); the same
rules hold: no host path is built from a guest name, special files are never opened.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import stat
import struct

from vhostfs import hostsys
from vhostfs.fs.api import Context, Entry, StatxAttr
from vhostfs.fs.passthrough import xattr as xattrs
from vhostfs.fs.passthrough.handles import FileHandle
from vhostfs.fs.passthrough.inodes import stat_fd

# <linux/fs.h>: the flag ioctls.  The kernel's FUSE client sends FS_IOC_GETFLAGS /
# SETFLAGS (encoded with a long, carrying an int: 4 bytes) for lsattr/chattr.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IOC32_GETFLAGS = 0x80046601
FS_IOC32_SETFLAGS = 0x40046602
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
#: struct fsxattr: fsx_xflags, fsx_extsize, fsx_nextents, fsx_projid, fsx_cowextsize
#: (u32 each) and 8 bytes of padding.
FSXATTR_SIZE = 28
_fsxattr = struct.Struct("<5I8x")
#: FS_XFLAG_* a guest may change through FS_IOC_FSSETXATTR: immutable, append, sync,
#: noatime, nodump -- the FS_*_FL of SAFE_FLAGS that have an xflag twin.  The project
#: id, PROJINHERIT and the extent size hints stay the host's: a project id is a host
#: quota account, and a guest must not move its files out of it.
SAFE_XFLAGS = 0x8 | 0x10 | 0x20 | 0x40 | 0x80
#: The attribute flags a guest may change: sync, immutable, append-only, nodump,
#: noatime, dirsync, nocow (the guest kernel already checked CAP_LINUX_IMMUTABLE for
#: immutable/append).  Anything else (encryption, verity, casefold, inline data...) is
#: the host's business: a change of those bits is refused with EOPNOTSUPP.
_STATX_NOFOLLOW = hostsys.AT_EMPTY_PATH | hostsys.AT_SYMLINK_NOFOLLOW
#: AT_STATX_FORCE_SYNC | AT_STATX_DONT_SYNC (<fcntl.h>)
AT_STATX_SYNC_TYPE = 0x6000
SAFE_FLAGS = 0x8 | 0x10 | 0x20 | 0x40 | 0x80 | 0x10000 | 0x800000
_int = struct.Struct("<i")


class ExtrasMixin:
    # --- extended attributes -------------------------------------------------------------
    def _xattr_enabled(self) -> None:
        if not self.xattr:
            # ENOSYS: the guest then stops sending xattr requests (fc->no_xattr).
            raise OSError(errno.ENOSYS, "xattrs disabled (--xattr)")

    def _host_xattr_name(self, name: bytes) -> bytes:
        xattrs.check_name(name)
        host = self.xattrmap.to_host(name) if self.xattrmap is not None else name
        if not self.posix_acl and host in (xattrs.ACL_ACCESS, xattrs.ACL_DEFAULT):
            raise OSError(errno.EOPNOTSUPP, "POSIX ACLs disabled (--posix-acl)")
        return host

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int,
                 setxattr_flags: int) -> None:
        self._xattr_enabled()
        self._writable()
        inode = self.inodes.get(nodeid)
        host = self._host_xattr_name(name)
        self._as_caller_do(ctx, lambda: os.setxattr(inode.proc_path, host, value, flags),
                           self._gids(inode), errnos=(errno.EACCES, errno.EPERM))
        if host == xattrs.ACL_ACCESS and setxattr_flags & 1:  # FUSE_SETXATTR_ACL_KILL_SGID
            mode = stat_fd(inode.fd).mode
            if mode & stat.S_ISGID and inode.ftype != stat.S_IFLNK:
                os.chmod(inode.proc_path, mode & 0o7777 & ~stat.S_ISGID)

    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        self._xattr_enabled()
        inode = self.inodes.get(nodeid)
        try:
            host = self._host_xattr_name(name)
        except OSError as e:
            if e.errno == errno.EPERM:  # a "bad" name reads as absent (virtiofsd too)
                raise OSError(errno.ENODATA, "no such attribute") from None
            raise
        value = self._as_caller_do(ctx, lambda: os.getxattr(inode.proc_path, host),
                                   self._gids(inode))
        return len(value) if size == 0 else value

    def listxattr(self, ctx: Context, nodeid: int, size: int) -> bytes | int:
        self._xattr_enabled()
        inode = self.inodes.get(nodeid)
        names = [os.fsencode(n) for n in self._as_caller_do(
            ctx, lambda: os.listxattr(inode.proc_path), self._gids(inode))]
        if self.xattrmap is not None:
            names = [g for g in (self.xattrmap.to_guest(n) for n in names) if g]
        if not self.posix_acl:
            names = [n for n in names if n not in (xattrs.ACL_ACCESS, xattrs.ACL_DEFAULT)]
        out = xattrs.join_names(names)
        return len(out) if size == 0 else out

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        self._xattr_enabled()
        self._writable()
        inode = self.inodes.get(nodeid)
        host = self._host_xattr_name(name)
        self._as_caller_do(ctx, lambda: os.removexattr(inode.proc_path, host),
                           self._gids(inode), errnos=(errno.EACCES, errno.EPERM))

    # --- data -----------------------------------------------------------------------------
    def _file_for(self, fh: int, nodeid: int) -> FileHandle:
        return self.handles.file(fh, nodeid)

    def fallocate(self, ctx: Context, nodeid: int, fh: int, offset: int, length: int,
                  mode: int) -> None:
        self._writable()
        hostsys.fallocate(self._file_for(fh, nodeid).fd, mode, offset, length)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        # The handle's file position is never used for I/O (pread/pwrite), so moving it
        # here is harmless.
        return os.lseek(self._file_for(fh, nodeid).fd, offset, whence)

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int,
                        nodeid_out: int, fh_out: int, off_out: int, length: int,
                        flags: int) -> int:
        self._writable()
        src = self._file_for(fh_in, nodeid_in)
        dst = self._file_for(fh_out, nodeid_out)
        return os.copy_file_range(src.fd, dst.fd, length, off_in, off_out)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        inode = self._dir(nodeid) if nodeid != 1 else self.inodes.root
        # syncfs() refuses O_PATH fds: open the directory for reading.
        fd = os.open(inode.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            hostsys.syncfs(fd)
        finally:
            os.close(fd)

    def tmpfile(self, ctx: Context, parent: int, mode: int, flags: int
                ) -> tuple[Entry, int, int]:
        p = self._dir(parent)
        self._writable()
        if flags & os.O_ACCMODE not in (os.O_WRONLY, os.O_RDWR):
            raise OSError(errno.EINVAL, "O_TMPFILE needs O_WRONLY or O_RDWR")
        host_flags = self._open_flags(flags) | os.O_TMPFILE | (flags & os.O_EXCL)
        perm = mode & 0o7777 & ~self._umask_for(ctx, p)
        fd = self._create_as_caller(ctx, p, lambda: os.open(".", host_flags, perm, dir_fd=p.fd))
        try:
            self._label(ctx, fd)
            if perm & self._proc_umask:
                os.fchmod(fd, perm)
        except BaseException:
            os.close(fd)
            raise
        return self._adopt_new_file(fd, flags & ~os.O_EXCL, flags)

    # --- statx ---------------------------------------------------------------------------
    def statx(self, ctx: Context, nodeid: int, fh: int | None, sx_flags: int, sx_mask: int
              ) -> tuple[StatxAttr, float]:
        """FUSE_STATX: GETATTR plus the birth time and the STATX_ATTR_* flags.  Of the
        guest's statx flags only the sync type (AT_STATX_FORCE_SYNC / DONT_SYNC) means
        anything to a statx on our own fd; the guest gets every basic field and btime
        whatever it asked for (the kernel caches the lot)."""
        inode = self.inodes.get(nodeid)
        st = hostsys.statx(inode.fd, b"", _STATX_NOFOLLOW | (sx_flags & AT_STATX_SYNC_TYPE),
                           hostsys.STATX_BASIC_STATS | hostsys.STATX_BTIME | hostsys.STATX_MNT_ID)
        mask = st.mask & (hostsys.STATX_BASIC_STATS | hostsys.STATX_BTIME)
        return StatxAttr(self._attr(st), mask, st.btime, min(st.btime_nsec, 999_999_999),
                         st.attributes, st.attributes_mask), self.timeout

    # --- ioctl, poll, bmap ---------------------------------------------------------------------
    def _any_handle_fd(self, fh: int, nodeid: int, is_dir: bool) -> int:
        if is_dir:
            return self.handles.dir(fh, nodeid).fd
        return self.handles.file(fh, nodeid).fd

    def ioctl(self, ctx: Context, nodeid: int, fh: int, flags: int, cmd: int, arg: int,
              data: bytes, out_size: int) -> tuple[int, bytes]:
        is_dir = bool(flags & 0x10)  # FUSE_IOCTL_DIR
        if cmd in (FS_IOC_GETFLAGS, FS_IOC32_GETFLAGS):
            if out_size < 4:
                raise OSError(errno.EINVAL, "GETFLAGS needs 4 bytes")
            fd = self._any_handle_fd(fh, nodeid, is_dir)
            buf = bytearray(8)
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
            return 0, bytes(buf[:4])
        if cmd in (FS_IOC_SETFLAGS, FS_IOC32_SETFLAGS):
            if len(data) < 4:
                raise OSError(errno.EINVAL, "SETFLAGS needs 4 bytes")
            self._writable()
            fd = self._any_handle_fd(fh, nodeid, is_dir)
            (want,) = _int.unpack_from(data)
            cur = bytearray(8)
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, cur)
            (have,) = _int.unpack_from(cur)
            if (want ^ have) & ~SAFE_FLAGS:
                raise OSError(errno.EOPNOTSUPP, "only sync/immutable/append/nodump/noatime/"
                                                "dirsync/nocow flags can be changed")
            # On an open fd, the host checks ownership with the caller's credentials
            # (fileattr_set: inode_owner_or_capable).
            self._as_caller_do(ctx, lambda: fcntl.ioctl(
                fd, FS_IOC_SETFLAGS, bytearray(_int.pack(want) + bytes(4))), tuple,
                errnos=())
            return 0, b""
        if cmd == FS_IOC_FSGETXATTR:
            if out_size < FSXATTR_SIZE:
                raise OSError(errno.EINVAL, "FSGETXATTR needs struct fsxattr")
            fd = self._any_handle_fd(fh, nodeid, is_dir)
            buf = bytearray(FSXATTR_SIZE)
            fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
            return 0, bytes(buf)
        if cmd == FS_IOC_FSSETXATTR:
            if len(data) < FSXATTR_SIZE:
                raise OSError(errno.EINVAL, "FSSETXATTR needs struct fsxattr")
            self._writable()
            fd = self._any_handle_fd(fh, nodeid, is_dir)
            cur = bytearray(FSXATTR_SIZE)
            fcntl.ioctl(fd, FS_IOC_FSGETXATTR, cur)
            have, want = _fsxattr.unpack_from(cur), _fsxattr.unpack_from(data)
            if (want[0] ^ have[0]) & ~SAFE_XFLAGS:
                raise OSError(errno.EOPNOTSUPP, "only immutable/append/sync/noatime/nodump "
                                                "xflags can be changed")
            if (want[1], want[3], want[4]) != (have[1], have[3], have[4]):
                raise OSError(errno.EOPNOTSUPP, "extent size hints and project ids stay "
                                                "the host's")
            # Everything but the safe xflags is written back as the host has it.
            new = bytearray(_fsxattr.pack(want[0], *have[1:]))
            self._as_caller_do(ctx, lambda: fcntl.ioctl(fd, FS_IOC_FSSETXATTR, new), tuple,
                               errnos=())
            return 0, b""
        raise OSError(errno.ENOTTY, f"ioctl {cmd:#x} is not served")

    def poll(self, ctx: Context, nodeid: int, fh: int, kh: int, flags: int, events: int) -> int:
        # The current readiness only: virtio-fs (Linux 6.1) has no notification queue,
        # so FUSE_POLL_SCHEDULE_NOTIFY cannot be honoured; regular files are always ready.
        fd = self.handles.file(fh, nodeid).fd
        p = select.poll()
        p.register(fd, events & 0xFFFF)
        ready = p.poll(0)
        return ready[0][1] if ready else 0

    def bmap(self, ctx: Context, nodeid: int, blocksize: int, block: int) -> int:
        # ENOSYS on purpose: BMAP maps a file block to a block of the device the FUSE
        # filesystem sits on (fuseblk).  A virtio-fs guest has no such device: the
        # answer (the host's FIBMAP) would name a block of a host disk the guest cannot
        # address, and it would disclose the host's disk layout; FIBMAP also needs
        # CAP_SYS_RAWIO on the host.  Linux's virtio-fs never sends BMAP (no s_bdev).
        raise OSError(errno.ENOSYS, "BMAP has no meaning for a virtio-fs guest")
