"""The driver (guest kernel) side of virtio-fs: a FUSE client over real split rings.

Three layers, each usable alone (tests, the stress test, fuzzing and ``tests.bench``):

Codec (pure functions, no I/O)
    ``encode_*`` build an :class:`Op` (opcode, nodeid, argument bytes, the size of the
    reply body to offer, optional write payload length); ``decode_*`` parse reply bodies
    (``fuse_entry_out``, ``fuse_attr_out``, ``fuse_open_out``, ``fuse_write_out``,
    ``fuse_init_out``, READDIRPLUS buffers).  :func:`in_header` packs ``fuse_in_header``.

:class:`RingChannel` (over a :class:`SlotDriver`, ``tests.support.driver.Driver`` with a
lean hot path: each slot owns its descriptors for good, replies are read in place)
    One request virtqueue seen from the driver: ``depth`` preallocated slots in guest
    memory, each with a 40-byte in-header buffer, an argument buffer, a 16-byte out-header
    buffer, a reply-body buffer and a data buffer (WRITE payload / READ destination, never
    copied).  Chains are laid out the way Linux's virtio_fs does (in header and arguments in
    their own device-readable descriptors, then the payload; out header, then the reply
    body as device-writable descriptors), so C virtiofsd's zero-copy WRITE path applies.
    ``submit`` publishes and kicks only when the device asked for a kick (EVENT_IDX);
    ``reap`` returns :class:`Reply` objects after checking the used length, the
    out-header length and the unique.

:class:`VirtioFsConnection`
    Connects a :class:`tests.support.frontend.Frontend` to a backend socket, plays QEMU
    7.2's handshake for the hiprio queue plus ``request_queues`` request queues over one
    memfd guest RAM, and offers blocking helpers (``init``, ``lookup``, ``read`` ...).

Errors: a reply with a negative ``error`` raises :class:`FuseError` from the blocking
helpers (``Reply.error`` in the async API); a malformed reply raises
:class:`FuseProtocolError`.
"""
from __future__ import annotations

import os
import select
import struct
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from vhostfs import hostsys
from vhostfs.fs.api import Attr  # struct fuse_attr: one declaration for both sides
from vhostfs.fuse import abi
from vhostfs.vhost_user import messages as vm

from tests.support.driver import F_NEXT, F_WRITE, Driver, FakeGuestMemory
from tests.support.frontend import Frontend, FrontendError

O = abi.Opcode
IN_HEADER_SIZE = abi.fuse_in_header.size      # 40
OUT_HEADER_SIZE = abi.fuse_out_header.size    # 16
MiB = 1 << 20


class FuseError(OSError):
    """The backend answered a request with ``-errno``."""

    def __init__(self, opcode: int, error: int) -> None:
        super().__init__(-error, f"{_opname(opcode)}: {os.strerror(-error)}")
        self.opcode = opcode


class FuseProtocolError(Exception):
    """A reply that breaks the FUSE/virtio-fs framing (wrong unique, length, ...)."""


def _opname(opcode: int) -> str:
    try:
        return O(opcode).name
    except ValueError:
        return f"OPCODE({opcode})"


# -- codec -----------------------------------------------------------------------------------
class Op(NamedTuple):
    """One request before it has a unique: what goes after the in header, and what comes back."""
    opcode: int
    nodeid: int
    args: bytes               # everything after fuse_in_header except a WRITE payload
    reply_size: int           # reply body capacity to offer (0: no reply expected)
    write_len: int = 0        # WRITE payload length (taken from the slot's data buffer)
    read_into_data: bool = False   # READ: the body goes to the slot's data buffer


def in_header(opcode: int, unique: int, nodeid: int, total_len: int, *, uid: int = 0,
              gid: int = 0, pid: int = 0) -> bytes:
    return abi.fuse_in_header.pack(total_len, opcode, unique, nodeid, uid, gid, pid, 0, 0)


