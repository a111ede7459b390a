"""Sans-I/O vhost-user codec: bytes and fds in, validated values out; replies to bytes.

Nothing here touches a socket.  The transport hands over a :class:`Message` (header
fields, the payload bytes and the fds that arrived with it); the decoders check the
payload size and fd count each request must have and return plain values.  Every
value is unpacked once from an immutable ``bytes`` payload, so the frontend cannot
change it after it was checked.

Two error kinds (both :class:`~vhostfs.errors.ProtocolError`):

* :class:`MessageError` - this one message is malformed or cannot be honoured; the
  stream is still in sync, so the device logs it and answers with a failed ack.
* :class:`FatalProtocolError` - the stream cannot be trusted any more (bad version,
  a size no request could have, EOF in the middle of a message, a required reply we
  cannot give); the connection is closed.

The encoders for front-end requests at the end exist for the simulated frontend used
by the tests and the benchmark; the device only uses the reply encoders.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from vhostfs.errors import ProtocolError
from vhostfs.vhost_user import messages as m


class MessageError(ProtocolError):
    """One message is malformed or refused; the stream stays in sync."""


class FatalProtocolError(ProtocolError):
    """The stream can no longer be trusted: the connection must be closed."""


@dataclass(slots=True)
class Message:
    """One received request.  Owns ``fds`` until a handler takes them."""
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)
    fds_truncated: bool = False     # the kernel dropped fds that did not fit (MSG_CTRUNC)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & m.FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return m.request_name(self.request)

    def take_fd(self) -> int:
        """Transfer ownership of the first fd to the caller."""
        return self.fds.pop(0)

    def close_fds(self) -> None:
        """Close every fd no handler took (called on every path)."""
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


# -- header -------------------------------------------------------------------------------

def decode_header(data: bytes) -> tuple[int, int, int]:
    """(request, flags, size) from the 12-byte header, or FatalProtocolError.

    vhost-user.rst "Header": the low two flag bits are the version (0x1); bit 2 is only
    set on replies; bit 3 is need_reply.  A request with another version, the reply
    bit or unknown flags, or a size no request has, cannot be framed safely.
    """
    request, flags, size = m.HEADER.unpack(data)
    name = m.request_name(request)
    if flags & m.VERSION_MASK != m.VERSION:
        raise FatalProtocolError(f"{name}: unsupported vhost-user version {flags & m.VERSION_MASK}")
    if flags & ~m.KNOWN_FLAGS or flags & m.FLAG_REPLY:
        raise FatalProtocolError(f"{name}: invalid header flags 0x{flags:x}")
    if size > m.MAX_PAYLOAD:
        raise FatalProtocolError(f"{name}: payload size {size} exceeds {m.MAX_PAYLOAD}")
    return request, flags, size


# -- payload checks -------------------------------------------------------------------------

def expect_size(msg: Message, size: int) -> None:
    if len(msg.payload) != size:
        raise MessageError(f"{msg.name}: payload is {len(msg.payload)} bytes, expected {size}")


def expect_fds(msg: Message, count: int) -> None:
    """The message must carry exactly ``count`` fds (vhost-user.rst, "Communication")."""
    if msg.fds_truncated:
        raise MessageError(f"{msg.name}: too many file descriptors attached (truncated by the kernel)")
    if len(msg.fds) != count:
        raise MessageError(f"{msg.name}: carries {len(msg.fds)} file descriptors, expected {count}")


def decode_empty(msg: Message) -> None:
    expect_size(msg, 0)


def decode_u64(msg: Message) -> int:
    expect_size(msg, m.U64.size)
    return m.U64.unpack(msg.payload)[0]


def decode_vring_state(msg: Message) -> tuple[int, int]:
    """(index, num) of a struct vhost_vring_state."""
    expect_size(msg, m.VRING_STATE.size)
    return m.VRING_STATE.unpack(msg.payload)


@dataclass(frozen=True, slots=True)
class VringAddr:
    index: int
    flags: int
    desc_uva: int
    used_uva: int
    avail_uva: int
    log_gpa: int


def decode_vring_addr(msg: Message) -> VringAddr:
    expect_size(msg, m.VRING_ADDR.size)
    return VringAddr(*m.VRING_ADDR.unpack(msg.payload))


def decode_vring_file(msg: Message) -> tuple[int, bool]:
    """(index, has_fd) of SET_VRING_KICK/CALL/ERR, with the fd count checked.

    vhost-user.rst, SET_VRING_KICK: bits 0-7 are the ring index, bit 8 says that no fd
    is in the ancillary data; other bits are reserved.
    """
    value = decode_u64(msg)
    if value & ~(m.VRING_IDX_MASK | m.VRING_NOFD_MASK):
        raise MessageError(f"{msg.name}: reserved bits set in 0x{value:x}")
    has_fd = not value & m.VRING_NOFD_MASK
    expect_fds(msg, 1 if has_fd else 0)
    return value & m.VRING_IDX_MASK, has_fd


RegionDesc = tuple[int, int, int, int]    # gpa, size, uva, mmap_offset


def decode_memory_table(msg: Message) -> list[RegionDesc]:
    """Regions of SET_MEM_TABLE; one fd per region, in order (vhost-user.rst)."""
    payload = msg.payload
    if len(payload) < m.MEMORY_HEADER.size:
        raise MessageError(f"{msg.name}: payload is {len(payload)} bytes, shorter than its header")
    nregions, _padding = m.MEMORY_HEADER.unpack_from(payload)
    if nregions > m.MEMORY_BASELINE_NREGIONS:
        raise MessageError(f"{msg.name}: {nregions} regions, at most {m.MEMORY_BASELINE_NREGIONS} allowed")
    needed = m.MEMORY_HEADER.size + nregions * m.MEMORY_REGION.size
    # QEMU sends exactly the regions in use; other frontends send the whole array.
    full = m.MEMORY_HEADER.size + m.MEMORY_BASELINE_NREGIONS * m.MEMORY_REGION.size
    if len(payload) not in (needed, full):
        raise MessageError(f"{msg.name}: payload is {len(payload)} bytes for {nregions} regions")
    expect_fds(msg, nregions)
    return [m.MEMORY_REGION.unpack_from(payload, m.MEMORY_HEADER.size + i * m.MEMORY_REGION.size)
            for i in range(nregions)]


def decode_single_region(msg: Message) -> RegionDesc:
    """The region of ADD_MEM_REG / REM_MEM_REG (leading u64 padding dropped)."""
    expect_size(msg, m.SINGLE_MEMORY_REGION.size)
    return m.SINGLE_MEMORY_REGION.unpack(msg.payload)[1:]


def decode_log(msg: Message) -> tuple[int, int]:
    """(mmap_size, mmap_offset) of SET_LOG_BASE with LOG_SHMFD."""
    expect_size(msg, m.LOG.size)
    return m.LOG.unpack(msg.payload)


def decode_config(msg: Message) -> tuple[int, int, int, bytes]:
    """(offset, size, flags, data) of GET_CONFIG / SET_CONFIG."""
    payload = msg.payload
    if len(payload) < m.CONFIG_HEADER.size:
        raise MessageError(f"{msg.name}: payload is {len(payload)} bytes, shorter than its header")
    offset, size, flags = m.CONFIG_HEADER.unpack_from(payload)
    if size > m.MAX_CONFIG_SIZE or len(payload) != m.CONFIG_HEADER.size + size:
        raise MessageError(f"{msg.name}: config size {size} does not match payload of {len(payload)} bytes")
    return offset, size, flags, payload[m.CONFIG_HEADER.size:]


# -- replies --------------------------------------------------------------------------------

def encode_reply(request: int, payload: bytes = b"") -> bytes:
    return m.HEADER.pack(request, m.VERSION | m.FLAG_REPLY, len(payload)) + payload


def encode_u64_reply(request: int, value: int) -> bytes:
    return encode_reply(request, m.U64.pack(value))


def encode_ack(request: int, ok: bool) -> bytes:
    """REPLY_ACK: u64 zero on success, non-zero on failure (vhost-user.rst, REPLY_ACK)."""
    return encode_u64_reply(request, 0 if ok else 1)


def encode_vring_state_reply(request: int, index: int, num: int) -> bytes:
    return encode_reply(request, m.VRING_STATE.pack(index, num))


def encode_config_reply(request: int, offset: int, flags: int, data: bytes) -> bytes:
    return encode_reply(request, m.CONFIG_HEADER.pack(offset, len(data), flags) + data)


# -- front-end requests (used by the simulated frontend) -----------------------------------

def encode_request(request: int, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    flags = m.VERSION | (m.FLAG_NEED_REPLY if need_reply else 0)
    return m.HEADER.pack(request, flags, len(payload)) + payload


def encode_memory_table(regions: list[RegionDesc]) -> bytes:
    return m.MEMORY_HEADER.pack(len(regions), 0) + b"".join(m.MEMORY_REGION.pack(*r) for r in regions)


def encode_single_region(region: RegionDesc) -> bytes:
    return m.SINGLE_MEMORY_REGION.pack(0, *region)


def encode_vring_addr(index: int, desc_uva: int, used_uva: int, avail_uva: int, *,
                      flags: int = 0, log_gpa: int = 0) -> bytes:
    return m.VRING_ADDR.pack(index, flags, desc_uva, used_uva, avail_uva, log_gpa)


def decode_reply_header(data: bytes) -> tuple[int, int, int]:
    """(request, flags, size) of a reply, checked the way a frontend must."""
    request, flags, size = m.HEADER.unpack(data)
    if flags & m.VERSION_MASK != m.VERSION or not flags & m.FLAG_REPLY:
        raise FatalProtocolError(f"reply to {m.request_name(request)} has bad flags 0x{flags:x}")
    if size > m.MAX_PAYLOAD:
        raise FatalProtocolError(f"reply to {m.request_name(request)} has size {size}")
    return request, flags, size
