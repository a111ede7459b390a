"""vhost-user wire declarations (qemu docs/interop/vhost-user.rst). Declaration only.

"All numbers are in the machine native byte order" (vhost-user.rst, "Message
Specification"); vhostfs runs on little-endian hosts only, and every struct below says
so explicitly so that a test can check the sizes against the spec's C layouts.
"""
from __future__ import annotations

import enum
import struct

# -- header: u32 request, u32 flags, u32 size ----------------------------------------------
HEADER = struct.Struct("<III")
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

# The largest payload any request we know carries is VhostUserConfig: 12 bytes of header
# + VHOST_USER_MAX_CONFIG_SIZE (256).  Anything far beyond cannot be a message we could
# resynchronise on.
MAX_CONFIG_SIZE = 256
MAX_PAYLOAD = 4096
MAX_FDS = 32            # receive buffer; QEMU sends at most 8 (VHOST_MEMORY_BASELINE_NREGIONS)
MEMORY_BASELINE_NREGIONS = 8


class Request(enum.IntEnum):
    """Front-end message types (vhost-user.rst, "Front-end message types")."""
    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


class BackendRequest(enum.IntEnum):
    """Back-end message types sent on the backend channel (vhost-user.rst, "Back-end
    message types"); SHMEM_MAP/UNMAP as merged for QEMU 11.1 (dax.md §2.2)."""
    NONE = 0
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


def request_name(request: int) -> str:
    """A name for logs; never used on the hot path."""
    try:
        return Request(request).name
    except ValueError:
        return f"UNKNOWN({request})"


class ProtocolFeature(enum.IntEnum):
    """Protocol feature bit numbers (vhost-user.rst, "Protocol features")."""
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SUSPEND = 18
    DEVICE_STATE = 19


# VHOST_USER_PROTOCOL_F_SHMEM moved while under review (dax.md §2.2): 22 in QEMU 11.1.3
# (verified) and crosvm; 21 in rust-vmm vhost 0.16 and alioth.  Configurable, not an enum.
SHMEM_BIT_QEMU = 22
SHMEM_BIT_RUST_VMM = 21
SHMEM_BITS = (SHMEM_BIT_RUST_VMM, SHMEM_BIT_QEMU)


# -- virtio / vhost feature bits ---------------------------------------------------------
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32
VHOST_F_LOG_ALL = 26

# -- payloads ---------------------------------------------------------------------------
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")                 # struct vhost_vring_state: index, num
VRING_ADDR = struct.Struct("<IIQQQQ")              # index, flags, desc, used, avail, log
VHOST_VRING_F_LOG = 0x1
MEMORY_HEADER = struct.Struct("<II")               # nregions, padding
MEMORY_REGION = struct.Struct("<QQQQ")             # gpa, size, uva, mmap_offset
SINGLE_MEMORY_REGION = struct.Struct("<QQQQQ")     # padding, gpa, size, uva, mmap_offset
LOG = struct.Struct("<QQ")                         # mmap_size, mmap_offset
CONFIG_HEADER = struct.Struct("<III")              # offset, size, flags
CONFIG_FLAG_WRITABLE = 0
CONFIG_FLAG_MIGRATION = 1
# Device state transfer parameters (SET_DEVICE_STATE_FD): u32 direction, u32 phase.
DEVICE_STATE_PARAMS = struct.Struct("<II")
DEVICE_STATE_SAVE = 0
DEVICE_STATE_LOAD = 1
DEVICE_STATE_PHASE_STOPPED = 0
# SET_DEVICE_STATE_FD reply: bits 0-7 error (0 = success), bit 8 "no fd returned".
DEVICE_STATE_REPLY_NO_FD = 0x100

# VhostUserMMap (40 bytes): u8 shmid, u8 padding[7], u64 fd_offset, shm_offset, len, flags
SHMEM_MMAP = struct.Struct("<B7xQQQQ")
SHMEM_MAP_READ_ONLY = 0
SHMEM_MAP_READ_WRITE = 1
# VhostUserShMemConfig (2056 bytes): u32 nregions, u32 padding, u64 memory_sizes[256]
MAX_SHMEM_REGIONS = 256
SHMEM_CONFIG = struct.Struct("<II256Q")

# SET_VRING_KICK/CALL/ERR u64: bits 0-7 index, bit 8 "no fd in the ancillary data".
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

# -- virtio-fs device configuration (virtio 1.2 §5.11.4) ---------------------------------
VIRTIO_FS_TAG_SIZE = 36
VIRTIO_FS_CONFIG = struct.Struct("<36sI")          # char tag[36]; le32 num_request_queues

# Queue size limit of a split virtqueue (virtio 1.2 §2.7: "Queue Size ... maximum 32768").
VIRTQUEUE_MAX_SIZE = 32768