def _name(name: bytes | str) -> bytes:
    raw = os.fsencode(name)
    if b"\0" in raw or b"/" in raw:
        raise ValueError(f"bad name {name!r}")
    return raw + b"\0"


ENTRY_OUT = abi.fuse_entry_out.size
ATTR_OUT = abi.fuse_attr_out.size
OPEN_OUT = abi.fuse_open_out.size

INIT_FLAGS = (abi.FUSE_ASYNC_READ | abi.FUSE_POSIX_LOCKS | abi.FUSE_ATOMIC_O_TRUNC
              | abi.FUSE_EXPORT_SUPPORT | abi.FUSE_BIG_WRITES | abi.FUSE_DONT_MASK
              | abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO | abi.FUSE_ASYNC_DIO
              | abi.FUSE_PARALLEL_DIROPS | abi.FUSE_MAX_PAGES | abi.FUSE_INIT_EXT)


def encode_init(*, major: int = abi.KERNEL_VERSION, minor: int = abi.KERNEL_MINOR_VERSION,
                max_readahead: int = 128 << 10, flags: int = INIT_FLAGS, flags2: int = 0) -> Op:
    args = abi.fuse_init_in.pack(major, minor, max_readahead, flags & 0xFFFFFFFF,
                                 flags2 | (flags >> 32), *([0] * 11))
    return Op(O.INIT, 0, args, abi.fuse_init_out.size)


def encode_lookup(parent: int, name: bytes | str) -> Op:
    return Op(O.LOOKUP, parent, _name(name), ENTRY_OUT)


def encode_getattr(nodeid: int, fh: int | None = None) -> Op:
    flags = 0 if fh is None else abi.FUSE_GETATTR_FH
    return Op(O.GETATTR, nodeid, abi.fuse_getattr_in.pack(flags, 0, fh or 0), ATTR_OUT)


def encode_open(nodeid: int, flags: int = os.O_RDONLY) -> Op:
    return Op(O.OPEN, nodeid, abi.fuse_open_in.pack(flags, 0), OPEN_OUT)


def encode_opendir(nodeid: int, flags: int = os.O_RDONLY | os.O_DIRECTORY) -> Op:
    return Op(O.OPENDIR, nodeid, abi.fuse_open_in.pack(flags, 0), OPEN_OUT)


def encode_create(parent: int, name: bytes | str, flags: int = os.O_RDWR | os.O_CREAT | os.O_EXCL,
                  mode: int = 0o100644, umask: int = 0o022) -> Op:
    return Op(O.CREATE, parent, abi.fuse_create_in.pack(flags, mode, umask, 0) + _name(name),
              ENTRY_OUT + OPEN_OUT)


def encode_mkdir(parent: int, name: bytes | str, mode: int = 0o755, umask: int = 0o022) -> Op:
    return Op(O.MKDIR, parent, abi.fuse_mkdir_in.pack(mode, umask) + _name(name), ENTRY_OUT)


def encode_read(nodeid: int, fh: int, offset: int, size: int, *, flags: int = os.O_RDONLY) -> Op:
    """The reply data lands in the slot's data buffer (no copy)."""
    return Op(O.READ, nodeid, abi.fuse_read_in.pack(fh, offset, size, 0, 0, flags, 0), size,
              read_into_data=True)


def encode_write(nodeid: int, fh: int, offset: int, size: int, *, flags: int = os.O_RDWR) -> Op:
    """The payload is the first ``size`` bytes of the slot's data buffer."""
    return Op(O.WRITE, nodeid, abi.fuse_write_in.pack(fh, offset, size, 0, 0, flags, 0),
              abi.fuse_write_out.size, write_len=size)


def encode_release(nodeid: int, fh: int, flags: int = 0, *, dir: bool = False) -> Op:
    return Op(O.RELEASEDIR if dir else O.RELEASE, nodeid,
              abi.fuse_release_in.pack(fh, flags, 0, 0), 0)


def encode_flush(nodeid: int, fh: int) -> Op:
    return Op(O.FLUSH, nodeid, abi.fuse_flush_in.pack(fh, 0, 0, 0), 0)


