"""VhostUserDevice request handlers against stub hooks (no sockets)."""
from __future__ import annotations

import os
import struct

import pytest

from vhostfs.errors import ConfigError, GuestMemoryError
from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user import protocol as p
from vhostfs.vhost_user.device import PROTOCOL_FEATURES, VIRTIO_FEATURES, VhostUserDevice
from vhostfs.vhost_user.protocol import FatalProtocolError, Message

R = m.Request
PF = m.ProtocolFeature
RAM_UVA = 0x7F00_0000_0000
RAM_SIZE = 1 << 20
ALL_PROTOCOL = PROTOCOL_FEATURES


class FakeQueue:
    def __init__(self, index, size, desc, avail, used, *, event_idx, last_avail_idx):
        self.args = (index, size, desc, avail, used)
        self.event_idx = event_idx
        self.last_avail_idx = last_avail_idx
        self.attached = None

    def attach(self, memory):
        index, size, desc, avail, used = self.args
        memory.uva_to_gpa(desc, 16 * size)
        memory.uva_to_gpa(avail, 6 + 2 * size)
        memory.uva_to_gpa(used, 6 + 8 * size)
        self.attached = memory


class Hooks:
    def __init__(self):
        self.calls = []
        self.running = {}

    def start_queue(self, index, queue, kick_fd, call_fd):
        os.fstat(kick_fd)                      # must be open while running
        self.calls.append(("start", index))
        self.running[index] = (queue, kick_fd, call_fd)

    def stop_queue(self, index):
        self.calls.append(("stop", index))
        queue, _, _ = self.running.pop(index)
        return queue.last_avail_idx + 5        # pretend 5 chains were served

    def memory_changed(self, memory):
        self.calls.append(("memory", len(memory)))

    def reset(self):
        self.calls.append(("reset",))


def memfd(size=RAM_SIZE):
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def efd():
    return os.eventfd(0, os.EFD_CLOEXEC)


def closed(fd):
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def call(dev, req, payload=b"", fds=(), need_reply=False):
    flags = m.VERSION | (m.FLAG_NEED_REPLY if need_reply else 0)
    return dev.handle(Message(req, flags, payload, list(fds)))


def ack_value(reply):
    assert reply is not None
    req, flags, size = m.HEADER.unpack_from(reply)
    assert flags == m.VERSION | m.FLAG_REPLY and size == 8
    return m.U64.unpack_from(reply, 12)[0]


def u64(v):
    return m.U64.pack(v)


def state(i, n):
    return m.VRING_STATE.pack(i, n)


@pytest.fixture
def hooks():
    return Hooks()


@pytest.fixture
def dev(hooks):
    d = VhostUserDevice(hooks, tag="myfs", num_request_queues=1, queue_factory=FakeQueue)
    yield d
    d.shutdown()


def negotiate(dev, features=VIRTIO_FEATURES, protocol=ALL_PROTOCOL):
    call(dev, R.SET_FEATURES, u64(features))
    call(dev, R.SET_PROTOCOL_FEATURES, u64(protocol))
    assert ack_value(call(dev, R.SET_MEM_TABLE, p.encode_memory_table([(0, RAM_SIZE, RAM_UVA, 0)]),
                          [memfd()], need_reply=True)) == 0


def setup_ring(dev, index=0, num=256, base=0, enable=True):
    call(dev, R.SET_VRING_NUM, state(index, num))
    call(dev, R.SET_VRING_BASE, state(index, base))
    assert ack_value(call(dev, R.SET_VRING_ADDR,
                          p.encode_vring_addr(index, RAM_UVA, RAM_UVA + 0x8000, RAM_UVA + 0x4000),
                          need_reply=True)) == 0
    call(dev, R.SET_VRING_CALL, u64(index), [efd()])
    assert ack_value(call(dev, R.SET_VRING_KICK, u64(index), [efd()], need_reply=True)) == 0
    if enable:
        assert ack_value(call(dev, R.SET_VRING_ENABLE, state(index, 1), need_reply=True)) == 0


