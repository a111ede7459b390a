"""vhostfs.dax.manager with a bookkeeping-only channel that enforces QEMU 11.1's rules,
the FUSE opcodes 48/49 through FuseServer, and the device's DAX side (GET_SHMEM_CONFIG,
the SHMEM feature bit)."""
from __future__ import annotations

import errno
import os
import struct

import pytest

from tests.unit.test_fuse_fakes import FuseError, Session
from vhostfs.dax import DaxManager, FrontendRefused
from vhostfs.dax.window import FLAG_READ, FLAG_WRITE, PAGE_SIZE
from vhostfs.fs.passthrough.dax import DaxPassthroughFs
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer
from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user.device import VhostUserDevice
from vhostfs.vhost_user.protocol import Message

MiB = 1 << 20
NO_FH = (1 << 64) - 1


@pytest.fixture(autouse=True)
def _collect_now():
    """Filesystems and servers here live in reference cycles: free their fds now, not
    during a later test that counts its open fds."""
    yield
    import gc
    gc.collect()


class RuleChannel:
    """QEMU 11.1's SHMEM checks on bookkeeping only (no mmap)."""

    def __init__(self, size):
        self.size = size
        self.maps = {}
        self.log = []
        self.refuse_unmap = False

    def map(self, shm_offset, length, fd, fd_offset, writable):
        self.log.append(("map", shm_offset, length, writable))
        assert os.fstat(fd).st_size >= fd_offset + length, "map past the end of the fd"
        import fcntl
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR, "fd not O_RDWR"
        assert shm_offset % PAGE_SIZE == 0 and length % PAGE_SIZE == 0 and fd_offset % PAGE_SIZE == 0
        assert shm_offset + length <= self.size
        for off, ln in self.maps.items():
            assert not (shm_offset < off + ln and off < shm_offset + length), "map over a map"
        self.maps[shm_offset] = length

    def unmap(self, shm_offset, length):
        self.log.append(("unmap", shm_offset, length))
        if self.refuse_unmap or self.maps.get(shm_offset) != length:
            raise FrontendRefused("not found")
        del self.maps[shm_offset]


