"""Hypothesis: any message sequence leaves the device consistent and leaks no fd.

The frontend is validated like the guest: whatever it sends, ``handle`` either returns
(a reply or None) or raises FatalProtocolError; it never raises anything else, every
fd it was given is closed or owned, and running rings always have their fds open.
"""
from __future__ import annotations

import gc
import os
import uuid

from hypothesis import HealthCheck, given, settings, strategies as st

from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user import protocol as p
from vhostfs.vhost_user.device import VIRTIO_FEATURES, VhostUserDevice
from vhostfs.vhost_user.protocol import FatalProtocolError, Message

R = m.Request
UVA = 0x7F00_0000_0000


class Hooks:
    def __init__(self):
        self.running = {}

    def start_queue(self, index, queue, kick_fd, call_fd):
        assert index not in self.running
        os.fstat(kick_fd)
        if call_fd is not None:
            os.fstat(call_fd)
        self.running[index] = queue

    def stop_queue(self, index):
        return self.running.pop(index).last_avail_idx

    def memory_changed(self, memory):
        pass

    def reset(self):
        assert not self.running


class FdTracker:
    """The fds one example hands the device, each with an identity no other fd shares.

    Counting every open fd of the process would also count fds that threads of earlier
    tests open or close meanwhile; instead each memfd gets a name unique to the example
    and each event-style fd is the read end of a pipe (a unique pipe inode), so "leaked"
    means exactly: one of *these* is still open somewhere in this process.
    """

    def __init__(self) -> None:
        self.token = f"vhufuzz-{uuid.uuid4().hex}"
        self.pipes: set[str] = set()

    def memfd(self, size=0x10000) -> int:
        fd = os.memfd_create(self.token, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return fd

    def eventlike(self) -> int:
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(w)
        self.pipes.add(os.readlink(f"/proc/self/fd/{r}"))
        return r

    def still_open(self) -> list[str]:
        left = []
        for name in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{name}")
            except FileNotFoundError:
                continue
            if self.token in target or target in self.pipes:
                left.append(target)
        return left


small = st.integers(0, 3)
addr = st.sampled_from([UVA, UVA + 0x1000, UVA + 0x2000, UVA + 0x8002, 0, (1 << 64) - 8])

messages = st.one_of(
    st.tuples(st.just(R.SET_FEATURES), st.sampled_from([VIRTIO_FEATURES, 0, 1 << 26]).map(m.U64.pack), st.just(0)),
    st.tuples(st.just(R.SET_PROTOCOL_FEATURES), st.sampled_from([0xA42B, 0, 1 << 14]).map(m.U64.pack), st.just(0)),
    st.tuples(st.just(R.SET_MEM_TABLE),
              st.sampled_from([p.encode_memory_table([(0, 0x10000, UVA, 0)]),
                               p.encode_memory_table([(0, 0x20000, UVA, 0)]),
                               p.encode_memory_table([(0, 0x10000, UVA, 0), (0x8000, 0x10000, UVA, 0)])]),
              small),
    st.tuples(st.just(R.ADD_MEM_REG), st.sampled_from([
        p.encode_single_region((0x100000, 0x10000, UVA + 0x100000, 0)),
        p.encode_single_region((0, 0x10000, UVA, 0))]), small),
    st.tuples(st.just(R.REM_MEM_REG), st.sampled_from([
        p.encode_single_region((0x100000, 0x10000, UVA + 0x100000, 0)),
        p.encode_single_region((0, 0x10000, UVA, 0))]), small),
    st.tuples(st.sampled_from([R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ENABLE, R.GET_VRING_BASE]),
              st.tuples(small, st.sampled_from([0, 1, 2, 16, 256, 1 << 16])).map(lambda t: m.VRING_STATE.pack(*t)),
              st.just(0)),
    st.tuples(st.just(R.SET_VRING_ADDR), st.tuples(small, addr, addr, addr).map(
        lambda t: p.encode_vring_addr(t[0], t[1], t[3], t[2])), st.just(0)),
    st.tuples(st.sampled_from([R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR]),
              st.sampled_from([0, 1, 2, 0x100, 0x101, 0x200]).map(m.U64.pack), small),
    st.tuples(st.sampled_from([R.RESET_DEVICE, R.RESET_OWNER, R.SET_OWNER, R.GET_FEATURES,
                               R.SET_BACKEND_REQ_FD, R.SET_LOG_FD, R.GET_CONFIG, 0, 77]),
              st.sampled_from([b"", bytes(8)]), small),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(messages, st.booleans()), max_size=25))
def test_random_message_sequences(seq):
    tracker = FdTracker()
    msg = None
    hooks = Hooks()
    dev = VhostUserDevice(hooks, tag="fuzz", num_request_queues=1)
    for (req, payload, nfds), need_reply in seq:
        fds = [tracker.memfd() if req in (R.SET_MEM_TABLE, R.ADD_MEM_REG) else tracker.eventlike()
               for _ in range(nfds)]
        msg = Message(req, m.VERSION | (m.FLAG_NEED_REPLY if need_reply else 0), payload, fds)
        try:
            reply = dev.handle(msg)
        except FatalProtocolError:
            assert not msg.fds
            break
        assert not msg.fds
        if reply is not None:
            request, flags, size = m.HEADER.unpack_from(reply)
            assert request == req and flags == m.VERSION | m.FLAG_REPLY and size == len(reply) - 12
        for index, queue in hooks.running.items():
            ring = dev.rings[index]
            assert ring.running and ring.kick_fd is not None
            os.fstat(ring.kick_fd)
    dev.shutdown()
    assert hooks.running == {}
    del dev, hooks, msg
    gc.collect()                 # a Python mmap holds a dup of its fd until it is freed
    assert tracker.still_open() == []