# -- negotiation --------------------------------------------------------------------------------
def test_get_features_and_protocol_features(dev):
    assert ack_value(call(dev, R.GET_FEATURES)) == VIRTIO_FEATURES == (1 << 32 | 1 << 30 | 1 << 29 | 1 << 28
                                                                       | 1 << m.VHOST_F_LOG_ALL)
    pf = ack_value(call(dev, R.GET_PROTOCOL_FEATURES))
    for bit in (PF.MQ, PF.LOG_SHMFD, PF.REPLY_ACK, PF.BACKEND_REQ, PF.BACKEND_SEND_FD,
                PF.CONFIGURE_MEM_SLOTS, PF.RESET_DEVICE, PF.CONFIG):
        assert pf & (1 << bit)
    assert pf == ALL_PROTOCOL | 1 << PF.CONFIG
    assert not pf & (1 << PF.DEVICE_STATE)       # only with a migration backend


def test_config_only_offered_with_a_tag(hooks):
    d = VhostUserDevice(hooks, tag=None, num_request_queues=2)
    assert not ack_value(call(d, R.GET_PROTOCOL_FEATURES)) & (1 << PF.CONFIG)
    assert call(d, R.GET_CONFIG, struct.pack("<III", 0, 40, 0) + bytes(40)) == p.encode_reply(R.GET_CONFIG)


def test_queue_num_and_mem_slots(dev, hooks):
    assert ack_value(call(dev, R.GET_QUEUE_NUM)) == 2
    assert ack_value(call(dev, R.GET_MAX_MEM_SLOTS)) == 509
    d = VhostUserDevice(hooks, tag=None, num_request_queues=4, max_mem_slots=32)
    assert ack_value(call(d, R.GET_QUEUE_NUM)) == 5
    assert ack_value(call(d, R.GET_MAX_MEM_SLOTS)) == 32


def test_unoffered_features_are_refused(dev):
    assert ack_value(call(dev, R.SET_FEATURES, u64(1 << 24), need_reply=True)) == 1
    assert ack_value(call(dev, R.SET_PROTOCOL_FEATURES, u64(1 << PF.INBAND_NOTIFICATIONS), need_reply=True)) == 1
    assert ack_value(call(dev, R.SET_FEATURES, u64(VIRTIO_FEATURES), need_reply=True)) == 0
    assert dev.acked_features == VIRTIO_FEATURES


def test_set_owner_acks_only_when_asked(dev):
    assert call(dev, R.SET_OWNER) is None
    assert ack_value(call(dev, R.SET_OWNER, need_reply=True)) == 0
    assert dev.owner


def test_bad_construction():
    with pytest.raises(ConfigError):
        VhostUserDevice(Hooks(), tag="x" * 37, num_request_queues=1)
    with pytest.raises(ConfigError):
        VhostUserDevice(Hooks(), tag=None, num_request_queues=0)


# -- config space -------------------------------------------------------------------------------
def test_get_config(dev):
    reply = call(dev, R.GET_CONFIG, struct.pack("<III", 0, 40, 0) + bytes(40))
    assert reply[:12] == m.HEADER.pack(R.GET_CONFIG, 5, 52)
    offset, size, flags = m.CONFIG_HEADER.unpack_from(reply, 12)
    assert (offset, size, flags) == (0, 40, 0)
    assert reply[24:] == b"myfs" + bytes(32) + struct.pack("<I", 1)
    part = call(dev, R.GET_CONFIG, struct.pack("<III", 36, 4, 0) + bytes(4))
    assert part[24:] == struct.pack("<I", 1)


@pytest.mark.parametrize("payload", [
    struct.pack("<III", 0, 41, 0) + bytes(41),     # beyond the 40-byte space
    struct.pack("<III", 40, 1, 0) + bytes(1),
    struct.pack("<III", 0, 4, 0) + bytes(3),       # size mismatch
])
def test_get_config_errors_reply_empty(dev, payload):
    assert call(dev, R.GET_CONFIG, payload) == p.encode_reply(R.GET_CONFIG)