def encode_unlink(parent: int, name: bytes | str) -> Op:
    return Op(O.UNLINK, parent, _name(name), 0)


def encode_rmdir(parent: int, name: bytes | str) -> Op:
    return Op(O.RMDIR, parent, _name(name), 0)


def encode_readdirplus(nodeid: int, fh: int, offset: int, size: int = 4096) -> Op:
    return Op(O.READDIRPLUS, nodeid, abi.fuse_read_in.pack(fh, offset, size, 0, 0, 0, 0), size)


def encode_readdir(nodeid: int, fh: int, offset: int, size: int = 4096) -> Op:
    return Op(O.READDIR, nodeid, abi.fuse_read_in.pack(fh, offset, size, 0, 0, 0, 0), size)


def encode_statfs(nodeid: int = abi.ROOT_ID) -> Op:
    return Op(O.STATFS, nodeid, b"", abi.fuse_statfs_out.size)


def encode_forget(nodeid: int, nlookup: int) -> Op:
    """No reply: the kernel sends FORGET on the hiprio queue."""
    return Op(O.FORGET, nodeid, abi.fuse_forget_in.pack(nlookup), 0)


def encode_batch_forget(items: list[tuple[int, int]]) -> Op:
    args = abi.fuse_batch_forget_in.pack(len(items), 0) + b"".join(
        abi.fuse_forget_one.pack(nodeid, n) for nodeid, n in items)
    return Op(O.BATCH_FORGET, 0, args, 0)


def encode_destroy() -> Op:
    return Op(O.DESTROY, 0, b"", 0)


@dataclass(slots=True)
class Entry:
    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    attr: Attr


@dataclass(slots=True)
class DirentPlus:
    entry: Entry
    ino: int
    off: int
    type: int
    name: bytes


@dataclass(slots=True)
class InitOut:
    major: int
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int
    map_alignment: int


def _need(body: bytes, size: int, what: str) -> None:
    if len(body) < size:
        raise FuseProtocolError(f"{what}: {len(body)} bytes, {size} expected")


def decode_entry(body: bytes, offset: int = 0) -> Entry:
    _need(body, offset + ENTRY_OUT, "fuse_entry_out")
    v = abi.fuse_entry_out.unpack_from(body, offset)
    return Entry(v[0], v[1], v[2], v[3], Attr(*v[6:]))


def decode_attr(body: bytes) -> Attr:
    _need(body, ATTR_OUT, "fuse_attr_out")
    return Attr(*abi.fuse_attr_out.unpack_from(body)[3:])


def decode_open(body: bytes, offset: int = 0) -> tuple[int, int]:
    """(fh, open_flags)"""
    _need(body, offset + OPEN_OUT, "fuse_open_out")
    fh, flags, _ = abi.fuse_open_out.unpack_from(body, offset)
    return fh, flags


def decode_create(body: bytes) -> tuple[Entry, int]:
    """(entry, fh)"""
    return decode_entry(body), decode_open(body, ENTRY_OUT)[0]


def decode_write(body: bytes) -> int:
    _need(body, abi.fuse_write_out.size, "fuse_write_out")
    return abi.fuse_write_out.unpack_from(body)[0]


def decode_init(body: bytes) -> InitOut:
    if len(body) < abi.fuse_init_out.size:
        body = bytes(body) + bytes(abi.fuse_init_out.size - len(body))   # older servers: shorter
    v = abi.fuse_init_out.unpack_from(body)
    flags = v[3] | (v[10] << 32 if v[3] & abi.FUSE_INIT_EXT else 0)
    return InitOut(v[0], v[1], v[2], flags, v[4], v[5], v[6], v[7], v[8], v[9])


