"""Hypothesis: no request, however malformed, makes FuseServer raise anything but a
protocol-side error, and every reply is well framed."""
from __future__ import annotations

import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_fuse_fakes import FakeReader, FakeWriter
from vhostfs.errors import VhostfsError
from vhostfs.fs.api import EventCancel
from vhostfs.fs.passthrough import PassthroughFs
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer

_DIR = tempfile.TemporaryDirectory()
_FS = PassthroughFs(_DIR.name)
_SERVER = FuseServer(_FS)
_SERVER.handle(FakeReader(abi.fuse_in_header.pack(104, abi.Opcode.INIT, 1, 0, 0, 0, 1, 0, 0)
                          + abi.fuse_init_in.pack(7, 38, 0, 0xFFFFFFFF, 0, *([0] * 11))),
               FakeWriter(4096))
# Every issue-3 option on, and INIT_EXT flags2 offered (SETXATTR_EXT, supp-group extensions).
_DIR2 = tempfile.TemporaryDirectory()
_SERVER2 = FuseServer(PassthroughFs(_DIR2.name, posix_acl=True, killpriv_v2=True, writeback=True))
_SERVER2.handle(FakeReader(abi.fuse_in_header.pack(104, abi.Opcode.INIT, 1, 0, 0, 0, 1, 0, 0)
                           + abi.fuse_init_in.pack(7, 38, 0, 0xFFFFFFFF, 0xFFFFFFFF, *([0] * 11))),
                FakeWriter(4096))
# A waiting request (SETLKW on a held lock) must not hang the test: it is cancelled.
_CANCELLED = EventCancel()
_CANCELLED.set()

OPCODES = [op.value for op in abi.Opcode if op not in (abi.Opcode.DESTROY, abi.Opcode.INIT)] + [0, 99]
NAMES = st.sampled_from([b"a", b"b", b".", b"..", b"a/b", b"", b"x" * 300])


@st.composite
def bodies(draw):
    parts = draw(st.lists(st.one_of(
        st.binary(max_size=48),
        NAMES.map(lambda n: n + b"\0"),
        st.integers(0, 2**64 - 1).map(lambda v: v.to_bytes(8, "little")),
        st.integers(0, 8).map(lambda v: v.to_bytes(8, "little")),
    ), max_size=6))
    return b"".join(parts)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(opcode=st.sampled_from(OPCODES), nodeid=st.sampled_from([0, 1, 2, 3, 4, 2**64 - 1]),
       body=bodies(), len_delta=st.sampled_from([0, 0, 0, -1, 1, 100]),
       capacity=st.sampled_from([16, 17, 100, 4096, 1 << 20]), extlen=st.sampled_from([0, 0, 1, 3]),
       options=st.booleans())
def test_random_requests(opcode, nodeid, body, len_delta, capacity, extlen, options):
    data = abi.fuse_in_header.pack(max(40 + len(body) + len_delta, 0), opcode, 5, nodeid,
                                   0, 0, 1, extlen, 0) + body
    writer = FakeWriter(capacity)
    server = _SERVER2 if options else _SERVER
    try:
        n = server.handle(FakeReader(data), writer, cancel=_CANCELLED)
    except VhostfsError:
        return
    if n == 0:
        assert opcode in (abi.Opcode.FORGET, abi.Opcode.BATCH_FORGET, abi.Opcode.INTERRUPT)
        return
    length, error, unique = abi.fuse_out_header.unpack_from(writer.buf)
    assert (length, unique) == (n, 5)
    assert -4095 <= error <= 0
    assert n <= capacity
