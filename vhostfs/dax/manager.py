"""The DAX window manager: validate -> map through the front end -> record.

``DaxManager`` serves FUSE_SETUPMAPPING / FUSE_REMOVEMAPPING for a filesystem.  It owns the
:class:`~vhostfs.dax.window.Window` (the pure bookkeeping) and talks to the front end through
a :class:`MapChannel` (in the daemon: ``vhostfs.vhost_user.backend_channel.BackendChannel``,
SHMEM_MAP / SHMEM_UNMAP with NEED_REPLY).  Front-end rules it keeps (dax.md §2.4, QEMU 11.1):

* never map over a map: an upgrade (second SETUPMAPPING at the same ``moffset``) or the
  reuse of a range whose REMOVEMAPPING failed first unmaps exactly what is there;
* every unmap names one whole earlier map (a range is one or two pieces, see window.py);
* the fd handed over is always O_RDWR (QEMU refuses O_RDONLY even for read-only maps);
* never map past the end of the fd: the last, partial page of a file is served from a
  one-page *shadow* memfd holding a copy of it (window.py).  Guest stores into that page
  (DAX write(2) or a shared mmap) are written back to the file - only the bytes that
  changed, never past the current end of the file - on FSYNC, FLUSH, before a WRITE to the
  inode, on REMOVEMAPPING, upgrade, FORGET, reset and disconnect.  When the file grows
  the new bytes are copied in (or the range re-planned) before the guest is told the new
  size.  Host-side writes into that one page *below the old end* are seen by the guest only
  once the range is mapped again.  All other pages are the file itself, coherent both ways.

Locking: one lock serialises every mapping change, held across the front end's reply
(QEMU handles these one at a time anyway).  The thread that reads the main vhost-user
socket never takes it before the channel has been closed (``reset``), so a waiting map can
never block that thread; see backend_channel.py for the other half of that argument.
"""
from __future__ import annotations

import errno
import os
import stat
import threading
from typing import Callable, Iterable, Protocol

from vhostfs.dax.window import (PAGE_SIZE, RANGE_SIZE, Mapping, Piece, Window, WindowError,
                                plan_pieces)
from vhostfs.log import get_logger

log = get_logger("vhostfs.dax")


class MapChannel(Protocol):
    """How the manager asks the front end to change the window.

    ``map`` / ``unmap`` raise ``OSError``: :class:`FrontendRefused` when the front end
    answered non-zero, any other ``OSError`` when no answer can be had (channel closed
    because the rings stopped, reset, disconnect).
    """
    def map(self, shm_offset: int, length: int, fd: int, fd_offset: int, writable: bool) -> None: ...
    def unmap(self, shm_offset: int, length: int) -> None: ...