def decode_readdirplus(body: bytes) -> list[DirentPlus]:
    """Entries of a READDIRPLUS reply (each padded to 8 bytes)."""
    out, pos, n = [], 0, len(body)
    size = abi.fuse_direntplus.size
    while pos < n:
        _need(body, pos + size, "fuse_direntplus")
        v = abi.fuse_direntplus.unpack_from(body, pos)
        ino, off, namelen, typ = v[22:26]
        end = pos + size + namelen
        if namelen == 0 or end > n:
            raise FuseProtocolError(f"direntplus name of {namelen} bytes at {pos} overruns {n}")
        out.append(DirentPlus(Entry(v[0], v[1], v[2], v[3], Attr(*v[6:22])), ino, off, typ,
                              bytes(body[pos + size:end])))
        pos = (end + 7) & ~7
    return out


def decode_readdir(body: bytes) -> list[tuple[int, int, int, bytes]]:
    """(ino, off, type, name) of a READDIR reply."""
    out, pos, n = [], 0, len(body)
    size = abi.fuse_dirent.size
    while pos < n:
        _need(body, pos + size, "fuse_dirent")
        ino, off, namelen, typ = abi.fuse_dirent.unpack_from(body, pos)
        end = pos + size + namelen
        if namelen == 0 or end > n:
            raise FuseProtocolError(f"dirent name of {namelen} bytes at {pos} overruns {n}")
        out.append((ino, off, typ, bytes(body[pos + size:end])))
        pos = (end + 7) & ~7
    return out


def decode_out_header(data: bytes) -> tuple[int, int, int]:
    """(len, error, unique)"""
    _need(data, OUT_HEADER_SIZE, "fuse_out_header")
    return abi.fuse_out_header.unpack_from(data)


# -- one request queue -----------------------------------------------------------------------
ARGS_SIZE = 4096          # create_in + a 255-byte name, batch forgets of up to 254 nodes
_HDR = abi.fuse_in_header
_OUT = abi.fuse_out_header


@dataclass(slots=True)
class Reply:
    unique: int
    opcode: int
    error: int            # 0 or -errno
    length: int           # fuse_out_header.len (0 for requests without a reply)
    body: bytes           # reply body (empty for READ: see data_length/data_view)
    tag: object
    submitted: float      # perf_counter at submit
    completed: float      # perf_counter when reaped
    slot: int
    data_view: memoryview | None = None   # READ: the slot's data buffer (valid until reused)

    @property
    def data_length(self) -> int:
        return max(self.length - OUT_HEADER_SIZE, 0)

    @property
    def latency(self) -> float:
        return self.completed - self.submitted


@dataclass(slots=True)
class _Slot:
    index: int
    descs: list[int]      # descriptor indices owned by this slot for good
    hdr_gpa: int
    args_gpa: int
    out_gpa: int
    body_gpa: int
    data_gpa: int
    hdr: memoryview
    args: memoryview
    out: memoryview
    body: memoryview
    data: memoryview
    busy: bool = False
    unique: int = 0
    opcode: int = 0
    tag: object = None
    submitted: float = 0.0
    reply_size: int = 0
    read_into_data: bool = False


_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
MAX_LINKS = 5             # in header, arguments, payload | out header, body
NO_REPLY = (O.FORGET, O.BATCH_FORGET)


