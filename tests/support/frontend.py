"""A simulated vhost-user frontend (the QEMU side) for tests and benchmarks.

It talks to a backend over a real unix socket with real fd passing and plays the
message sequence QEMU 7.2's vhost-user-fs device sends (hw/virtio/vhost-user.c,
vhost.c, vhost-user-fs.c):

    init:   GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
            GET_MAX_MEM_SLOTS, SET_BACKEND_REQ_FD (need_reply), SET_OWNER, GET_FEATURES,
            SET_VRING_CALL + SET_VRING_ERR per queue
    start:  SET_FEATURES, ADD_MEM_REG per region (need_reply; SET_MEM_TABLE without
            CONFIGURE_MEM_SLOTS), then per queue SET_VRING_NUM, SET_VRING_BASE,
            SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_ENABLE 1, and SET_VRING_CALL
            (vuf_start unmasks the guest notifiers after the rings run)
    stop:   SET_VRING_ENABLE 0 and GET_VRING_BASE per queue

(This is the sequence QEMU 7.2.22 sent to vhostfs in a booted guest, read from the
daemon's debug log.)

Guest RAM is anything with a ``table()`` method returning
``[(gpa, size, uva, mmap_offset, fd)]`` with fds the caller owns (the frontend closes
them after sending): :class:`MemfdRam` here, or ``tests.support.driver.FakeGuestMemory``
which also lays out rings.  Every reply is checked the way QEMU checks it; a failed
REPLY_ACK raises :class:`FrontendError`.
"""
from __future__ import annotations

import array
import mmap
import os
import socket
from dataclasses import dataclass

from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user import protocol as p

R = m.Request
PF = m.ProtocolFeature

# What QEMU 7.2's vhost-user frontend knows (VHOST_USER_PROTOCOL_FEATURE_MASK minus the
# features a vhost-user-fs device never uses).
QEMU_PROTOCOL_FEATURES = sum(1 << b for b in (
    PF.MQ, PF.LOG_SHMFD, PF.REPLY_ACK, PF.BACKEND_REQ, PF.BACKEND_SEND_FD, PF.CONFIG,
    PF.RESET_DEVICE, PF.CONFIGURE_MEM_SLOTS, PF.HOST_NOTIFIER, PF.INFLIGHT_SHMFD))
QEMU_FEATURES = ((1 << m.VIRTIO_F_VERSION_1) | (1 << m.VIRTIO_RING_F_INDIRECT_DESC)
                 | (1 << m.VIRTIO_RING_F_EVENT_IDX) | (1 << m.VHOST_USER_F_PROTOCOL_FEATURES))
UVA_BASE = 0x7F00_0000_0000


class FrontendError(Exception):
    """The backend answered wrongly or refused a request."""


