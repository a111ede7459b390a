"""Byte-level fuzz targets shared by the hypothesis tests and the atheris runner.

Each target takes arbitrary bytes, drives one decoder that the guest (or the
frontend) controls, and checks the invariants the rest of vhostfs relies on.  A target
raising anything but its documented rejection is a bug.

vhost_user(data)
    A vhost-user byte stream from the frontend (``data[0] % 4`` memfds arrive with it),
    received by ``transport.Connection`` and handled by a ``VhostUserDevice``: each
    message gets a well-formed reply or none, or the connection ends with
    ``FatalProtocolError``; every received fd is closed or owned; no fd leaks once the
    device is shut down; running rings have their fds.
chain(data)
    Fills a split ring (descriptor table, indirect tables, avail ring and idx) in fake
    guest memory; ``SplitQueue.pop`` returns chains whose lengths fit in 32 bits, raises
    ``BadChain`` with a head inside the ring (slot consumed) or ``QueueBroken``.
fuse(data)
    One FUSE request (opcode, nodeid, length error, reply capacity and body from the
    bytes) served by ``FuseServer`` over a real ``PassthroughFs`` in a temporary
    directory: a well-framed reply with ``-4095 <= error <= 0`` that fits the buffer, no
    reply only for FORGET/BATCH_FORGET/INTERRUPT, or a ``VhostfsError``; the file next to
    the share is never touched.  Requests that may wait forever (SETLKW) or allocate
    disk space without bound (FALLOCATE, COPY_FILE_RANGE) are not sent.
"""
from __future__ import annotations

import gc
import os
import socket
import struct
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(os.path.dirname(_HERE)), os.path.join(os.path.dirname(_HERE), "unit")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from test_fuse_fakes import FakeReader, FakeWriter  # noqa: E402
from tests.support.driver import FAR_BASE, GAP_GPA, STRIPE_BASE, FakeGuestMemory  # noqa: E402
from vhostfs.errors import QueueBroken, VhostfsError  # noqa: E402
from vhostfs.fs.passthrough import PassthroughFs  # noqa: E402
from vhostfs.fuse import abi  # noqa: E402
from vhostfs.fuse.server import FuseServer  # noqa: E402
from vhostfs.virtqueue.chain import BadChain  # noqa: E402
from vhostfs.virtqueue.split import SplitQueue  # noqa: E402
from vhostfs.vhost_user import messages as m  # noqa: E402
from vhostfs.vhost_user.device import VhostUserDevice  # noqa: E402
from vhostfs.vhost_user.protocol import FatalProtocolError  # noqa: E402
from vhostfs.vhost_user.transport import Connection  # noqa: E402


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- vhost-user --------------------------------------------------------------------------

class _Hooks:
    def __init__(self) -> None:
        self.running: dict = {}

    def start_queue(self, index, queue, kick_fd, call_fd):
        os.fstat(kick_fd)
        self.running[index] = queue

    def stop_queue(self, index):
        q = self.running.pop(index, None)
        return None if q is None else q.last_avail_idx

    def set_call_fd(self, index, call_fd):
        pass

    def memory_changed(self, memory):
        pass

    def reset(self):
        self.running.clear()


MAX_STREAM = 60 << 10       # fits a socketpair buffer: no reader thread needed