def test_set_config_is_read_only(dev):
    cfg = b"myfs" + bytes(32) + struct.pack("<I", 1)
    same = struct.pack("<III", 0, 40, m.CONFIG_FLAG_MIGRATION) + cfg
    assert ack_value(call(dev, R.SET_CONFIG, same, need_reply=True)) == 0
    writable = struct.pack("<III", 0, 40, m.CONFIG_FLAG_WRITABLE) + cfg
    assert ack_value(call(dev, R.SET_CONFIG, writable, need_reply=True)) == 1
    changed = struct.pack("<III", 0, 4, m.CONFIG_FLAG_MIGRATION) + b"evil"
    assert ack_value(call(dev, R.SET_CONFIG, changed, need_reply=True)) == 1


# -- memory -------------------------------------------------------------------------------------
def test_set_mem_table_maps_and_notifies(dev, hooks):
    fds = [memfd(0x10000), memfd(0x10000)]
    table = p.encode_memory_table([(0, 0x10000, RAM_UVA, 0), (0x100000, 0x10000, RAM_UVA + 0x100000, 0)])
    assert ack_value(call(dev, R.SET_MEM_TABLE, table, fds, need_reply=True)) == 0
    assert hooks.calls == [("memory", 2)]
    assert all(closed(fd) for fd in fds)
    assert dev.memory.uva_to_gpa(RAM_UVA + 0x100010, 8) == 0x100010


@pytest.mark.parametrize("regions,nfds", [
    ([(0, 0x2000, RAM_UVA, 0), (0x1000, 0x1000, RAM_UVA + 0x10000, 0)], 2),   # overlap
    ([(0, 0, RAM_UVA, 0)], 1),                                                # zero size
    ([(0, 0x1000, RAM_UVA, 0)], 0),                                           # fd missing
    ([(0, 0x1000, RAM_UVA, 0)], 2),                                           # extra fd
    ([(0, 0x20000, RAM_UVA, 0)], 1),                                          # file too small
])
def test_bad_mem_tables_fail_and_close_fds(dev, hooks, regions, nfds):
    fds = [memfd(0x10000) for _ in range(nfds)]
    assert ack_value(call(dev, R.SET_MEM_TABLE, p.encode_memory_table(regions), fds, need_reply=True)) == 1
    assert all(closed(fd) for fd in fds)
    assert dev.memory is None and hooks.calls == []


def test_add_and_remove_regions(dev, hooks):
    r1 = (0, 0x10000, RAM_UVA, 0)
    r2 = (0x100000, 0x10000, RAM_UVA + 0x100000, 0)
    fd = memfd(0x10000)
    assert ack_value(call(dev, R.ADD_MEM_REG, p.encode_single_region(r1), [fd], need_reply=True)) == 0
    assert closed(fd)
    assert ack_value(call(dev, R.ADD_MEM_REG, p.encode_single_region(r2), [memfd(0x10000)], need_reply=True)) == 0
    assert len(dev.memory) == 2
    # overlapping add is refused, the table unchanged
    overlap = (0x8000, 0x10000, RAM_UVA + 0x200000, 0)
    assert ack_value(call(dev, R.ADD_MEM_REG, p.encode_single_region(overlap), [memfd(0x20000)],
                          need_reply=True)) == 1
    # removal: a stray fd is tolerated and closed (vhost-user.rst REM_MEM_REG)
    stray = memfd(16)
    assert ack_value(call(dev, R.REM_MEM_REG, p.encode_single_region(r1), [stray], need_reply=True)) == 0
    assert closed(stray) and len(dev.memory) == 1
    assert ack_value(call(dev, R.REM_MEM_REG, p.encode_single_region(r1), need_reply=True)) == 1
    with pytest.raises(GuestMemoryError):
        dev.memory.translate(0, 1)
    assert hooks.calls == [("memory", 1), ("memory", 2), ("memory", 1)]


def test_add_mem_reg_respects_slot_limit(hooks):
    d = VhostUserDevice(hooks, tag=None, num_request_queues=1, max_mem_slots=1)
    assert ack_value(call(d, R.ADD_MEM_REG, p.encode_single_region((0, 0x1000, RAM_UVA, 0)),
                          [memfd(0x1000)], need_reply=True)) == 0
    fd = memfd(0x1000)
    assert ack_value(call(d, R.ADD_MEM_REG, p.encode_single_region((0x1000, 0x1000, RAM_UVA + 0x1000, 0)),
                          [fd], need_reply=True)) == 1
    assert closed(fd)