class SlotDriver(Driver):
    """A :class:`Driver` with a lean hot path for reusable request slots.

    ``push`` places a head whose descriptors its caller owns for good (no per-request
    free-list or bookkeeping), and ``completions`` returns raw ``(head, length)`` pairs
    without copying the writable buffers: the caller reads them in place.
    """

    def push(self, head: int) -> None:
        _U16.pack_into(self._avail, 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def completions(self) -> list[tuple[int, int]]:
        idx = self.used_idx            # acquire load: the elements below are visible
        last, size, used = self.last_used, self.size, self._used
        out = []
        while last != idx:
            out.append(_USED_ELEM.unpack_from(used, 4 + 8 * (last % size)))
            last = (last + 1) & 0xFFFF
        self.last_used = last
        return out


class RingChannel:
    """Driver side of one virtio-fs queue with ``depth`` reusable request slots."""

    def __init__(self, driver: SlotDriver, call_fd: int, kick, *, depth: int, data_size: int,
                 body_size: int = 64 << 10, uid: int = 0, gid: int = 0, pid: int = 0) -> None:
        mem = driver.memory
        self.driver = driver
        self.call_fd = call_fd
        self._kick = kick
        self.depth = depth
        self.data_size = data_size
        self.body_size = body_size
        self.creds = (uid, gid, pid)
        self._desc = driver._desc
        self.slots: list[_Slot] = []
        for i in range(depth):
            hdr = mem.alloc(IN_HEADER_SIZE, align=64)
            args = mem.alloc(ARGS_SIZE, align=64)
            out = mem.alloc(OUT_HEADER_SIZE, align=64)
            body = mem.alloc(body_size, align=64)
            data = mem.alloc(max(data_size, 1), align=4096)
            self.slots.append(_Slot(i, driver.take_descriptors(MAX_LINKS), hdr, args, out, body, data,
                                    mem.contiguous(hdr, IN_HEADER_SIZE), mem.contiguous(args, ARGS_SIZE),
                                    mem.contiguous(out, OUT_HEADER_SIZE), mem.contiguous(body, body_size),
                                    mem.contiguous(data, max(data_size, 1))))
        self._by_head = {slot.descs[0]: slot for slot in self.slots}
        self._free = list(range(depth - 1, -1, -1))
        self._next_unique = 1
        self.kicks = 0
        self.submitted = 0

    @property
    def in_flight(self) -> int:
        return self.depth - len(self._free)

    @property
    def has_free_slot(self) -> bool:
        return bool(self._free)

    def next_free_slot(self) -> _Slot:
        """The slot the next ``submit`` will use (e.g. to fill its data buffer first)."""
        return self.slots[self._free[-1]]

    def submit(self, op: Op, *, tag: object = None, publish: bool = True) -> int:
        """Lay out ``op`` in a free slot and make it available; returns its unique.

        Chain: in header | arguments | WRITE payload (device-readable), then out header |
        reply body or READ destination (device-writable); FORGETs have no writable part.
        """
        if not self._free:
            raise RuntimeError("no free slot: reap first")
        opcode, nodeid, args, reply_size, write_len, into_data = op
        nargs = len(args)
        if (nargs > ARGS_SIZE or write_len > self.data_size
                or reply_size > (self.data_size if into_data else self.body_size)):
            raise ValueError(f"{_opname(opcode)}: {nargs} argument bytes, {write_len} payload, "
                             f"{reply_size} reply do not fit the slot")
        slot = self.slots[self._free.pop()]
        unique = self._next_unique
        self._next_unique = unique + 2      # the kernel uses even uniques; any distinct value works
        uid, gid, pid = self.creds
        _HDR.pack_into(slot.hdr, 0, IN_HEADER_SIZE + nargs + write_len, opcode, unique, nodeid,
                       uid, gid, pid, 0, 0)
        links = [(slot.hdr_gpa, IN_HEADER_SIZE, 0)]
        if nargs:
            slot.args[:nargs] = args
            links.append((slot.args_gpa, nargs, 0))
        if write_len:
            links.append((slot.data_gpa, write_len, 0))
        if reply_size or opcode not in NO_REPLY:
            links.append((slot.out_gpa, OUT_HEADER_SIZE, F_WRITE))
            if reply_size:
                links.append((slot.data_gpa if into_data else slot.body_gpa, reply_size, F_WRITE))
        descs, table, pack = slot.descs, self._desc, _DESC.pack_into
        last = len(links) - 1
        for k in range(last):
            gpa, n, flags = links[k]
            pack(table, 16 * descs[k], gpa, n, flags | F_NEXT, descs[k + 1])
        gpa, n, flags = links[last]
        pack(table, 16 * descs[last], gpa, n, flags, 0)
        slot.busy = True
        slot.unique = unique
        slot.opcode = opcode
        slot.tag = tag
        slot.reply_size = reply_size
        slot.read_into_data = into_data
        slot.submitted = time.perf_counter()
        self.driver.push(descs[0])
        self.submitted += 1
        if publish:
            self.publish()
        return unique

    def publish(self) -> None:
        """Expose the pushed chains and kick if the device wants a kick."""
        drv = self.driver
        drv.publish()
        if drv.kick_needed():
            self._kick()
            self.kicks += 1

    def reap(self) -> list[Reply]:
        """Completed requests, checked; re-arms the used-buffer notification."""
        drv = self.driver
        out: list[Reply] = []
        while True:
            done = drv.completions()
            if not done:
                if drv.event_idx:
                    drv.set_used_event(drv.last_used)
                    hostsys.fence_seq_cst()
                    if drv.used_idx != drv.last_used:
                        continue
                return out
            now = time.perf_counter()
            by_head, free = self._by_head, self._free
            for head, used_len in done:
                slot = by_head.get(head)
                if slot is None or not slot.busy:
                    raise FuseProtocolError(f"used ring returned head {head}, which is not in flight")
                slot.busy = False
                out.append(self._reply(slot, used_len, now))
                free.append(slot.index)

    def _reply(self, slot: _Slot, used_len: int, now: float) -> Reply:
        if slot.opcode in NO_REPLY:
            if used_len:
                raise FuseProtocolError(f"{_opname(slot.opcode)}: device wrote {used_len} bytes "
                                        "to a request without reply")
            return Reply(slot.unique, slot.opcode, 0, 0, b"", slot.tag, slot.submitted, now, slot.index)
        if used_len < OUT_HEADER_SIZE:
            raise FuseProtocolError(f"{_opname(slot.opcode)}: used length {used_len} < out header")
        length, error, unique = _OUT.unpack_from(slot.out)
        if (unique != slot.unique or length != used_len or error > 0 or error < -4095
                or (error and length != OUT_HEADER_SIZE) or length - OUT_HEADER_SIZE > slot.reply_size):
            raise FuseProtocolError(self._bad_reply(slot, used_len, length, error, unique))
        if slot.read_into_data:
            return Reply(unique, slot.opcode, error, length, b"", slot.tag, slot.submitted, now,
                         slot.index, slot.data[:length - OUT_HEADER_SIZE])
        return Reply(unique, slot.opcode, error, length, slot.body[:length - OUT_HEADER_SIZE].tobytes(),
                     slot.tag, slot.submitted, now, slot.index)

    @staticmethod
    def _bad_reply(slot: _Slot, used_len: int, length: int, error: int, unique: int) -> str:
        name = _opname(slot.opcode)
        if unique != slot.unique:
            return f"{name}: reply unique {unique}, expected {slot.unique}"
        if length != used_len:
            return f"{name}: out header len {length} != used length {used_len}"
        if error > 0 or error < -4095:
            return f"{name}: error field {error}"
        if error:
            return f"{name}: error {error} with {length - OUT_HEADER_SIZE} body bytes"
        return f"{name}: {length - OUT_HEADER_SIZE} body bytes > {slot.reply_size} offered"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the device signals the call eventfd (or ``timeout``)."""
        ready, _, _ = select.select([self.call_fd], [], [], timeout)
        if ready:
            try:
                os.eventfd_read(self.call_fd)
            except BlockingIOError:
                pass
        return bool(ready)

    def call(self, op: Op, *, timeout: float = 10.0, data: bytes | None = None) -> Reply:
        """Submit one request and wait for its reply (other replies are an error here)."""
        if data is not None:
            slot = self.next_free_slot()
            slot.data[:len(data)] = data
        unique = self.submit(op)
        deadline = time.monotonic() + timeout
        while True:
            for r in self.reap():
                if r.unique == unique:
                    return r
                raise FuseProtocolError(f"unexpected reply {r.unique} while waiting for {unique}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{_opname(op.opcode)}: no reply within {timeout} s")
            self.wait(min(left, 0.5))


def _check(r: Reply) -> Reply:
    if r.error:
        raise FuseError(r.opcode, r.error)
    return r


# -- a whole device ----------------------------------------------------------------------------
@dataclass
class VirtioFsConnection:
    """A frontend + guest RAM + hiprio and request queues against one backend socket.

    ``channels[0]`` is the hiprio queue, ``channels[1:]`` the request queues
    (vhost-user-fs numbering).  ``backend_queues`` is what GET_QUEUE_NUM answered
    (``None`` when the backend did not negotiate MQ).
    """
    frontend: Frontend
    memory: FakeGuestMemory
    channels: list[RingChannel]
    drivers: list[SlotDriver]
    backend_queues: int | None
    init_out: InitOut | None = None
    lookups: dict[int, int] = field(default_factory=dict)

    @classmethod
    def connect(cls, socket_path: str, *, request_queues: int = 1, depth: int = 32,
                data_size: int = MiB, body_size: int = 64 << 10, queue_size: int = 256,
                connect_timeout: float = 10.0, uid: int | None = None, gid: int | None = None
                ) -> VirtioFsConnection:
        uid = os.getuid() if uid is None else uid
        gid = os.getgid() if gid is None else gid
        per_slot = IN_HEADER_SIZE + ARGS_SIZE + OUT_HEADER_SIZE + body_size + data_size + 4 * 4096
        need = (request_queues + 1) * (depth * per_slot + 3 * 4096 + 18 * queue_size) + MiB
        ram = max(16 * MiB, (need + MiB - 1) // MiB * MiB)
        frontend = _connect(socket_path, connect_timeout)
        memory = None
        try:
            nq = request_queues + 1
            try:
                frontend.init(nq)
            except FrontendError as exc:
                raise BackendCapabilityError(str(exc), frontend.queue_num) from None
            backend_queues = frontend.queue_num if frontend.protocol_features & (1 << vm.ProtocolFeature.MQ) else None
            memory = FakeGuestMemory([(0, ram)])
            frontend.set_memory(memory)
            event_idx = bool(frontend.features & (1 << vm.VIRTIO_RING_F_EVENT_IDX))
            drivers, channels = [], []
            for q in range(nq):
                drv = SlotDriver(memory, queue_size, event_idx=event_idx)
                vring = frontend.start_vring(q, queue_size, drv.desc_uva, drv.avail_uva, drv.used_uva)
                if event_idx:
                    drv.set_used_event(0)
                drivers.append(drv)
                # hiprio only ever carries FORGETs: few small slots
                channels.append(RingChannel(drv, vring.call_fd, vring.kick,
                                            depth=depth if q else 4, data_size=data_size if q else 0,
                                            body_size=body_size if q else 4096, uid=uid, gid=gid,
                                            pid=os.getpid()))
            # A request with a reply is a barrier: the backend has handled every earlier
            # message (they carry no ack), so no kick can reach a ring it has not enabled yet.
            frontend.get_u64(vm.Request.GET_FEATURES)
            return cls(frontend, memory, channels, drivers, backend_queues)
        except BaseException:
            frontend.close()
            if memory is not None:
                memory.close()
            raise

    @property
    def requests(self) -> list[RingChannel]:
        return self.channels[1:]

    # -- blocking helpers (queue 1 unless ``q`` is given) --------------------------------------
    def call(self, op: Op, *, q: int = 1, data: bytes | None = None, timeout: float = 10.0) -> Reply:
        return _check(self.channels[q].call(op, data=data, timeout=timeout))

    def init(self, **kw) -> InitOut:
        self.init_out = decode_init(self.call(encode_init(**kw)).body)
        return self.init_out

    def _count(self, nodeid: int, n: int = 1) -> None:
        if nodeid and nodeid != abi.ROOT_ID:
            self.lookups[nodeid] = self.lookups.get(nodeid, 0) + n

    def lookup(self, parent: int, name, *, q: int = 1) -> Entry:
        e = decode_entry(self.call(encode_lookup(parent, name), q=q).body)
        self._count(e.nodeid)
        return e

    def getattr(self, nodeid: int, *, q: int = 1) -> Attr:
        return decode_attr(self.call(encode_getattr(nodeid), q=q).body)

    def open(self, nodeid: int, flags: int = os.O_RDONLY, *, q: int = 1) -> int:
        return decode_open(self.call(encode_open(nodeid, flags), q=q).body)[0]

    def opendir(self, nodeid: int, *, q: int = 1) -> int:
        return decode_open(self.call(encode_opendir(nodeid), q=q).body)[0]

    def create(self, parent: int, name, flags: int = os.O_RDWR | os.O_CREAT | os.O_EXCL,
               mode: int = 0o100644, *, q: int = 1) -> tuple[Entry, int]:
        e, fh = decode_create(self.call(encode_create(parent, name, flags, mode), q=q).body)
        self._count(e.nodeid)
        return e, fh

    def mkdir(self, parent: int, name, mode: int = 0o755, *, q: int = 1) -> Entry:
        e = decode_entry(self.call(encode_mkdir(parent, name, mode), q=q).body)
        self._count(e.nodeid)
        return e

    def read(self, nodeid: int, fh: int, offset: int, size: int, *, q: int = 1) -> bytes:
        r = self.call(encode_read(nodeid, fh, offset, size), q=q)
        return bytes(r.data_view)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes, *, q: int = 1) -> int:
        return decode_write(self.call(encode_write(nodeid, fh, offset, len(data)), q=q, data=data).body)

    def release(self, nodeid: int, fh: int, *, dir: bool = False, q: int = 1) -> None:
        self.call(encode_release(nodeid, fh, dir=dir), q=q)

    def unlink(self, parent: int, name, *, q: int = 1) -> None:
        self.call(encode_unlink(parent, name), q=q)

    def rmdir(self, parent: int, name, *, q: int = 1) -> None:
        self.call(encode_rmdir(parent, name), q=q)

    def readdirplus(self, nodeid: int, fh: int, offset: int, size: int = 4096, *, q: int = 1
                    ) -> list[DirentPlus]:
        entries = decode_readdirplus(self.call(encode_readdirplus(nodeid, fh, offset, size), q=q).body)
        for d in entries:
            self._count(d.entry.nodeid)
        return entries

    def forget(self, nodeid: int, nlookup: int) -> None:
        """FORGET on the hiprio queue, like the kernel (no reply; waits for the used entry)."""
        self.channels[0].call(encode_forget(nodeid, nlookup))
        left = self.lookups.get(nodeid, 0) - nlookup
        if left > 0:
            self.lookups[nodeid] = left
        else:
            self.lookups.pop(nodeid, None)

    def forget_all(self) -> int:
        """BATCH_FORGET every lookup this connection counted; returns how many nodes."""
        items = sorted(self.lookups.items())
        per = (ARGS_SIZE - abi.fuse_batch_forget_in.size) // abi.fuse_forget_one.size
        for i in range(0, len(items), per):
            self.channels[0].call(encode_batch_forget(items[i:i + per]))
        self.lookups.clear()
        return len(items)

    def close(self) -> None:
        self.frontend.close()
        self.memory.close()


class BackendCapabilityError(FrontendError):
    """The backend cannot serve the requested configuration (e.g. too few queues)."""

    def __init__(self, message: str, backend_queues: int) -> None:
        super().__init__(message)
        self.backend_queues = backend_queues


def _connect(path: str, timeout: float) -> Frontend:
    """Connect, retrying while the backend has not created its socket yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Frontend.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


__all__ = [n for n in dir() if n.startswith(("encode_", "decode_"))] + [
    "Op", "Reply", "RingChannel", "SlotDriver", "VirtioFsConnection", "FuseError", "FuseProtocolError",
    "BackendCapabilityError", "Entry", "Attr", "DirentPlus", "InitOut", "in_header"]
