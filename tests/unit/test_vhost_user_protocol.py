"""vhost-user codec: byte tables checked against the spec layouts, malformed cases."""
from __future__ import annotations

import os
import struct

import pytest

from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user import protocol as p
from vhostfs.vhost_user.protocol import FatalProtocolError, Message, MessageError

R = m.Request


def test_struct_sizes_match_the_spec():
    # vhost-user.rst "Message Specification" (and QEMU's VhostUserMsg union members)
    assert m.HEADER.size == 12
    assert m.U64.size == 8
    assert m.VRING_STATE.size == 8          # struct vhost_vring_state
    assert m.VRING_ADDR.size == 40          # struct vhost_vring_addr
    assert m.MEMORY_HEADER.size + 8 * m.MEMORY_REGION.size == 264   # VhostUserMemory
    assert m.SINGLE_MEMORY_REGION.size == 40                         # VhostUserMemRegMsg
    assert m.LOG.size == 16                 # VhostUserLog
    assert m.CONFIG_HEADER.size == 12       # VHOST_USER_CONFIG_HDR_SIZE
    assert m.VIRTIO_FS_CONFIG.size == 40    # struct virtio_fs_config


def test_request_and_feature_numbers():
    assert (R.GET_FEATURES, R.SET_MEM_TABLE, R.GET_VRING_BASE, R.SET_VRING_ENABLE) == (1, 5, 11, 18)
    assert (R.SET_BACKEND_REQ_FD, R.GET_CONFIG, R.RESET_DEVICE) == (21, 24, 34)
    assert (R.GET_MAX_MEM_SLOTS, R.ADD_MEM_REG, R.REM_MEM_REG) == (36, 37, 38)
    PF = m.ProtocolFeature
    assert (PF.MQ, PF.LOG_SHMFD, PF.REPLY_ACK, PF.BACKEND_REQ, PF.CONFIG) == (0, 1, 3, 5, 9)
    assert (PF.BACKEND_SEND_FD, PF.RESET_DEVICE, PF.CONFIGURE_MEM_SLOTS) == (10, 13, 15)


@pytest.mark.parametrize("raw,expected", [
    (bytes.fromhex("01000000" "01000000" "00000000"), (1, 1, 0)),
    (bytes.fromhex("05000000" "09000000" "28000000"), (5, 9, 40)),   # need_reply
])
def test_decode_header(raw, expected):
    assert p.decode_header(raw) == expected


@pytest.mark.parametrize("raw", [
    bytes.fromhex("01000000" "02000000" "00000000"),   # version 2
    bytes.fromhex("01000000" "05000000" "00000000"),   # reply flag on a request
    bytes.fromhex("01000000" "11000000" "00000000"),   # unknown flag bit
    bytes.fromhex("01000000" "01000000" "01100000"),   # size 4097
    bytes.fromhex("01000000" "01000000" "ffffffff"),
])
def test_decode_header_rejects_unframeable(raw):
    with pytest.raises(FatalProtocolError):
        p.decode_header(raw)


def test_reply_encodings():
    assert p.encode_u64_reply(R.GET_FEATURES, 0x1_7000_0000) == bytes.fromhex(
        "01000000" "05000000" "08000000" "0000007001000000")
    assert p.encode_ack(R.SET_MEM_TABLE, True) == bytes.fromhex("05000000" "05000000" "08000000") + bytes(8)
    assert p.encode_ack(R.SET_MEM_TABLE, False)[12:] == struct.pack("<Q", 1)
    assert p.encode_vring_state_reply(R.GET_VRING_BASE, 1, 0x1234) == bytes.fromhex(
        "0b000000" "05000000" "08000000" "01000000" "34120000")
    assert p.encode_config_reply(R.GET_CONFIG, 4, 0, b"ab") == bytes.fromhex(
        "18000000" "05000000" "0e000000" "04000000" "02000000" "00000000") + b"ab"
    assert p.encode_reply(R.GET_CONFIG) == bytes.fromhex("18000000" "05000000" "00000000")


def test_request_encodings_round_trip():
    raw = p.encode_request(R.SET_VRING_ADDR, p.encode_vring_addr(2, 0x1000, 0x3000, 0x2000), need_reply=True)
    assert raw[:12] == bytes.fromhex("09000000" "09000000" "28000000")
    addr = p.decode_vring_addr(Message(R.SET_VRING_ADDR, 9, raw[12:]))
    assert (addr.index, addr.flags, addr.desc_uva, addr.used_uva, addr.avail_uva) == (2, 0, 0x1000, 0x3000, 0x2000)
    region = (0x1000, 0x2000, 0x7f00_0000_1000, 0x40)
    assert p.decode_single_region(Message(R.ADD_MEM_REG, 1, p.encode_single_region(region))) == region
    assert p.encode_single_region(region)[:8] == bytes(8)


def _fds(n):
    return [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(n)]


