"""Reader and Writer over the guest buffers of a descriptor chain.

A :class:`Reader` walks the device-readable views (the request), a :class:`Writer`
fills the device-writable views (the reply).  Both keep a cursor (view index, offset
in that view) and never copy bulk data: ``write_to_fd`` hands the guest views straight
to ``os.pwritev`` and ``read_from_fd`` lets ``os.preadv`` fill them, in batches of at
most ``SC_IOV_MAX`` vectors, looping on short transfers.

The views are guest memory: the guest can change them at any time.  Small values are
read once (``read``/``unpack`` return copies) and must be validated by the caller
after that.  A request that asks for more bytes than the guest supplied raises
:class:`GuestBufferTooSmall` (a VirtqueueError), never IndexError.

Both classes satisfy the ``fs/api.py`` zero-copy protocols (``write_to_fd``,
``read_from_fd``).
"""
from __future__ import annotations

import os

from vhostfs.errors import VirtqueueError

__all__ = ["GuestBufferTooSmall", "Reader", "Writer", "IOV_MAX", "set_dirty_log"]

#: vhost-user dirty logging (vhostfs.migration.dirtylog.DirtyLog) while the frontend
#: has VHOST_F_LOG_ALL on: every Writer write into guest memory marks its pages.
#: None (the normal case) costs one global load per write.
dirty_log = None


def set_dirty_log(log) -> None:
    """Install (or with None remove) the dirty log every Writer marks."""
    global dirty_log
    dirty_log = log


def _mark(views) -> None:
    log = dirty_log
    if log is not None:
        for v in views:
            log.mark_view(v, 0, len(v))

try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):  # pragma: no cover - every Linux has it
    IOV_MAX = 1024
if IOV_MAX <= 0:  # pragma: no cover
    IOV_MAX = 1024


class GuestBufferTooSmall(VirtqueueError):
    """The request needs more bytes than the guest's buffer holds."""

    def __init__(self, what: str, needed: int, available: int) -> None:
        super().__init__(f"{what}: needs {needed} bytes, the guest buffer has {available}")
        self.needed = needed
        self.available = available


def _byte_views(views) -> list[memoryview]:
    out = []
    for v in views:
        if not isinstance(v, memoryview):
            v = memoryview(v)
        if v.format != "B" or v.ndim != 1:
            v = v.cast("B")
        if v.nbytes:
            out.append(v)
    return out


def _slices(views, i: int, off: int, count: int) -> list[memoryview]:
    """Views covering ``count`` bytes from cursor (i, off); the caller checked the size."""
    out = []
    while count:
        cur = views[i]
        avail = len(cur) - off
        if count < avail:
            out.append(cur[off:off + count])
            break
        out.append(cur[off:] if off else cur)
        count -= avail
        i += 1
        off = 0
    return out


def _transfer(op, fd: int, iovs: list[memoryview], offset: int) -> int:
    """Run preadv/pwritev over ``iovs`` from file ``offset``; batch, loop on short I/O.

    Stops at EOF (a zero return).  An error after some bytes moved returns the count
    so far (like read(2)); an error before raises OSError.
    """
    total = 0
    start = 0
    n = len(iovs)
    while start < n:
        batch = iovs[start:start + IOV_MAX]
        try:
            done = op(fd, batch, offset + total)
        except OSError:
            if total:
                break
            raise
        if done <= 0:
            break
        total += done
        while start < n and done >= len(iovs[start]):
            done -= len(iovs[start])
            start += 1
        if done:
            iovs[start] = iovs[start][done:]
    return total


