"""Dirty logging (vhostfs/migration/dirtylog.py, the Writer and used-ring hooks) and the
DEVICE_STATE messages of the vhost-user device (save/load through a pipe)."""
from __future__ import annotations

import mmap
import gc
import os
import threading

import pytest

from test_vhost_user_device import Hooks, ack_value, call, efd, memfd, u64
from vhostfs.fs.api import Context
from vhostfs.fs.passthrough import PassthroughFs
from vhostfs.fuse.server import FuseServer
from vhostfs.memory import GuestMemory
from vhostfs.migration import MigrationBackend
from vhostfs.migration import state as S
from vhostfs.migration.dirtylog import DirtyLog
from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user import protocol as p
from vhostfs.vhost_user.device import VIRTIO_FEATURES, VhostUserDevice
from vhostfs.virtqueue import iov
from vhostfs.virtqueue.iov import Writer
from vhostfs.virtqueue.split import SplitQueue

R = m.Request
PF = m.ProtocolFeature
GPA = 0x10_0000             # guest RAM starts at 1 MiB in these tests
RAM = 1 << 20
UVA = 0x7F00_0000_0000
LOG_SIZE = (GPA + RAM) // 4096 // 8 + 4096


def bits(log) -> set[int]:
    return {i * 8 + b for i, byte in enumerate(bytes(log)) if byte for b in range(8) if byte >> b & 1}


@pytest.fixture(autouse=True)
def _free_fds_eagerly():
    """Mappings and fds caught in reference cycles are freed here, not during a later
    test that counts open fds (tests/unit/test_vhost_user_fuzz.py)."""
    yield
    gc.collect()


@pytest.fixture
def memory():
    return GuestMemory.from_table([(GPA, RAM, UVA, 0, memfd(RAM))])


@pytest.fixture
def log():
    fd = memfd(LOG_SIZE)
    mapping = mmap.mmap(fd, LOG_SIZE, flags=mmap.MAP_SHARED)
    os.close(fd)
    return mapping


@pytest.fixture
def installed():
    yield
    iov.set_dirty_log(None)


def test_writer_marks_written_pages_only_while_logging(memory, log, installed):
    dl = DirtyLog(log, memory)
    views = memory.translate(GPA + 3 * 4096 - 8, 3 * 4096)   # 3 pages, starting 8 bytes early
    Writer(views).write(b"x" * 16)                            # logging off: nothing marked
    assert bits(log) == set()
    iov.set_dirty_log(dl)
    w = Writer(views)
    w.write(b"y" * 16)                                         # straddles pages 258 and 259
    assert bits(log) == {(GPA >> 12) + 2, (GPA >> 12) + 3}
    w.pack(S.HEADER, S.MAGIC, 1, 0, 0, bytes(32))             # still page 259
    assert bits(log) == {(GPA >> 12) + 2, (GPA >> 12) + 3}
    # preadv from a file into the next pages (a read reply)
    path_fd = os.memfd_create("data")
    os.write(path_fd, b"q" * 6000)
    assert w.read_from_fd(path_fd, 6000, 0) == 6000
    os.close(path_fd)
    assert bits(log) == {(GPA >> 12) + 2, (GPA >> 12) + 3, (GPA >> 12) + 4}
    log[:] = bytes(len(log))
    w.write_at(0, b"H")                                        # header rewrite: page 258
    assert bits(log) == {(GPA >> 12) + 2}
    assert bytes(views[0][0:16]) == b"H" + b"y" * 15


def test_used_ring_logged_at_log_guest_addr(memory, log):
    size = 8
    desc, avail, used = GPA, GPA + 0x1000, GPA + 0x2000
    q = SplitQueue(1, size, UVA, UVA + 0x1000, UVA + 0x2000, event_idx=True)
    q.attach(memory)
    dl = DirtyLog(log, memory)
    q.add_used(0, 10)
    assert bits(log) == set()
    log_gpa = 0x9_0000             # need not be the ring's own address (vhost-user.rst)
    q.set_dirty_log(dl, log_gpa)
    q.add_used(1, 20)
    assert bits(log) == {log_gpa >> 12}
    q.enable_notification()        # avail_event lives in the used ring too
    assert bits(log) == {log_gpa >> 12}
    assert (used >> 12) not in bits(log)
    q.set_dirty_log(None)
    q.add_used(2, 0)
    log[:] = bytes(len(log))
    q.add_used(3, 0)
    assert bits(log) == set()