@pytest.fixture
def rig(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    manager = DaxManager(8 * MiB, RuleChannel(8 * MiB))
    fs = DaxPassthroughFs(str(share), dax=manager)
    server = FuseServer(fs)
    session = Session(server)
    session.init_out = session.init()
    return share, manager, fs, session


def _lookup(session, name):
    return struct.unpack_from("<Q", session.request(abi.Opcode.LOOKUP, 1, name.encode() + b"\0"))[0]


def _setup_body(foffset, length, flags, moffset, fh=NO_FH):
    return abi.fuse_setupmapping_in.pack(fh, foffset, length, flags, moffset)


def _remove_body(*entries):
    return abi.fuse_removemapping_in.pack(len(entries)) + b"".join(
        abi.fuse_removemapping_one.pack(*e) for e in entries)


def test_init_reply_has_map_alignment_21_and_inode_dax(rig):
    _, _, _, session = rig
    assert session.server.flags & abi.FUSE_MAP_ALIGNMENT
    assert session.server.flags & abi.FUSE_HAS_INODE_DAX
    assert session.init_out[9] == 21          # fuse_init_out.map_alignment


def test_setupmapping_and_removemapping_over_fuse(rig):
    share, manager, _, session = rig
    (share / "f").write_bytes(os.urandom(2 * MiB + 1))
    nodeid = _lookup(session, "f")
    session.request(abi.Opcode.SETUPMAPPING, nodeid, _setup_body(0, 2 * MiB, FLAG_READ, 0))
    session.request(abi.Opcode.SETUPMAPPING, nodeid, _setup_body(2 * MiB, 2 * MiB, FLAG_READ, 2 * MiB))
    assert manager.channel.maps == {0: 2 * MiB, 2 * MiB: PAGE_SIZE}
    # upgrade at the same moffset: exact unmap first, then the writable map
    session.request(abi.Opcode.SETUPMAPPING, nodeid,
                    _setup_body(2 * MiB, 2 * MiB, FLAG_READ | FLAG_WRITE, 2 * MiB))
    assert manager.channel.log[-2:] == [("unmap", 2 * MiB, PAGE_SIZE), ("map", 2 * MiB, PAGE_SIZE, True)]
    session.request(abi.Opcode.REMOVEMAPPING, nodeid, _remove_body((0, 2 * MiB), (2 * MiB, 2 * MiB)))
    assert manager.channel.maps == {} and len(manager.window) == 0


@pytest.mark.parametrize("body,err", [
    (_setup_body(0, 2 * MiB, FLAG_READ, MiB), errno.EINVAL),
    (_setup_body(4096, 2 * MiB, FLAG_READ, 0), errno.EINVAL),
    (_setup_body(0, 0, FLAG_READ, 0), errno.EINVAL),
    (_setup_body(0, 2 * MiB, 0, 0), errno.EINVAL),
    (_setup_body(0, 2 * MiB, 8, 0), errno.EINVAL),
    (_setup_body(0, 2 * MiB, FLAG_READ, 8 * MiB), errno.EINVAL),
    (_setup_body(4 * MiB, 2 * MiB, FLAG_READ, 0), errno.EINVAL),        # at/after EOF
    (_setup_body(0, 2 * MiB, FLAG_READ, 0, fh=12345), errno.EBADF),     # unknown handle
    (_setup_body(0, 2 * MiB, FLAG_READ, 0)[:39], errno.EINVAL),         # truncated
])
def test_setupmapping_validation(rig, body, err):
    share, manager, _, session = rig
    (share / "f").write_bytes(b"x" * 5000)
    nodeid = _lookup(session, "f")
    with pytest.raises(FuseError) as info:
        session.request(abi.Opcode.SETUPMAPPING, nodeid, body)
    assert info.value.errno == err
    assert manager.channel.log == [] and len(manager.window) == 0


def test_setupmapping_of_a_directory_or_unknown_node(rig):
    share, manager, _, session = rig
    (share / "d").mkdir()
    nodeid = _lookup(session, "d")
    for node, err in ((nodeid, errno.EINVAL), (999, errno.ENOENT)):
        with pytest.raises(FuseError) as info:
            session.request(abi.Opcode.SETUPMAPPING, node, _setup_body(0, 2 * MiB, FLAG_READ, 0))
        assert info.value.errno == err
    assert manager.channel.log == []


@pytest.mark.parametrize("body", [
    abi.fuse_removemapping_in.pack(0),
    abi.fuse_removemapping_in.pack(257) + bytes(257 * 16),
    abi.fuse_removemapping_in.pack(2) + bytes(16),                # fewer entries than count
    abi.fuse_removemapping_in.pack(1) + bytes(32),                # more bytes than count
    b"\x01\x00",
])
def test_removemapping_malformed(rig, body):
    _, manager, _, session = rig
    with pytest.raises(FuseError) as info:
        session.request(abi.Opcode.REMOVEMAPPING, 1, body)
    assert info.value.errno == errno.EINVAL
    assert manager.channel.log == []


def test_removemapping_256_entries_and_partial_failure(tmp_path):
    share = tmp_path / "s"
    share.mkdir()
    manager = DaxManager(512 * MiB, RuleChannel(512 * MiB))
    fs = DaxPassthroughFs(str(share), dax=manager)
    session = Session(FuseServer(fs))
    session.init()
    (share / "big").write_bytes(b"")
    os.truncate(share / "big", 512 * MiB)
    nodeid = _lookup(session, "big")
    for i in range(256):
        session.request(abi.Opcode.SETUPMAPPING, nodeid, _setup_body(i * 2 * MiB, 2 * MiB, FLAG_READ, i * 2 * MiB))
    assert len(manager.channel.maps) == 256
    entries = [(i * 2 * MiB, 2 * MiB) for i in range(256)]
    entries[5] = (5 * 2 * MiB, 4096)          # one bad entry: the other 255 are still removed
    with pytest.raises(FuseError) as info:
        session.request(abi.Opcode.REMOVEMAPPING, nodeid, _remove_body(*entries))
    assert info.value.errno == errno.EINVAL
    assert list(manager.channel.maps) == [5 * 2 * MiB]
    # reuse of the range whose REMOVEMAPPING failed, for another file: unmap then map
    (share / "other").write_bytes(b"y" * (2 * MiB))
    other = _lookup(session, "other")
    session.request(abi.Opcode.SETUPMAPPING, other, _setup_body(0, 2 * MiB, FLAG_READ, 5 * 2 * MiB))
    assert manager.channel.log[-2:] == [("unmap", 10 * MiB, 2 * MiB), ("map", 10 * MiB, 2 * MiB, False)]
    assert manager.window.get(10 * MiB).nodeid == other
    manager.window.check_invariants()


def test_forget_unmaps_what_the_guest_left(rig):
    share, manager, fs, session = rig
    (share / "f").write_bytes(b"z" * 3 * MiB)
    nodeid = _lookup(session, "f")
    session.request(abi.Opcode.SETUPMAPPING, nodeid, _setup_body(0, 2 * MiB, FLAG_READ, 4 * MiB))
    fs.forget(nodeid, 1)
    assert manager.channel.maps == {} and len(manager.window) == 0


def test_unmap_refused_is_taken_as_unmapped_but_no_answer_keeps_the_record(rig):
    share, manager, _, session = rig
    (share / "f").write_bytes(b"z" * 3 * MiB)
    nodeid = _lookup(session, "f")
    session.request(abi.Opcode.SETUPMAPPING, nodeid, _setup_body(0, 2 * MiB, FLAG_READ, 0))
    manager.channel.maps.clear()                   # the front end lost it (e.g. a reset we missed)
    manager.channel.refuse_unmap = True
    session.request(abi.Opcode.REMOVEMAPPING, nodeid, _remove_body((0, 2 * MiB)))
    assert len(manager.window) == 0

    class Closed(RuleChannel):
        def unmap(self, *a):
            raise OSError(errno.ENOTCONN, "gate closed")
    manager.channel.refuse_unmap = False
    session.request(abi.Opcode.SETUPMAPPING, nodeid, _setup_body(0, 2 * MiB, FLAG_READ, 0))
    closed = Closed(8 * MiB)
    closed.maps = manager.channel.maps
    manager.set_channel(closed)
    with pytest.raises(FuseError) as info:
        session.request(abi.Opcode.REMOVEMAPPING, nodeid, _remove_body((0, 2 * MiB)))
    assert info.value.errno == errno.ENOTCONN
    assert manager.window.get(0) is not None        # still mapped in the front end: kept


def test_no_channel_is_a_clear_error(rig):
    share, manager, _, session = rig
    (share / "f").write_bytes(b"z" * 10)
    nodeid = _lookup(session, "f")
    manager.set_channel(None)
    with pytest.raises(FuseError) as info:
        session.request(abi.Opcode.SETUPMAPPING, nodeid, _setup_body(0, 2 * MiB, FLAG_READ, 0))
    assert info.value.errno == errno.ENOTCONN


def test_attr_dax_flag_follows_the_size_policy(tmp_path):
    share = tmp_path / "s"
    share.mkdir()
    (share / "small").write_bytes(b"a")
    (share / "large").write_bytes(b"b" * (2 * MiB))
    fs = DaxPassthroughFs(str(share), dax=DaxManager(8 * MiB), dax_inode_min_size=MiB)
    from vhostfs.fs.api import ATTR_DAX, Context
    ctx = Context(0, 0, 1)
    assert not fs.lookup(ctx, 1, b"small").attr.flags & ATTR_DAX
    large = fs.lookup(ctx, 1, b"large")
    assert large.attr.flags & ATTR_DAX
    assert fs.getattr(ctx, large.nodeid, None)[0].flags & ATTR_DAX


def test_readonly_share_refuses_mappings(tmp_path):
    share = tmp_path / "s"
    share.mkdir()
    (share / "f").write_bytes(b"a" * 10)
    manager = DaxManager(8 * MiB, RuleChannel(8 * MiB))
    fs = DaxPassthroughFs(str(share), dax=manager, readonly=True)
    from vhostfs.fs.api import Context
    ctx = Context(0, 0, 1)
    nodeid = fs.lookup(ctx, 1, b"f").nodeid
    with pytest.raises(OSError) as info:
        fs.setupmapping(ctx, nodeid, NO_FH, 0, 2 * MiB, FLAG_READ, 0)
    assert info.value.errno == errno.EROFS


# -- the device side ------------------------------------------------------------------------

class _Hooks:
    def start_queue(self, *a): pass
    def stop_queue(self, index): return 0
    def memory_changed(self, memory): pass
    def reset(self): pass


@pytest.mark.parametrize("bit", [21, 22])
def test_device_offers_the_configured_shmem_bit_and_answers_get_shmem_config(bit):
    device = VhostUserDevice(_Hooks(), tag="t", num_request_queues=1, dax=DaxManager(64 * MiB),
                             shmem_bit=bit)
    reply = device.handle(Message(m.Request.GET_PROTOCOL_FEATURES, 1, b""))
    (features,) = struct.unpack_from("<Q", reply, 12)
    assert features & (1 << bit) and not features & (1 << (43 - bit))
    assert features & (1 << m.ProtocolFeature.CONFIG) and features & (1 << m.ProtocolFeature.REPLY_ACK)
    reply = device.handle(Message(m.Request.GET_SHMEM_CONFIG, 1, b""))
    request, flags, size = m.HEADER.unpack_from(reply)
    assert (request, flags, size) == (44, 0x5, 2056)
    nregions, _pad, *sizes = m.SHMEM_CONFIG.unpack_from(reply, 12)
    assert nregions == 1 and sizes[0] == 64 * MiB and not any(sizes[1:])


def test_device_without_dax_offers_no_shmem_and_refuses_get_shmem_config():
    from vhostfs.vhost_user.protocol import FatalProtocolError
    device = VhostUserDevice(_Hooks(), tag="t", num_request_queues=1)
    reply = device.handle(Message(m.Request.GET_PROTOCOL_FEATURES, 1, b""))
    (features,) = struct.unpack_from("<Q", reply, 12)
    assert not features & (3 << 21)
    with pytest.raises(FatalProtocolError):
        device.handle(Message(m.Request.GET_SHMEM_CONFIG, 1, b""))


def test_device_refuses_an_unknown_shmem_bit():
    from vhostfs.errors import ConfigError
    with pytest.raises(ConfigError):
        VhostUserDevice(_Hooks(), tag="t", num_request_queues=1, dax=DaxManager(2 * MiB), shmem_bit=20)


def test_shmem_wire_sizes():
    assert m.SHMEM_MMAP.size == 40 and m.SHMEM_CONFIG.size == 2056
    assert m.SHMEM_MMAP.pack(0, 1, 2, 3, 1)[:8] == bytes(8)
    assert (m.BackendRequest.SHMEM_MAP, m.BackendRequest.SHMEM_UNMAP, m.Request.GET_SHMEM_CONFIG) == (9, 10, 44)