def test_add_mem_reg_needs_exactly_one_fd(dev):
    fds = [memfd(0x1000), memfd(0x1000)]
    assert ack_value(call(dev, R.ADD_MEM_REG, p.encode_single_region((0, 0x1000, RAM_UVA, 0)),
                          fds, need_reply=True)) == 1
    assert all(closed(fd) for fd in fds)


# -- rings --------------------------------------------------------------------------------------
def test_ring_starts_on_enable_with_negotiated_settings(dev, hooks):
    negotiate(dev)
    setup_ring(dev, 1, num=128, base=7, enable=False)
    assert ("start", 1) not in hooks.calls          # PROTOCOL_FEATURES: rings start disabled
    assert ack_value(call(dev, R.SET_VRING_ENABLE, state(1, 1), need_reply=True)) == 0
    queue, kick, callfd = hooks.running[1]
    assert queue.args == (1, 128, RAM_UVA, RAM_UVA + 0x4000, RAM_UVA + 0x8000)
    assert queue.event_idx and queue.last_avail_idx == 7 and queue.attached is dev.memory
    assert callfd is not None


def test_ring_without_protocol_features_starts_on_kick(dev, hooks):
    negotiate(dev, features=VIRTIO_FEATURES & ~(1 << m.VHOST_USER_F_PROTOCOL_FEATURES | 1 << m.VIRTIO_RING_F_EVENT_IDX))
    setup_ring(dev, 0, enable=False)
    assert 0 in hooks.running and not hooks.running[0][0].event_idx


def test_get_vring_base_stops_and_reports(dev, hooks):
    negotiate(dev)
    setup_ring(dev, 0, base=3)
    kick = hooks.running[0][1]
    reply = call(dev, R.GET_VRING_BASE, state(0, 0))
    assert reply == p.encode_vring_state_reply(R.GET_VRING_BASE, 0, 8)
    assert 0 not in hooks.running and closed(kick)
    # stopped until a new kick, even if re-enabled
    call(dev, R.SET_VRING_ENABLE, state(0, 1))
    assert 0 not in hooks.running
    call(dev, R.SET_VRING_KICK, u64(0), [efd()])
    assert hooks.running[0][0].last_avail_idx == 8


def test_get_vring_base_of_stopped_ring_returns_set_base(dev):
    call(dev, R.SET_VRING_BASE, state(1, 42))
    assert call(dev, R.GET_VRING_BASE, state(1, 0)) == p.encode_vring_state_reply(R.GET_VRING_BASE, 1, 42)


def test_get_vring_base_bad_index_closes_connection(dev):
    with pytest.raises(FatalProtocolError):
        call(dev, R.GET_VRING_BASE, state(2, 0))


def test_call_fd_change_restarts_a_running_ring(dev, hooks):
    negotiate(dev)
    setup_ring(dev, 0)
    old_call = hooks.running[0][2]
    new_call = efd()
    call(dev, R.SET_VRING_CALL, u64(0), [new_call])
    assert closed(old_call) and hooks.running[0][2] == new_call
    assert hooks.calls[-2:] == [("stop", 0), ("start", 0)]


def test_call_fd_change_uses_set_call_fd_hook(dev, hooks):
    seen = []
    hooks.set_call_fd = lambda index, fd: seen.append((index, fd))
    negotiate(dev)
    setup_ring(dev, 0)
    old_call = hooks.running[0][2]
    call(dev, R.SET_VRING_CALL, u64(0x100))          # no fd: polling
    assert seen == [(0, None)] and closed(old_call)
    assert hooks.calls[-1] == ("start", 0)


def test_disable_stops_a_running_ring(dev, hooks):
    negotiate(dev)
    setup_ring(dev, 0)
    call(dev, R.SET_VRING_ENABLE, state(0, 0))
    assert 0 not in hooks.running
    call(dev, R.SET_VRING_ENABLE, state(0, 1))
    assert hooks.running[0][0].last_avail_idx == 5


@pytest.mark.parametrize("num", [0, 3, 100, 65536, 1 << 31])
def test_bad_ring_sizes(dev, num):
    assert ack_value(call(dev, R.SET_VRING_NUM, state(0, num), need_reply=True)) == 1
    assert dev.rings[0].num is None


