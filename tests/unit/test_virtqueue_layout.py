"""The split-ring wire layout against virtio 1.2 §2.7 (sizes, offsets, flags)."""
from __future__ import annotations

import pytest

from vhostfs.virtqueue import layout
from vhostfs.virtqueue.split import ring_sizes, vring_need_event


def test_struct_sizes_match_the_spec():
    assert layout.DESC.size == layout.DESC_SIZE == 16          # struct virtq_desc
    assert layout.USED_ELEM.size == layout.USED_ELEM_SIZE == 8  # struct virtq_used_elem
    assert layout.U16.size == 2
    for st in (layout.DESC, layout.USED_ELEM, layout.U16):
        assert st.format.startswith("<")                       # virtio 1.x is little-endian


def test_descriptor_byte_table():
    raw = layout.DESC.pack(0x1122334455667788, 0x99AABBCC, 0x0007, 0xBEEF)
    assert raw == bytes.fromhex("8877665544332211" "ccbbaa99" "0700" "efbe")


def test_flags_and_offsets():
    assert (layout.DESC_F_NEXT, layout.DESC_F_WRITE, layout.DESC_F_INDIRECT) == (1, 2, 4)
    assert layout.AVAIL_F_NO_INTERRUPT == 1 and layout.USED_F_NO_NOTIFY == 1
    assert (layout.AVAIL_FLAGS_OFFSET, layout.AVAIL_IDX_OFFSET, layout.AVAIL_RING_OFFSET) == (0, 2, 4)
    assert (layout.USED_FLAGS_OFFSET, layout.USED_IDX_OFFSET, layout.USED_RING_OFFSET) == (0, 2, 4)
    assert (layout.DESC_ALIGN, layout.AVAIL_ALIGN, layout.USED_ALIGN) == (16, 2, 4)
    assert layout.MAX_QUEUE_SIZE == 32768


@pytest.mark.parametrize("size", [1 << k for k in range(16)])
def test_ring_sizes_follow_the_spec_table(size):
    # §2.7: Descriptor Table 16*QS, Available Ring 6+2*QS, Used Ring 6+8*QS.
    assert ring_sizes(size, True) == (16 * size, 6 + 2 * size, 6 + 8 * size)
    assert ring_sizes(size, False) == (16 * size, 4 + 2 * size, 4 + 8 * size)


def test_vring_need_event_examples():
    # §2.7.7.2 note: used_event 0 -> notify after the first buffer (idx 0 -> 1).
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(1, 1, 0)
    assert vring_need_event(0xFFFF, 0, 0xFFFF)      # wraps
    assert vring_need_event(0xFFFE, 2, 0xFFFD)      # event inside a wrapping batch
    assert not vring_need_event(2, 2, 0xFFFD)
