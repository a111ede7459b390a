"""Split virtqueue wire layout (virtio 1.2 §2.7): struct formats, offsets and flags.

Declaration-only.  Every field is little-endian (virtio 1.x, §2.7: "le16", "le32",
"le64"); the formats spell the byte order out.  Offsets are in bytes from the start
of the ring part named in the constant.  ``tests/unit/test_virtqueue_layout.py``
checks them against the sizes in the spec's alignment/size table (§2.7).
"""
from __future__ import annotations

import struct

__all__ = [
    "DESC", "DESC_SIZE", "DESC_F_NEXT", "DESC_F_WRITE", "DESC_F_INDIRECT",
    "U16", "USED_ELEM", "USED_ELEM_SIZE",
    "AVAIL_F_NO_INTERRUPT", "USED_F_NO_NOTIFY",
    "AVAIL_FLAGS_OFFSET", "AVAIL_IDX_OFFSET", "AVAIL_RING_OFFSET",
    "USED_FLAGS_OFFSET", "USED_IDX_OFFSET", "USED_RING_OFFSET",
    "DESC_ALIGN", "AVAIL_ALIGN", "USED_ALIGN", "MAX_QUEUE_SIZE", "MAX_INDIRECT_DESCRIPTORS",
    "MAX_CHAIN_BYTES",
]

# struct virtq_desc (§2.7.5): le64 addr; le32 len; le16 flags; le16 next.
DESC = struct.Struct("<QIHH")
DESC_SIZE = 16
DESC_F_NEXT = 1       # the buffer continues via the next field
DESC_F_WRITE = 2      # device write-only (otherwise device read-only)
DESC_F_INDIRECT = 4   # the buffer holds a table of descriptors (§2.7.5.3)

# struct virtq_avail (§2.7.6): le16 flags; le16 idx; le16 ring[size]; le16 used_event.
U16 = struct.Struct("<H")
AVAIL_F_NO_INTERRUPT = 1
AVAIL_FLAGS_OFFSET = 0
AVAIL_IDX_OFFSET = 2
AVAIL_RING_OFFSET = 4     # ring[i] at 4 + 2*i; used_event at 4 + 2*size

# struct virtq_used (§2.7.8): le16 flags; le16 idx; {le32 id; le32 len}[size]; le16 avail_event.
USED_ELEM = struct.Struct("<II")
USED_ELEM_SIZE = 8
USED_F_NO_NOTIFY = 1
USED_FLAGS_OFFSET = 0
USED_IDX_OFFSET = 2
USED_RING_OFFSET = 4      # ring[i] at 4 + 8*i; avail_event at 4 + 8*size

# Minimum alignment of each part (§2.7, table; §2.7.1 driver requirement).
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

# Queue Size is a power of 2, at most 32768 (§2.7).
MAX_QUEUE_SIZE = 32768

# Our limits (§2.7.4.1: "The device MAY have a reasonable limit of descriptors it will
# allow in a chain").  An indirect table holds at most this many descriptors (64 KiB of
# table): more than the Linux driver ever builds for virtio-fs (fuse max_pages + a few
# headers) and it bounds the work a single chain can cost us.
MAX_INDIRECT_DESCRIPTORS = 4096

# §2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total".
# We require the total to fit the le32 used length, i.e. at most 2^32 - 1 bytes.
MAX_CHAIN_BYTES = 0xFFFF_FFFF