class MemfdRam:
    """Guest RAM as memfd regions (``layout``: [(gpa, size)]), mapped here too.

    UVAs are ``UVA_BASE + gpa``, like a frontend's view of guest memory.
    """

    def __init__(self, layout=((0, 4 << 20),)) -> None:
        self.regions = []
        for gpa, size in layout:
            fd = os.memfd_create(f"guest-ram-{gpa:x}", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            self.regions.append((gpa, size, UVA_BASE + gpa, fd, mmap.mmap(fd, size)))

    def table(self) -> list[tuple[int, int, int, int, int]]:
        return [(gpa, size, uva, 0, os.dup(fd)) for gpa, size, uva, fd, _ in self.regions]

    def view(self, gpa: int, length: int) -> memoryview:
        for start, size, _, _, mapping in self.regions:
            if start <= gpa and gpa + length <= start + size:
                return memoryview(mapping)[gpa - start:gpa - start + length]
        raise ValueError(f"0x{gpa:x}+{length} not in one region")

    def close(self) -> None:
        for _, _, _, fd, _ in self.regions:
            os.close(fd)


@dataclass
class FrontendVring:
    index: int
    kick_fd: int          # the frontend writes here to kick
    call_fd: int          # the backend signals here
    err_fd: int           # the backend may signal a broken ring here

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def wait_call(self, timeout: float = 5.0) -> bool:
        import select
        ready, _, _ = select.select([self.call_fd], [], [], timeout)
        if ready:
            os.eventfd_read(self.call_fd)
        return bool(ready)

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class Frontend:
    """The QEMU side of one vhost-user connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.features = 0
        self.protocol_features = 0
        self.queue_num = 1
        self.max_mem_slots = 0
        self.backend_channel: socket.socket | None = None
        self.vrings: dict[int, FrontendVring] = {}

    @classmethod
    def connect(cls, path: str) -> Frontend:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(path)
        return cls(sock)

    # -- raw messages ----------------------------------------------------------------------
    def send(self, request: int, payload: bytes = b"", fds=(), *, need_reply: bool = False) -> None:
        data = p.encode_request(request, payload, need_reply=need_reply)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def recv_reply(self, request: int) -> bytes:
        header = self._recv_exact(m.HEADER.size)
        got, _flags, size = p.decode_reply_header(header)
        if got != request:
            raise FrontendError(f"expected a reply to {m.request_name(request)}, got {m.request_name(got)}")
        return self._recv_exact(size)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise FrontendError("backend closed the connection")
            buf += chunk
        return buf

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & (1 << PF.REPLY_ACK))

    def request(self, request: int, payload: bytes = b"", fds=(), *, ack: bool | None = None) -> None:
        """A request without a reply body; with ``ack`` (default: REPLY_ACK negotiated)
        sets NEED_REPLY and raises FrontendError on a non-zero ack."""
        ack = self.reply_ack if ack is None else ack
        self.send(request, payload, fds, need_reply=ack)
        if ack:
            reply = self.recv_reply(request)
            if len(reply) != 8:
                raise FrontendError(f"{m.request_name(request)}: ack of {len(reply)} bytes")
            if m.U64.unpack(reply)[0]:
                raise FrontendError(f"{m.request_name(request)}: backend reported failure")

    def get_u64(self, request: int) -> int:
        self.send(request)
        reply = self.recv_reply(request)
        if len(reply) != 8:
            raise FrontendError(f"{m.request_name(request)}: reply of {len(reply)} bytes")
        return m.U64.unpack(reply)[0]

    # -- individual requests ---------------------------------------------------------------
    def set_mem_table(self, table, *, ack: bool | None = None) -> None:
        try:
            self.request(R.SET_MEM_TABLE, p.encode_memory_table([row[:4] for row in table]),
                         [row[4] for row in table], ack=ack)
        finally:
            for row in table:
                os.close(row[4])

    def add_mem_reg(self, row, *, ack: bool | None = None) -> None:
        try:
            self.request(R.ADD_MEM_REG, p.encode_single_region(row[:4]), [row[4]], ack=ack)
        finally:
            os.close(row[4])

    def rem_mem_reg(self, region, *, ack: bool | None = None) -> None:
        self.request(R.REM_MEM_REG, p.encode_single_region(tuple(region[:4])), ack=ack)

    def set_vring_file(self, request: int, index: int, fd: int | None, *, ack: bool | None = False) -> None:
        value = index | (m.VRING_NOFD_MASK if fd is None else 0)
        self.request(request, m.U64.pack(value), [] if fd is None else [fd], ack=ack)

    def get_vring_base(self, index: int) -> int:
        self.send(R.GET_VRING_BASE, m.VRING_STATE.pack(index, 0))
        got_index, base = m.VRING_STATE.unpack(self.recv_reply(R.GET_VRING_BASE))
        if got_index != index:
            raise FrontendError(f"GET_VRING_BASE: reply for ring {got_index}, asked {index}")
        return base

    def get_config(self, offset: int, size: int) -> bytes:
        self.send(R.GET_CONFIG, m.CONFIG_HEADER.pack(offset, size, 0) + bytes(size))
        reply = self.recv_reply(R.GET_CONFIG)
        if len(reply) != m.CONFIG_HEADER.size + size:
            raise FrontendError(f"GET_CONFIG: reply of {len(reply)} bytes")
        return reply[m.CONFIG_HEADER.size:]

    # -- the QEMU 7.2 sequences ------------------------------------------------------------
    def init(self, num_queues: int) -> None:
        """vhost_user_backend_init + vhost_dev_init: negotiation, owner, call fds."""
        offered = self.get_u64(R.GET_FEATURES)
        if offered & (1 << m.VHOST_USER_F_PROTOCOL_FEATURES):
            backend_pf = self.get_u64(R.GET_PROTOCOL_FEATURES)
            self.protocol_features = backend_pf & QEMU_PROTOCOL_FEATURES
            self.request(R.SET_PROTOCOL_FEATURES, m.U64.pack(self.protocol_features), ack=False)
            if self.protocol_features & (1 << PF.MQ):
                self.queue_num = self.get_u64(R.GET_QUEUE_NUM)
                if self.queue_num < num_queues:
                    raise FrontendError(f"backend supports {self.queue_num} queues, {num_queues} needed")
            if self.protocol_features & (1 << PF.CONFIGURE_MEM_SLOTS):
                self.max_mem_slots = self.get_u64(R.GET_MAX_MEM_SLOTS)
            if self.protocol_features & (1 << PF.BACKEND_REQ):
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                try:
                    self.request(R.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
                finally:
                    theirs.close()
                self.backend_channel = ours
        self.request(R.SET_OWNER, ack=False)
        self.features = self.get_u64(R.GET_FEATURES) & QEMU_FEATURES
        for index in range(num_queues):
            call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            err_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.vrings[index] = FrontendVring(index, kick_fd, call_fd, err_fd)
            self.set_vring_file(R.SET_VRING_CALL, index, call_fd)
            self.set_vring_file(R.SET_VRING_ERR, index, err_fd)

    def set_memory(self, memory) -> None:
        """SET_FEATURES, then the memory table the way QEMU sends it."""
        self.request(R.SET_FEATURES, m.U64.pack(self.features), ack=False)
        table = memory.table()
        if self.protocol_features & (1 << PF.CONFIGURE_MEM_SLOTS):
            for row in table:
                self.add_mem_reg(row)
        else:
            self.set_mem_table(table)

    def start_vring(self, index: int, size: int, desc_uva: int, avail_uva: int, used_uva: int,
                    base: int = 0) -> FrontendVring:
        """vhost_virtqueue_start for one ring, SET_VRING_ENABLE 1, then the call fd
        again (QEMU unmasks the guest notifier of a running ring)."""
        vring = self.vrings[index]
        self.request(R.SET_VRING_NUM, m.VRING_STATE.pack(index, size), ack=False)
        self.request(R.SET_VRING_BASE, m.VRING_STATE.pack(index, base), ack=False)
        self.request(R.SET_VRING_ADDR, p.encode_vring_addr(index, desc_uva, used_uva, avail_uva), ack=False)
        self.set_vring_file(R.SET_VRING_KICK, index, vring.kick_fd)
        if self.features & (1 << m.VHOST_USER_F_PROTOCOL_FEATURES):
            self.request(R.SET_VRING_ENABLE, m.VRING_STATE.pack(index, 1), ack=False)
        self.set_vring_file(R.SET_VRING_CALL, index, vring.call_fd)
        return vring

    def stop_vring(self, index: int) -> int:
        """vhost_virtqueue_stop: disable, then GET_VRING_BASE (the ring's last_avail_idx)."""
        if self.features & (1 << m.VHOST_USER_F_PROTOCOL_FEATURES):
            self.request(R.SET_VRING_ENABLE, m.VRING_STATE.pack(index, 0), ack=False)
        return self.get_vring_base(index)

    def close(self) -> None:
        for vring in self.vrings.values():
            vring.close()
        self.vrings.clear()
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.sock.close()
