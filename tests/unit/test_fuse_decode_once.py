"""FuseServer decodes the in-header once: may_block's copy is the one handle serves, so a
guest rewriting its header in between cannot turn a request routed as prompt into a
blocking one (or change its unique)."""
from __future__ import annotations

import struct

from test_fuse_fakes import Session
from vhostfs.fs.api import Attr, FileSystem
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer
from vhostfs.virtqueue.iov import Reader, Writer

ATTR = Attr(2, 0, 0, 0, 0, 0, 0, 0, 0, 0o100644, 1, 0, 0, 0, 4096)


class Fs(FileSystem):
    def __init__(self):
        self.calls = []

    def getattr(self, ctx, nodeid, fh):
        self.calls.append(("getattr", nodeid))
        return ATTR, 1.0

    def setlk(self, *args, **kw):
        self.calls.append(("setlk",))


def _request(opcode, nodeid=1, unique=5, body=b""):
    return bytearray(abi.fuse_in_header.pack(abi.fuse_in_header.size + len(body), opcode, unique,
                                             nodeid, 0, 0, 0, 0, 0) + body)


def test_handle_serves_the_header_may_block_decoded():
    fs = Fs()
    server = FuseServer(fs)
    Session(server).init()
    buf = _request(abi.Opcode.GETATTR, body=bytes(abi.fuse_getattr_in.size))
    reader = Reader([memoryview(buf)])
    assert server.may_block(reader) is None
    assert reader.remaining == len(buf)           # peeked, not consumed
    # the guest rewrites the opcode to SETLKW and the unique after the routing decision
    abi.fuse_in_header.pack_into(buf, 0, len(buf), abi.Opcode.SETLKW, 99, 1, 0, 0, 0, 0, 0)
    out = bytearray(4096)
    writer = Writer([memoryview(out)])
    n = server.handle(reader, writer)
    length, error, unique = abi.fuse_out_header.unpack_from(out)
    assert fs.calls == [("getattr", 1)] and error == 0 and unique == 5
    assert n == length == abi.fuse_out_header.size + abi.fuse_attr_out.size


def test_reader_without_may_block_decodes_in_handle():
    fs = Fs()
    server = FuseServer(fs)
    Session(server).init()
    buf = _request(abi.Opcode.GETATTR, body=bytes(abi.fuse_getattr_in.size))
    out = bytearray(4096)
    server.handle(Reader([memoryview(buf)]), Writer([memoryview(out)]))
    assert fs.calls == [("getattr", 1)]


def test_trusted_reader_and_writer_lengths_and_rewind():
    a, b = memoryview(bytearray(b"abcd")), memoryview(bytearray(b"efgh"))
    r = Reader([a, b], 8)
    assert r.read(6) == b"abcdef"
    r.rewind()
    assert r.remaining == 8 and r.read(8) == b"abcdefgh"
    st = struct.Struct("<6s")
    r.rewind()
    assert r.peek(st) == (b"abcdef",) and r.remaining == 8