def test_memory_table_decode_and_fd_count():
    regions = [(0, 0x1000, 0x10000, 0), (0x100000, 0x2000, 0x20000, 0x1000)]
    payload = p.encode_memory_table(regions)
    assert len(payload) == 8 + 2 * 32
    msg = Message(R.SET_MEM_TABLE, 1, payload, _fds(2))
    assert p.decode_memory_table(msg) == regions
    msg.close_fds()
    # The full 8-slot array is accepted too.
    assert p.decode_memory_table(Message(R.SET_MEM_TABLE, 1, payload + bytes(6 * 32), [0, 1])) == regions


@pytest.mark.parametrize("payload,nfds", [
    (b"\x01\x00\x00", 0),                                               # short header
    (struct.pack("<II", 9, 0) + bytes(9 * 32), 9),                     # too many regions
    (struct.pack("<II", 2, 0) + bytes(32), 2),                          # one region missing
    (struct.pack("<II", 1, 0) + bytes(40), 1),                          # odd size
    (struct.pack("<II", 1, 0) + bytes(32), 0),                          # fd missing
    (struct.pack("<II", 1, 0) + bytes(32), 2),                          # fd too many
])
def test_memory_table_malformed(payload, nfds):
    msg = Message(R.SET_MEM_TABLE, 1, payload, _fds(nfds))
    with pytest.raises(MessageError):
        p.decode_memory_table(msg)
    fds = list(msg.fds)
    msg.close_fds()
    assert msg.fds == []
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_vring_file_bits():
    assert p.decode_vring_file(Message(R.SET_VRING_KICK, 1, struct.pack("<Q", 3), [7])) == (3, True)
    assert p.decode_vring_file(Message(R.SET_VRING_CALL, 1, struct.pack("<Q", 0x101), [])) == (1, False)
    with pytest.raises(MessageError, match="expected 0"):
        p.decode_vring_file(Message(R.SET_VRING_CALL, 1, struct.pack("<Q", 0x101), [7]))
    with pytest.raises(MessageError, match="expected 1"):
        p.decode_vring_file(Message(R.SET_VRING_KICK, 1, struct.pack("<Q", 1), []))
    with pytest.raises(MessageError, match="reserved"):
        p.decode_vring_file(Message(R.SET_VRING_KICK, 1, struct.pack("<Q", 0x200), []))
    with pytest.raises(MessageError, match="truncated"):
        p.decode_vring_file(Message(R.SET_VRING_KICK, 1, struct.pack("<Q", 0), [7], fds_truncated=True))


@pytest.mark.parametrize("decoder,size", [
    (p.decode_u64, 8), (p.decode_vring_state, 8), (p.decode_vring_addr, 40),
    (p.decode_single_region, 40), (p.decode_log, 16), (p.decode_empty, 0),
])
def test_fixed_size_payloads_reject_wrong_sizes(decoder, size):
    for wrong in (size - 1, size + 1, size + 8):
        if wrong < 0:
            continue
        with pytest.raises(MessageError, match="expected"):
            decoder(Message(1, 1, bytes(wrong)))


def test_config_decode():
    payload = struct.pack("<III", 0, 4, 0) + b"abcd"
    assert p.decode_config(Message(R.GET_CONFIG, 1, payload)) == (0, 4, 0, b"abcd")
    for bad in (payload[:-1], struct.pack("<III", 0, 300, 0) + bytes(300), b"\0" * 8):
        with pytest.raises(MessageError):
            p.decode_config(Message(R.GET_CONFIG, 1, bad))


def test_reply_header_check():
    assert p.decode_reply_header(bytes.fromhex("01000000" "05000000" "08000000")) == (1, 5, 8)
    with pytest.raises(FatalProtocolError):
        p.decode_reply_header(bytes.fromhex("01000000" "01000000" "08000000"))


def test_set_mem_table_bytes_as_qemu_sends_them():
    # One region: gpa 0, 2 GiB, uva 0x7f1234000000, mmap offset 0; header size 8 + 32.
    raw = bytes.fromhex(
        "05000000" "09000000" "28000000"            # SET_MEM_TABLE, version 1 | need_reply, 40
        "01000000" "00000000"                      # nregions, padding
        "0000000000000000" "0000008000000000"      # guest_phys_addr, memory_size
        "0000003412" "7f0000" "0000000000000000")   # userspace_addr, mmap_offset
    request, flags, size = p.decode_header(raw[:12])
    assert (request, flags, size) == (R.SET_MEM_TABLE, 9, 40)
    msg = Message(request, flags, raw[12:], [5])
    assert p.decode_memory_table(msg) == [(0, 0x8000_0000, 0x7F12_3400_0000, 0)]
    assert p.encode_memory_table([(0, 0x80000000, 0x7F12_3400_0000, 0)]) == raw[12:]


def test_vring_state_and_log_bytes():
    assert p.decode_vring_state(Message(R.SET_VRING_NUM, 1, bytes.fromhex("01000000" "00010000"))) == (1, 256)
    assert p.decode_log(Message(R.SET_LOG_BASE, 1, bytes.fromhex("0010000000000000" "0000000000000000"))) == (
        0x1000, 0)
    assert p.decode_u64(Message(R.SET_VRING_KICK, 1, bytes.fromhex("0101000000000000"))) == 0x101