def test_concurrent_marks_lose_nothing(memory, log):
    dl = DirtyLog(log, memory)
    pages = list(range(GPA >> 12, (GPA + RAM) >> 12))

    def mark(part):
        for page in part:
            dl.mark_gpa(page << 12, 1)

    threads = [threading.Thread(target=mark, args=(pages[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bits(log) == set(pages)


# -- through the vhost-user device -------------------------------------------------------------
@pytest.fixture
def share(tmp_path):
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "f").write_bytes(b"data")
    return tmp_path / "share"


def device(share, hooks=None):
    fs = PassthroughFs(str(share))
    server = FuseServer(fs)
    mig = MigrationBackend(server, fs, mode="find-paths", on_error="abort")
    dev = VhostUserDevice(hooks or Hooks(), tag="t", num_request_queues=1, migration=mig)
    pf = ack_value(call(dev, R.GET_PROTOCOL_FEATURES))
    assert pf & (1 << PF.DEVICE_STATE) and pf & (1 << PF.LOG_SHMFD)
    call(dev, R.SET_FEATURES, u64(VIRTIO_FEATURES & ~(1 << m.VHOST_F_LOG_ALL)))
    call(dev, R.SET_PROTOCOL_FEATURES, u64(pf))
    return dev, server, fs


def transfer(dev, direction, data=None):
    r, w = os.pipe()
    mine, theirs = (r, w) if direction == m.DEVICE_STATE_SAVE else (w, r)
    reply = call(dev, R.SET_DEVICE_STATE_FD, m.DEVICE_STATE_PARAMS.pack(direction, 0), [theirs])
    assert ack_value(reply) == m.DEVICE_STATE_REPLY_NO_FD      # success, no fd of our own
    if direction == m.DEVICE_STATE_SAVE:
        chunks = []
        while chunk := os.read(mine, 65536):
            chunks.append(chunk)
        os.close(mine)
        out = b"".join(chunks)
    else:
        os.write(mine, data)
        os.close(mine)
        out = None
    return out, ack_value(call(dev, R.CHECK_DEVICE_STATE))


def test_log_all_turns_the_writer_hook_on_and_off(share, installed):
    dev, _, _ = device(share)
    try:
        call(dev, R.SET_MEM_TABLE, p.encode_memory_table([(GPA, RAM, UVA, 0)]), [memfd(RAM)])
        assert ack_value(call(dev, R.SET_LOG_BASE, m.LOG.pack(LOG_SIZE, 0), [memfd(LOG_SIZE)])) == 0
        assert iov.dirty_log is None                          # no LOG_ALL yet
        call(dev, R.SET_FEATURES, u64(VIRTIO_FEATURES))
        assert iov.dirty_log is dev.dirty_log is not None
        call(dev, R.SET_FEATURES, u64(VIRTIO_FEATURES & ~(1 << m.VHOST_F_LOG_ALL)))
        assert iov.dirty_log is None and dev.dirty_log is None
    finally:
        dev.shutdown()


def test_device_state_save_then_load(share):
    src, server, fs = device(share)
    ctx = Context(0, 0, 1)
    server.initialized, server.proto_minor, server.flags = True, 36, 0x7
    nodeid = fs.lookup(ctx, 1, b"f").nodeid
    fh, _ = fs.open(ctx, nodeid, os.O_RDONLY)
    data, status = transfer(src, m.DEVICE_STATE_SAVE)
    assert status == 0
    st = S.decode(data)
    assert [i["nodeid"] for i in st["inodes"]] == [nodeid] and st["handles"][0]["fh"] == fh

    dst, server2, fs2 = device(share)
    _, status = transfer(dst, m.DEVICE_STATE_LOAD, data)
    assert status == 0
    assert server2.initialized and server2.flags == 0x7
    assert fs2.handles.file(fh, nodeid) is not None
    src.shutdown()
    dst.shutdown()


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "version"])
def test_device_state_load_rejects_bad_state(share, damage):
    src, server, fs = device(share)
    data, _ = transfer(src, m.DEVICE_STATE_SAVE)
    data = bytearray(data)
    if damage == "corrupt":
        data[-2] ^= 0xFF
    elif damage == "truncated":
        del data[len(data) // 2:]
    else:
        data[8] = 99
    dst, server2, fs2 = device(share)
    _, status = transfer(dst, m.DEVICE_STATE_LOAD, bytes(data))
    assert status != 0                                         # CHECK_DEVICE_STATE fails
    assert not server2.initialized and len(fs2.inodes) == 1
    src.shutdown()
    dst.shutdown()


def test_save_refused_while_a_ring_runs(share):
    dev, _, _ = device(share)
    dev.rings[1].running = True                                # as if started
    r, w = os.pipe()
    reply = call(dev, R.SET_DEVICE_STATE_FD, m.DEVICE_STATE_PARAMS.pack(0, 0), [w])
    assert ack_value(reply) & 0xFF != 0
    assert os.read(r, 1) == b""                                # our end was closed: EOF
    os.close(r)
    dev.rings[1].running = False
    dev.shutdown()


def test_no_device_state_with_a_dax_window(share):
    class Dax:                      # the window's mappings are not part of the state
        size = 2 << 20

        def set_channel(self, channel):
            pass

        def reset(self):
            pass

    fs = PassthroughFs(str(share))
    mig = MigrationBackend(FuseServer(fs), fs)
    dev = VhostUserDevice(Hooks(), tag="t", num_request_queues=1, migration=mig, dax=Dax())
    assert not ack_value(call(dev, R.GET_PROTOCOL_FEATURES)) & (1 << PF.DEVICE_STATE)
    assert ack_value(call(dev, R.GET_FEATURES)) & (1 << m.VHOST_F_LOG_ALL)   # logging still works
    dev.shutdown()