def vhost_user(data: bytes) -> None:
    nfds, stream = (data[0] % 4, data[1:MAX_STREAM]) if data else (0, b"")
    before = _fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    fds = []
    for _ in range(nfds):
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, 0x10000)
        fds.append(fd)
    try:
        if stream:
            b.sendmsg([stream], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{nfds}i", *fds))]
                      if fds else [])
    finally:
        for fd in fds:
            os.close(fd)
    b.shutdown(socket.SHUT_WR)
    hooks = _Hooks()
    dev = VhostUserDevice(hooks, tag="fuzz", num_request_queues=1)
    conn = Connection(a)
    try:
        while True:
            try:
                msg = conn.receive()
            except FatalProtocolError:
                break
            if msg is None:
                break
            try:
                reply = dev.handle(msg)
            except FatalProtocolError:
                assert not msg.fds, "fds of a fatal message left open"
                break
            assert not msg.fds, "fds neither closed nor owned"
            if reply is not None:
                request, flags, size = m.HEADER.unpack_from(reply)
                assert request == msg.request and size == len(reply) - m.HEADER.size
                assert flags == m.VERSION | m.FLAG_REPLY
            for index in hooks.running:
                ring = dev.rings[index]
                assert ring.kick_fd is not None
                os.fstat(ring.kick_fd)
    finally:
        dev.shutdown()
        a.close()
        b.close()
    assert not hooks.running, "rings left running after shutdown"
    del dev, hooks, conn
    if _fd_count() != before:
        gc.collect()             # a Python mmap holds a dup of its fd until it is freed
        assert _fd_count() == before, "fd leak"


# -- descriptor chains -------------------------------------------------------------------

_MEM = None
_RINGS: dict[int, tuple[int, int, int]] = {}
_SCRATCH = 0
_DESC = struct.Struct("<QIHH")
SIZES = (1, 2, 4, 8, 16, 256)


def _bases():
    return (_SCRATCH, 0, 0x1000, STRIPE_BASE - 16, STRIPE_BASE + (64 << 10) - 8, GAP_GPA,
            FAR_BASE, FAR_BASE + (1 << 20) - 16, (1 << 64) - 0x1000, (16 << 20) - 1)


def _memory():
    global _MEM, _SCRATCH
    if _MEM is None:
        _MEM = FakeGuestMemory.default()
        for size in SIZES:
            desc = _MEM.alloc(16 * size, align=4096)
            avail = _MEM.alloc(6 + 2 * size, align=4096)
            used = _MEM.alloc(6 + 8 * size, align=4096)
            _RINGS[size] = (desc, avail, used)
        _SCRATCH = _MEM.alloc(64 * 16, align=16)
    return _MEM


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk.ljust(n, b"\0")

    def u(self, fmt: str) -> int:
        st = struct.Struct("<" + fmt)
        return st.unpack(self.take(st.size))[0]


def _descriptor(r: _Bytes, size: int) -> bytes:
    sel, raw_addr, raw_len, flags, nxt = r.u("B"), r.u("I"), r.u("I"), r.u("B"), r.u("H")
    bases = _bases()
    addr = (bases[sel % len(bases)] + (raw_addr % 0x20000 if sel & 0x80 else raw_addr % 256)) \
        & ((1 << 64) - 1)
    length = raw_len if flags & 0x80 else raw_len % 8192
    if flags & 0x40:
        nxt %= size + 1
    return _DESC.pack(addr, length, flags & 7, nxt)


def chain(data: bytes) -> None:
    mem = _memory()
    r = _Bytes(data)
    size = SIZES[r.u("B") % len(SIZES)]
    desc, avail, used = _RINGS[size]
    mem.write(desc, b"".join(_descriptor(r, size) for _ in range(size)))
    mem.write(_SCRATCH, b"".join(_descriptor(r, 64) for _ in range(64)))
    slots = [r.u("H") for _ in range(size)]
    idx = r.u("H")
    mem.write(avail, struct.pack("<HH", 0, idx if idx & 0x8000 else idx % (size + 2))
              + b"".join(struct.pack("<H", s if s & 0x8000 else s % (size + 1)) for s in slots))
    mem.write(used, bytes(6 + 8 * size))
    q = SplitQueue(0, size, mem.gpa_to_uva(desc), mem.gpa_to_uva(avail), mem.gpa_to_uva(used),
                   event_idx=bool(size & 1))
    q.attach(mem)
    for _ in range(size + 2):
        try:
            c = q.pop()
        except BadChain as exc:
            assert 0 <= exc.head < size, exc.head
            q.add_used(exc.head, 0)
            continue
        except QueueBroken:
            return
        if c is None:
            return
        assert 0 <= c.head < size
        assert c.readable_len + c.writable_len <= 0xFFFF_FFFF
        assert sum(len(v) for v in c.readable) == c.readable_len
        assert sum(len(v) for v in c.writable) == c.writable_len
        q.add_used(c.head, 0)