class Reader:
    """Sequential reads from the device-readable part of a chain.

    ``Reader(views)`` accepts any buffers.  ``Reader(chain.readable, chain.readable_len)``
    trusts what the chain walk guarantees (non-empty flat byte views, summing to the
    length it gives) and skips re-checking and re-summing them: the runtime builds one
    Reader per request that way (docs/performance.md §5).

    ``decoded`` is free for the layer above to keep what it decoded from the start of
    the request while classifying it (the FUSE server keeps the in-header there, so the
    handler uses the same copy the runtime's routing decision was made on), and
    ``rewind()`` puts the cursor back at the start for the handler.
    """

    __slots__ = ("_views", "_i", "_off", "remaining", "_total", "decoded")

    def __init__(self, views, nbytes: int | None = None) -> None:
        if nbytes is None:
            views = _byte_views(views)
            nbytes = sum(len(v) for v in views)
        self._views = views
        self._i = 0
        self._off = 0
        #: bytes left to read
        self.remaining = nbytes
        self._total = nbytes
        self.decoded = None

    def rewind(self) -> None:
        """Back to the first byte (``decoded`` is kept)."""
        self._i = 0
        self._off = 0
        self.remaining = self._total

    def _short(self, what: str, n: int) -> GuestBufferTooSmall:
        return GuestBufferTooSmall(what, n, self.remaining)

    def _advance(self, n: int) -> None:
        views = self._views
        i = self._i
        off = self._off + n
        while i < len(views) and off >= len(views[i]):
            off -= len(views[i])
            i += 1
        self._i = i
        self._off = off
        self.remaining -= n

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes, copied (so they can be validated safely)."""
        if n < 0:
            raise ValueError(f"negative read size {n}")
        if n > self.remaining:
            raise self._short("read", n)
        if n == 0:
            return b""
        cur = self._views[self._i]
        off = self._off
        end = off + n
        if end <= len(cur):
            if end == len(cur):
                self._i += 1
                end = 0
            self._off = end
            self.remaining -= n
            return cur[off:off + n].tobytes()
        data = b"".join(_slices(self._views, self._i, off, n))
        self._advance(n)
        return data

    def unpack(self, st) -> tuple:
        """Unpack a ``struct.Struct`` from the next ``st.size`` bytes."""
        n = st.size
        if n > self.remaining:
            raise self._short(f"unpack {n}-byte struct", n)
        cur = self._views[self._i] if n else None
        off = self._off
        if n and off + n <= len(cur):
            end = off + n
            if end == len(cur):
                self._i += 1
                end = 0
            self._off = end
            self.remaining -= n
            return st.unpack_from(cur, off)
        return st.unpack(self.read(n))

    def peek(self, st) -> tuple:
        """Unpack a ``struct.Struct`` from the next ``st.size`` bytes; the cursor stays."""
        n = st.size
        if n > self.remaining:
            raise self._short(f"peek {n}-byte struct", n)
        if not n:
            return st.unpack(b"")
        cur = self._views[self._i]
        off = self._off
        if off + n <= len(cur):
            return st.unpack_from(cur, off)
        return st.unpack(b"".join(_slices(self._views, self._i, off, n)))

    def skip(self, n: int) -> None:
        """Move the cursor ``n`` bytes forward."""
        if n < 0:
            raise ValueError(f"negative skip {n}")
        if n > self.remaining:
            raise self._short("skip", n)
        self._advance(n)

    def views(self, n: int) -> list[memoryview]:
        """Consume ``n`` bytes and return them as views on guest memory (no copy)."""
        if n < 0:
            raise ValueError(f"negative size {n}")
        if n > self.remaining:
            raise self._short("views", n)
        out = _slices(self._views, self._i, self._off, n)
        self._advance(n)
        return out

    def write_to_fd(self, fd: int, count: int, offset: int) -> int:
        """``os.pwritev`` the next ``count`` bytes to ``fd`` at ``offset``; bytes written.

        The cursor advances by the bytes actually written.
        """
        if count < 0:
            raise ValueError(f"negative count {count}")
        if count > self.remaining:
            raise self._short("write_to_fd", count)
        if count == 0:
            return 0
        done = _transfer(os.pwritev, fd, _slices(self._views, self._i, self._off, count), offset)
        self._advance(done)
        return done


class Writer:
    """Sequential writes into the device-writable part of a chain."""

    __slots__ = ("_views", "_i", "_off", "capacity", "written")

    def __init__(self, views, nbytes: int | None = None) -> None:
        # nbytes given: trusted chain views, as for Reader.
        if nbytes is None:
            views = _byte_views(views)
            nbytes = sum(len(v) for v in views)
        self._views = views
        self._i = 0
        self._off = 0
        #: total bytes the guest offered
        self.capacity = nbytes
        #: bytes written so far (the used length to report)
        self.written = 0

    @property
    def remaining(self) -> int:
        return self.capacity - self.written

    def _check(self, what: str, n: int) -> None:
        if n > self.capacity - self.written:
            raise GuestBufferTooSmall(what, n, self.capacity - self.written)

    def _advance(self, n: int) -> None:
        views = self._views
        i = self._i
        off = self._off + n
        while i < len(views) and off >= len(views[i]):
            off -= len(views[i])
            i += 1
        self._i = i
        self._off = off
        self.written += n

    def write(self, data) -> None:
        """Copy ``data`` (any bytes-like) into the guest buffer."""
        if not isinstance(data, (bytes, bytearray)):
            data = memoryview(data).cast("B")
        n = len(data)
        if n > self.capacity - self.written:
            raise GuestBufferTooSmall("write", n, self.capacity - self.written)
        if n == 0:
            return
        cur = self._views[self._i]
        off = self._off
        end = off + n
        if end <= len(cur):
            cur[off:end] = data
            if dirty_log is not None:
                dirty_log.mark_view(cur, off, n)
            if end == len(cur):
                self._i += 1
                end = 0
            self._off = end
            self.written += n
            return
        src = memoryview(data)
        pos = 0
        dsts = _slices(self._views, self._i, off, n)
        for dst in dsts:
            k = len(dst)
            dst[:] = src[pos:pos + k]
            pos += k
        if dirty_log is not None:
            _mark(dsts)
        self._advance(n)

    def pack(self, st, *values) -> None:
        """Pack a ``struct.Struct`` straight into the guest buffer."""
        n = st.size
        if n > self.capacity - self.written:
            raise GuestBufferTooSmall(f"pack {n}-byte struct", n, self.capacity - self.written)
        if n:
            cur = self._views[self._i]
            off = self._off
            end = off + n
            if end <= len(cur):
                st.pack_into(cur, off, *values)
                if dirty_log is not None:
                    dirty_log.mark_view(cur, off, n)
                if end == len(cur):
                    self._i += 1
                    end = 0
                self._off = end
                self.written += n
                return
        self.write(st.pack(*values))

    def write_at(self, pos: int, data) -> None:
        """Overwrite bytes already written at ``pos`` (e.g. the FUSE header's length)."""
        if not isinstance(data, (bytes, bytearray)):
            data = memoryview(data).cast("B")
        n = len(data)
        if pos < 0 or pos + n > self.written:
            raise ValueError(f"write_at({pos}, {n} bytes) outside the {self.written} bytes written")
        if n == 0:
            return
        views = self._views
        first = views[0]
        if pos + n <= len(first):
            first[pos:pos + n] = data
            if dirty_log is not None:
                dirty_log.mark_view(first, pos, n)
            return
        i = 0
        while pos >= len(views[i]):
            pos -= len(views[i])
            i += 1
        src = memoryview(data)
        done = 0
        dsts = _slices(views, i, pos, n)
        for dst in dsts:
            k = len(dst)
            dst[:] = src[done:done + k]
            done += k
        if dirty_log is not None:
            _mark(dsts)

    def read_from_fd(self, fd: int, count: int, offset: int) -> int:
        """``os.preadv`` up to ``count`` bytes of ``fd`` at ``offset`` into the guest buffer.

        Loops on short reads, stops at EOF; returns the bytes read (the cursor and
        ``written`` advance by that much).
        """
        if count < 0:
            raise ValueError(f"negative count {count}")
        self._check("read_from_fd", count)
        if count == 0:
            return 0
        iovs = _slices(self._views, self._i, self._off, count)
        if dirty_log is None:
            done = _transfer(os.preadv, fd, iovs, offset)
        else:
            # Mark what preadv may have written, also when it failed half-way.
            dsts = list(iovs)
            try:
                done = _transfer(os.preadv, fd, iovs, offset)
            finally:
                _mark(dsts)
        self._advance(done)
        return done