class FrontendRefused(OSError):
    """The front end answered a SHMEM_MAP / SHMEM_UNMAP with a non-zero result."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


class DaxManager:
    """SETUPMAPPING / REMOVEMAPPING for one window of ``window_size`` bytes."""

    def __init__(self, window_size: int, channel: MapChannel | None = None) -> None:
        self.window = Window(window_size)
        self.channel = channel
        self.lock = threading.Lock()
        self.stats = {"setup": 0, "upgrade": 0, "remove": 0, "refresh": 0, "writeback": 0}

    @property
    def size(self) -> int:
        return self.window.size

    def set_channel(self, channel: MapChannel | None) -> None:
        self.channel = channel

    # -- FUSE_SETUPMAPPING ----------------------------------------------------------------
    def setup(self, nodeid: int, foffset: int, length: int, flags: int, moffset: int,
              open_fd: Callable[[], int]) -> None:
        """Map ``length`` bytes of ``nodeid`` at ``foffset`` into the range at ``moffset``.

        ``open_fd()`` returns a new O_RDWR fd of the inode (the manager closes it).
        Raises OSError with the errno for the guest; on failure an earlier mapping of the
        range stays as it was unless it had to be unmapped first (then the range is free).
        """
        writable = self.window.check_setup(moffset, foffset, length, flags)
        channel = self._channel()
        fd = open_fd()
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise WindowError(errno.EINVAL, "only regular files can be mapped")
            if st.st_size <= foffset:
                raise WindowError(errno.EINVAL, f"file offset 0x{foffset:x} is at or past the end "
                                                f"of the file ({st.st_size} bytes)")
            mapping = Mapping(moffset, nodeid, foffset, length, writable,
                              plan_pieces(moffset, foffset, length, st.st_size),
                              st.st_size, st.st_mtime_ns)
            with self.lock:
                old = self.window.get(moffset)
                if old is not None:
                    upgrade = old.nodeid == nodeid and old.foffset == foffset
                    self._teardown(channel, old)       # raises: the old mapping stays
                    self.window.drop(moffset)
                    self.stats["upgrade" if upgrade else "setup"] += 1
                else:
                    upgrade = False
                    self.stats["setup"] += 1
                self._establish(channel, mapping, fd)
                self.window.record(mapping)
        finally:
            _close(fd)
        log.info("SETUPMAPPING", nodeid=nodeid, foffset=hex(foffset), len=hex(length),
                 moffset=hex(moffset), writable=writable, upgrade=upgrade,
                 pieces=len(mapping.pieces), shadow=mapping.shadowed)

    # -- FUSE_REMOVEMAPPING ---------------------------------------------------------------
    def remove(self, entries: Iterable[tuple[int, int]]) -> None:
        """Unmap each (moffset, len) entry.  Every entry is tried; the first error is raised
        after the rest were processed (the guest frees the ranges whatever we answer)."""
        entries = list(entries)
        channel = self._channel()
        first: OSError | None = None
        done = 0
        with self.lock:
            for moffset, length in entries:
                try:
                    mapping = self.window.check_remove(moffset, length)
                    self._teardown(channel, mapping)
                    self.window.drop(moffset)
                    done += 1
                except OSError as exc:
                    log.warning("REMOVEMAPPING entry failed", moffset=hex(moffset), len=hex(length),
                                error=str(exc))
                    first = first or exc
            self.stats["remove"] += done
        log.info("REMOVEMAPPING", count=len(entries), removed=done,
                 moffsets=",".join(hex(m) for m, _ in entries[:8]) + (",..." if len(entries) > 8 else ""))
        if first is not None:
            raise first

    # -- inode events ---------------------------------------------------------------------
    def release_inode(self, nodeid: int) -> None:
        """The guest forgot ``nodeid``: unmap whatever it still has in the window."""
        if not self.window.has_inode(nodeid):
            return
        with self.lock:
            mappings = self.window.of_inode(nodeid)
            for mapping in mappings:
                try:
                    self._teardown(self._channel(), mapping)
                except OSError as exc:
                    log.warning("cannot unmap a forgotten inode's range; dropping the record",
                                nodeid=nodeid, moffset=hex(mapping.moffset), error=str(exc))
                    self._discard(mapping)
                self.window.drop(mapping.moffset)
        log.info("DAX ranges of a forgotten inode released", nodeid=nodeid, count=len(mappings))

    def flush_inode(self, nodeid: int) -> None:
        """Write guest stores in ``nodeid``'s shadow pages back to the file."""
        if not self.window.has_inode(nodeid):
            return
        with self.lock:
            for mapping in self.window.of_inode(nodeid):
                self._write_back(mapping)

    def file_changed(self, nodeid: int) -> None:
        """The file may have changed size (WRITE, SETATTR, FALLOCATE): re-plan its short ranges."""
        if not self.window.has_inode(nodeid):
            return
        with self.lock:
            for mapping in self.window.of_inode(nodeid):
                fd = mapping.extra.get("fd")
                if fd is None:
                    continue
                try:
                    st = os.fstat(fd)
                except OSError:
                    continue
                self._refresh_locked(mapping, st.st_size, st.st_mtime_ns)

    def attr_seen(self, nodeid: int, size: int, mtime_ns: int) -> None:
        """The guest is about to be told this size/mtime: make its short ranges agree first."""
        if not self.window.has_inode(nodeid):
            return
        with self.lock:
            for mapping in self.window.of_inode(nodeid):
                if "fd" in mapping.extra:
                    self._refresh_locked(mapping, size, mtime_ns)

    # -- device events --------------------------------------------------------------------
    def reset(self) -> None:
        """The front end dropped every mapping (device reset, disconnect): forget them all.

        The caller has closed the channel first, so no waiting map holds the lock long.
        """
        with self.lock:
            dropped = self.window.clear()
            for mapping in dropped:
                self._write_back(mapping)
                self._discard(mapping)
        if dropped:
            log.info("DAX window cleared on reset", ranges=len(dropped))

    def unmap_all(self) -> None:
        """DESTROY: unmap every range through the front end (if it still listens)."""
        with self.lock:
            for mapping in self.window.mappings():
                try:
                    self._teardown(self._channel(), mapping)
                except OSError as exc:
                    log.warning("cannot unmap at DESTROY", moffset=hex(mapping.moffset), error=str(exc))
                    self._write_back(mapping)
                    self._discard(mapping)
                self.window.drop(mapping.moffset)

    # -- the I/O ----------------------------------------------------------------------------
    def _channel(self) -> MapChannel:
        channel = self.channel
        if channel is None:
            raise OSError(errno.ENOTCONN, "no front-end channel for DAX mappings")
        return channel

    def _establish(self, channel: MapChannel, mapping: Mapping, fd: int) -> None:
        """Map every piece of ``mapping``; on failure unmap the ones done and raise."""
        done: list[Piece] = []
        extra: dict = {}
        try:
            if mapping.short:
                extra["fd"] = os.dup(fd)
            for piece in mapping.pieces:
                if piece.shadow:
                    memfd, snapshot = self._make_shadow(fd, mapping, piece)
                    extra["memfd"], extra["snapshot"], extra["shadow"] = memfd, snapshot, piece
                    channel.map(piece.shm_offset, piece.length, memfd, 0, mapping.writable)
                else:
                    channel.map(piece.shm_offset, piece.length, fd, piece.fd_offset, mapping.writable)
                done.append(piece)
        except BaseException:
            for piece in reversed(done):
                try:
                    channel.unmap(piece.shm_offset, piece.length)
                except OSError as exc:
                    log.warning("cannot undo a partial mapping", moffset=hex(piece.shm_offset), error=str(exc))
            for key in ("fd", "memfd"):
                _close(extra.get(key))
            raise
        mapping.extra = extra

    @staticmethod
    def _make_shadow(fd: int, mapping: Mapping, piece: Piece) -> tuple[int, bytes]:
        file_offset = mapping.foffset + (piece.shm_offset - mapping.moffset)
        data = os.pread(fd, PAGE_SIZE, file_offset)
        memfd = os.memfd_create("vhostfs-dax-tail", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, PAGE_SIZE)
            if data:
                os.pwrite(memfd, data, 0)
        except BaseException:
            _close(memfd)
            raise
        return memfd, data.ljust(PAGE_SIZE, b"\0")

    def _teardown(self, channel: MapChannel, mapping: Mapping) -> None:
        """Unmap every piece exactly.  A piece the front end says is not mapped is taken as
        unmapped (QEMU refuses unmaps only for ranges it does not hold); no answer raises."""
        self._write_back(mapping)
        for piece in mapping.pieces:
            try:
                channel.unmap(piece.shm_offset, piece.length)
            except FrontendRefused as exc:
                log.warning("front end holds no such mapping; taken as unmapped",
                            moffset=hex(piece.shm_offset), len=hex(piece.length), error=str(exc))
        self._discard(mapping)

    @staticmethod
    def _discard(mapping: Mapping) -> None:
        extra, mapping.extra = mapping.extra, {}
        for key in ("fd", "memfd"):
            _close(extra.get(key))

    def _write_back(self, mapping: Mapping) -> None:
        """Copy the bytes the guest changed in the shadow page to the file (within EOF)."""
        extra = mapping.extra
        memfd, fd, snapshot, piece = (extra.get("memfd"), extra.get("fd"), extra.get("snapshot"),
                                      extra.get("shadow"))
        if memfd is None or fd is None or not mapping.writable:
            return
        try:
            current = os.pread(memfd, PAGE_SIZE, 0)
            if current == snapshot:
                return
            base = mapping.foffset + (piece.shm_offset - mapping.moffset)
            limit = max(0, min(PAGE_SIZE, os.fstat(fd).st_size - base))
            i = 0
            while i < limit:
                if current[i] == snapshot[i]:
                    i += 1
                    continue
                j = i
                while j < limit and current[j] != snapshot[j]:
                    j += 1
                os.pwrite(fd, current[i:j], base + i)
                i = j
            extra["snapshot"] = current
            self.stats["writeback"] += 1
        except OSError as exc:
            log.error("DAX tail page write-back failed", nodeid=mapping.nodeid,
                      moffset=hex(mapping.moffset), error=str(exc))

    def _refresh_locked(self, mapping: Mapping, size: int, mtime_ns: int) -> None:
        """The file is ``size`` bytes now.  A size change that keeps the range's layout
        (the file still ends in the same shadowed page, or past the range) is applied in
        place: the bytes that appeared are copied into the shadow, nothing is unmapped, so
        a guest using the range concurrently never sees a gap.  Any other size change
        re-plans the range (exact unmaps, then maps).  An mtime-only change does nothing:
        re-mapping on every guest store would open gaps under a running guest."""
        if size == mapping.file_size:
            return
        fd = mapping.extra.get("fd")
        if fd is None:
            return
        pieces = plan_pieces(mapping.moffset, mapping.foffset, mapping.length, size) \
            if size > mapping.foffset else ()
        if pieces == mapping.pieces:
            self._grow_shadow_in_place(mapping, size)
            mapping.file_size, mapping.file_mtime_ns = size, mtime_ns
            return
        try:
            channel = self._channel()
            keep = os.dup(fd)
            try:
                self._teardown(channel, mapping)
                self.window.drop(mapping.moffset)
                mapping.pieces, mapping.file_size, mapping.file_mtime_ns = pieces, size, mtime_ns
                self._establish(channel, mapping, keep)
                self.window.record(mapping)
            finally:
                _close(keep)
            self.stats["refresh"] += 1
            log.info("DAX range re-planned for a new file size", nodeid=mapping.nodeid,
                     moffset=hex(mapping.moffset), size=size, pieces=len(pieces))
        except OSError as exc:
            # The range is now unmapped in the front end; keep no stale record of it.
            self.window.drop(mapping.moffset)
            self._discard(mapping)
            log.error("DAX range could not be re-planned; it is unmapped", nodeid=mapping.nodeid,
                      moffset=hex(mapping.moffset), error=str(exc))

    @staticmethod
    def _grow_shadow_in_place(mapping: Mapping, size: int) -> None:
        """Copy the file bytes between the old and the new end into the shadow page."""
        extra = mapping.extra
        memfd, fd, piece = extra.get("memfd"), extra.get("fd"), extra.get("shadow")
        if memfd is None or size <= mapping.file_size:
            return
        base = mapping.foffset + (piece.shm_offset - mapping.moffset)
        start = max(mapping.file_size - base, 0)
        end = min(size - base, PAGE_SIZE)
        if end <= start:
            return
        try:
            data = os.pread(fd, end - start, base + start)
            os.pwrite(memfd, data, start)
            snapshot = bytearray(extra["snapshot"])
            snapshot[start:start + len(data)] = data
            extra["snapshot"] = bytes(snapshot)
        except OSError as exc:
            log.error("DAX shadow page could not be extended", nodeid=mapping.nodeid,
                      moffset=hex(mapping.moffset), error=str(exc))


__all__ = ["DaxManager", "FrontendRefused", "MapChannel", "RANGE_SIZE"]