# -- FUSE --------------------------------------------------------------------------------

_FUSE = None
_SKIP = {abi.Opcode.DESTROY, abi.Opcode.INIT}
for _name in ("SETLKW", "FALLOCATE", "COPY_FILE_RANGE", "COPY_FILE_RANGE_64"):
    if hasattr(abi.Opcode, _name):
        _SKIP.add(getattr(abi.Opcode, _name))
OPCODES = [op.value for op in abi.Opcode if op not in _SKIP] + [0, 99, 4096]
_UNSAFE = {op.value for op in _SKIP} - {abi.Opcode.INIT.value}
NODEIDS = (0, 1, 2, 3, 4, 5, 8, 2**63, 2**64 - 1)
CAPACITIES = (16, 17, 100, 4096, 1 << 20)


def _fuse():
    global _FUSE
    if _FUSE is None:
        top = tempfile.mkdtemp(prefix="vhostfs-fuzz-")
        share = os.path.join(top, "share")
        os.mkdir(share)
        sentinel = os.path.join(top, "outside")
        with open(sentinel, "wb") as f:
            f.write(b"SECRET")
        for name in ("a", "b"):
            with open(os.path.join(share, name), "wb") as f:
                f.write(b"x" * 100)
        os.symlink(sentinel, os.path.join(share, "to_outside"))
        os.symlink("..", os.path.join(share, "up"))
        os.mkdir(os.path.join(share, "d"))
        server = FuseServer(PassthroughFs(share))
        init = abi.fuse_in_header.pack(104, abi.Opcode.INIT, 1, 0, 0, 0, 1, 0, 0) + \
            abi.fuse_init_in.pack(7, 38, 0, 0xFFFFFFFF, 0, *([0] * 11))
        server.handle(FakeReader(init), FakeWriter(4096))
        _FUSE = (server, top, sentinel, os.stat(sentinel))
    return _FUSE


def fuse(data: bytes) -> None:
    server, top, sentinel, st0 = _fuse()
    r = _Bytes(data)
    sel = r.u("B")
    opcode = OPCODES[sel % len(OPCODES)] if sel != 255 else r.u("I")
    if opcode in _UNSAFE:
        return
    nodeid = NODEIDS[r.u("B") % len(NODEIDS)]
    delta = (0, 0, 0, -1, 1, 100)[r.u("B") % 6]
    capacity = CAPACITIES[r.u("B") % len(CAPACITIES)]
    body = data[r.pos:r.pos + 4096]
    request = abi.fuse_in_header.pack(max(40 + len(body) + delta, 0) & 0xFFFFFFFF, opcode, 7,
                                      nodeid, 0, 0, 1, 0, 0) + body
    writer = FakeWriter(capacity)
    try:
        n = server.handle(FakeReader(request), writer)
    except VhostfsError:
        n = None
    if n == 0:
        assert opcode in (abi.Opcode.FORGET, abi.Opcode.BATCH_FORGET, abi.Opcode.INTERRUPT), opcode
    elif n is not None:
        length, error, unique = abi.fuse_out_header.unpack_from(writer.buf)
        assert (length, unique) == (n, 7)
        assert -4095 <= error <= 0
        assert n <= capacity
    st = os.stat(sentinel)
    assert (st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid) == \
        (st0.st_size, st0.st_mtime_ns, st0.st_mode, st0.st_uid), "file outside the share changed"
    assert sorted(os.listdir(top)) == ["outside", "share"], "something appeared outside the share"


TARGETS = {"vhost_user": vhost_user, "chain": chain, "fuse": fuse}
