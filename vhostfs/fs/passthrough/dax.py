"""PassthroughFs with a DAX cache window (FUSE_SETUPMAPPING / FUSE_REMOVEMAPPING).

The window itself is ``vhostfs.dax.DaxManager`` (validation, the front-end channel, the
records).  This subclass is the filesystem half: it resolves the guest's nodeid and handle,
opens the O_RDWR fd the front end needs, answers INIT with FUSE_MAP_ALIGNMENT (21: the
guest's 2 MiB ranges; Linux 6.1 accepts <= 21) and, for ``-o dax=inode``,
FUSE_HAS_INODE_DAX with FUSE_ATTR_DAX on regular files of at least ``dax_inode_min_size``
bytes.  It tells the manager about every event that concerns a mapped inode: FORGET
(unmap what the guest left), WRITE / SETATTR (the file may have grown or shrunk: the
ranges holding its end are re-planned), FLUSH / FSYNC / WRITE (guest stores into the
shadowed last page are written back), DESTROY (unmap everything).
"""
from __future__ import annotations

import errno
import os
import stat

from vhostfs.fs import api
from vhostfs.fs.api import Attr, Context, Entry, SetAttr, WriteSource
from vhostfs.fs.passthrough.filesystem import PassthroughFs
from vhostfs.log import get_logger

log = get_logger("vhostfs.dax")

NO_HANDLE = (1 << 64) - 1
DAX_MAP_ALIGNMENT = 21


class DaxPassthroughFs(PassthroughFs):
    map_alignment = DAX_MAP_ALIGNMENT

    def __init__(self, shared_dir: str, *, dax, dax_inode_min_size: int = 0, **kwargs) -> None:
        super().__init__(shared_dir, **kwargs)
        if dax_inode_min_size < 0:
            raise ValueError("dax_inode_min_size must be >= 0")
        self.dax = dax
        self.dax_inode_min_size = dax_inode_min_size

    # --- session -----------------------------------------------------------------------
    def init(self, capable: int) -> int:
        return super().init(capable) | api.INIT_MAP_ALIGNMENT | api.INIT_HAS_INODE_DAX

    def destroy(self) -> None:
        self.dax.unmap_all()
        super().destroy()

    # --- attributes: FUSE_ATTR_DAX, and short ranges agree with the size the guest sees ---
    def _dax_attr(self, nodeid: int, attr: Attr) -> Attr:
        if stat.S_ISREG(attr.mode):
            if attr.size >= self.dax_inode_min_size:
                attr.flags |= api.ATTR_DAX
            self.dax.attr_seen(nodeid, attr.size, attr.mtime * 1_000_000_000 + attr.mtimensec)
        return attr

    def _entry(self, inode, st) -> Entry:
        entry = super()._entry(inode, st)
        self._dax_attr(inode.nodeid, entry.attr)
        return entry

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[Attr, float]:
        attr, timeout = super().getattr(ctx, nodeid, fh)
        return self._dax_attr(nodeid, attr), timeout

    def statx(self, ctx: Context, nodeid: int, fh: int | None, sx_flags: int, sx_mask: int):
        sx, timeout = super().statx(ctx, nodeid, fh, sx_flags, sx_mask)
        self._dax_attr(nodeid, sx.attr)
        return sx, timeout

    def setattr(self, ctx: Context, nodeid: int, a: SetAttr) -> tuple[Attr, float]:
        if a.valid & api.FATTR_SIZE:
            self.dax.flush_inode(nodeid)
        try:
            attr, timeout = super().setattr(ctx, nodeid, a)
        finally:
            if a.valid & api.FATTR_SIZE:
                self.dax.file_changed(nodeid)
        return self._dax_attr(nodeid, attr), timeout

    # --- data ----------------------------------------------------------------------------
    def write(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int,
              source: WriteSource, write_flags: int) -> int:
        # With DAX the guest sends WRITE only for writes that extend the file (dax.c
        # file_extending_write) and O_DIRECT ones; the others go through the window.
        self.dax.flush_inode(nodeid)
        try:
            size_before = os.fstat(self.handles.file(fh).fd).st_size
        except OSError:
            size_before = None
        try:
            n = super().write(ctx, nodeid, fh, offset, size, source, write_flags)
        finally:
            self.dax.file_changed(nodeid)
        if size_before is not None and offset + n > size_before:
            log.info("extending WRITE (not through the DAX window)", nodeid=nodeid,
                     offset=offset, size=n)
        return n

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        self.dax.flush_inode(nodeid)
        super().flush(ctx, nodeid, fh, lock_owner)

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        self.dax.flush_inode(nodeid)
        super().fsync(ctx, nodeid, fh, datasync)

    # --- inodes ---------------------------------------------------------------------------
    def forget(self, nodeid: int, nlookup: int) -> None:
        super().forget(nodeid, nlookup)
        self._released(nodeid)

    def batch_forget(self, items) -> None:
        items = list(items)
        super().batch_forget(items)
        for nodeid, _ in items:
            self._released(nodeid)

    def _released(self, nodeid: int) -> None:
        if not self.dax.window.has_inode(nodeid):
            return
        try:
            self.inodes.get(nodeid)
        except OSError:
            self.dax.release_inode(nodeid)

    # --- the window -------------------------------------------------------------------------
    def setupmapping(self, ctx: Context, nodeid: int, fh: int, foffset: int, length: int,
                     flags: int, moffset: int) -> None:
        inode = self.inodes.get(nodeid)
        if inode.ftype != stat.S_IFREG:
            raise OSError(errno.EINVAL, "only regular files can be mapped")
        if fh != NO_HANDLE:
            self.handles.file(fh, nodeid)          # a handle, if given, must be this inode's
        if self.readonly:
            # QEMU 11.1 does not enforce read-only maps (dax.md §2.4): a map would let the
            # guest write the share.
            raise OSError(errno.EROFS, "DAX mappings are refused on a read-only share")

        def open_fd() -> int:
            # O_RDWR even for read-only maps: QEMU 11.1 refuses O_RDONLY fds (dax.md §2.4).
            return os.open(inode.proc_path, os.O_RDWR | os.O_CLOEXEC)

        self.dax.setup(nodeid, foffset, length, flags, moffset, open_fd)

    def removemapping(self, ctx: Context, entries: list[tuple[int, int]]) -> None:
        self.dax.remove(entries)