def test_ring_index_out_of_range_fails_and_closes_fd(dev):
    fd = efd()
    assert ack_value(call(dev, R.SET_VRING_KICK, u64(2), [fd], need_reply=True)) == 1
    assert closed(fd)
    assert ack_value(call(dev, R.SET_VRING_NUM, state(9, 256), need_reply=True)) == 1
    assert ack_value(call(dev, R.SET_VRING_ENABLE, state(0, 2), need_reply=True)) == 1
    assert ack_value(call(dev, R.SET_VRING_BASE, state(0, 0x10000), need_reply=True)) == 1


@pytest.mark.parametrize("desc,avail,used", [
    (RAM_UVA + RAM_SIZE, RAM_UVA + 0x4000, RAM_UVA + 0x8000),          # desc outside memory
    (RAM_UVA, RAM_UVA + RAM_SIZE - 4, RAM_UVA + 0x8000),              # avail runs off the end
    (RAM_UVA, RAM_UVA + 0x4000, 0x1000),                              # used in no region
    (RAM_UVA + 8, RAM_UVA + 0x4000, RAM_UVA + 0x8000),                # desc misaligned
    (RAM_UVA, RAM_UVA + 0x4001, RAM_UVA + 0x8000),                    # avail misaligned
    (RAM_UVA, RAM_UVA + 0x4000, RAM_UVA + 0x8002),                    # used misaligned
])
def test_ring_addresses_must_translate(dev, desc, avail, used):
    negotiate(dev)
    call(dev, R.SET_VRING_NUM, state(0, 256))
    reply = call(dev, R.SET_VRING_ADDR, p.encode_vring_addr(0, desc, used, avail), need_reply=True)
    assert ack_value(reply) == 1
    assert dev.rings[0].desc_uva is None


def test_ring_addresses_before_memory_fail(dev):
    assert ack_value(call(dev, R.SET_VRING_ADDR, p.encode_vring_addr(0, RAM_UVA, RAM_UVA, RAM_UVA),
                          need_reply=True)) == 1


def test_vring_log_flag_accepted_unknown_flags_refused(dev):
    negotiate(dev)
    reply = call(dev, R.SET_VRING_ADDR, p.encode_vring_addr(0, RAM_UVA, RAM_UVA + 0x8000, RAM_UVA + 0x4000,
                                                            flags=m.VHOST_VRING_F_LOG, log_gpa=0x8000),
                 need_reply=True)
    assert ack_value(reply) == 0
    assert dev.rings[0].log_used and dev.rings[0].log_gpa == 0x8000
    reply = call(dev, R.SET_VRING_ADDR, p.encode_vring_addr(0, RAM_UVA, RAM_UVA + 0x8000, RAM_UVA + 0x4000,
                                                            flags=0x2), need_reply=True)
    assert ack_value(reply) == 1


def test_memory_change_reaches_hooks_and_can_start_waiting_ring(dev, hooks):
    call(dev, R.SET_FEATURES, u64(VIRTIO_FEATURES & ~(1 << m.VHOST_USER_F_PROTOCOL_FEATURES)))
    call(dev, R.SET_VRING_NUM, state(0, 16))
    call(dev, R.SET_VRING_KICK, u64(0), [efd()])
    assert hooks.running == {}
    # A memory table alone cannot start it (no addresses yet).
    call(dev, R.SET_MEM_TABLE, p.encode_memory_table([(0, RAM_SIZE, RAM_UVA, 0)]), [memfd()])
    call(dev, R.SET_VRING_ADDR, p.encode_vring_addr(0, RAM_UVA, RAM_UVA + 0x8000, RAM_UVA + 0x4000))
    assert 0 in hooks.running


def test_reset_device_stops_rings_and_resets_state(dev, hooks):
    negotiate(dev)
    setup_ring(dev, 0)
    kick = hooks.running[0][1]
    assert ack_value(call(dev, R.RESET_DEVICE, need_reply=True)) == 0
    assert hooks.running == {} and closed(kick) and ("reset",) in hooks.calls
    assert dev.acked_features == 0 and dev.memory is not None
    assert dev.rings[0].num is None


def test_reset_owner_disables_rings(dev, hooks):
    negotiate(dev)
    setup_ring(dev, 1)
    call(dev, R.RESET_OWNER)
    assert hooks.running == {}


# -- log, backend channel, unknown requests ----------------------------------------------------
def test_set_log_base_maps_and_replies(dev):
    negotiate(dev)
    fd = memfd(0x2000)
    reply = call(dev, R.SET_LOG_BASE, m.LOG.pack(0x2000, 0), [fd])
    assert ack_value(reply) == 0 and closed(fd) and len(dev.log_mapping) == 0x2000
    fd = memfd(0x1000)
    assert ack_value(call(dev, R.SET_LOG_BASE, m.LOG.pack(0x2000, 0), [fd])) == 1   # too small
    assert closed(fd)


def test_set_log_base_without_shmfd_fails(dev):
    negotiate(dev, protocol=ALL_PROTOCOL & ~(1 << PF.LOG_SHMFD))
    fd = memfd(0x1000)
    assert call(dev, R.SET_LOG_BASE, m.LOG.pack(0x1000, 0), [fd]) is None
    assert closed(fd)


def test_set_log_fd_and_backend_req_fd_are_kept(dev):
    negotiate(dev)
    log_fd, backend_fd = efd(), efd()
    call(dev, R.SET_LOG_FD, b"", [log_fd])
    assert ack_value(call(dev, R.SET_BACKEND_REQ_FD, b"", [backend_fd], need_reply=True)) == 0
    assert dev.log_fd == log_fd and dev.backend_req_fd == backend_fd
    dev.shutdown()
    assert closed(log_fd) and closed(backend_fd)


def test_backend_req_fd_needs_negotiation(dev):
    fd = efd()
    assert ack_value(call(dev, R.SET_BACKEND_REQ_FD, b"", [fd], need_reply=True)) == 1
    assert closed(fd)


@pytest.mark.parametrize("req", [0, R.SEND_RARP, R.IOTLB_MSG, R.POSTCOPY_ADVISE, R.SET_STATUS, 41, 999])
def test_unknown_requests_fail_cleanly(dev, req):
    fd = efd()
    assert ack_value(call(dev, req, bytes(8), [fd], need_reply=True)) == 1
    assert closed(fd)
    assert call(dev, req, bytes(8)) is None


def test_wrong_size_fails_cleanly(dev):
    assert ack_value(call(dev, R.SET_FEATURES, bytes(4), need_reply=True)) == 1
    assert ack_value(call(dev, R.SET_OWNER, bytes(8), need_reply=True)) == 1
    with pytest.raises(FatalProtocolError):
        call(dev, R.GET_FEATURES, bytes(8))


def test_handler_bug_is_contained(dev, hooks):
    negotiate(dev)
    def boom(*a):
        raise RuntimeError("bug")
    hooks.start_queue = boom
    call(dev, R.SET_VRING_NUM, state(0, 16))
    call(dev, R.SET_VRING_ADDR, p.encode_vring_addr(0, RAM_UVA, RAM_UVA + 0x8000, RAM_UVA + 0x4000))
    call(dev, R.SET_VRING_ENABLE, state(0, 1))
    assert ack_value(call(dev, R.SET_VRING_KICK, u64(0), [efd()], need_reply=True)) == 1


def test_shutdown_stops_rings_then_closes(dev, hooks):
    negotiate(dev)
    setup_ring(dev, 0)
    setup_ring(dev, 1)
    fds = [hooks.running[i][j] for i in (0, 1) for j in (1, 2)]
    dev.shutdown()
    assert hooks.running == {} and all(closed(fd) for fd in fds)


def test_real_split_queue_factory(hooks):
    pytest.importorskip("vhostfs.virtqueue.split")
    d = VhostUserDevice(hooks, tag=None, num_request_queues=1)
    negotiate(d)
    setup_ring(d, 1, num=64, base=9)
    queue = hooks.running[1][0]
    assert type(queue).__name__ == "SplitQueue" and queue.size == 64 and queue.last_avail_idx == 9
    d.shutdown()
    assert hooks.running == {}
