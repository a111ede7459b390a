"""fuse/fastpath.py: READ and WRITE served straight from the chain's views.

Every served request must give the guest exactly what the general path
(``FuseServer.handle`` through a Reader and a Writer) gives it, byte for byte: the
reply, the data, the file's contents.  Every request it does not take must come back
as None with the file and the reply buffers untouched, and the general path must then
answer it.  The layouts are Linux's (header and arguments in two buffers, one
descriptor per data page) and others a hostile guest may choose.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_fuse_fakes import Session
from vhostfs.errors import VhostfsError
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer
from vhostfs.virtqueue.iov import Reader, Writer

H = abi.fuse_in_header
O = abi.Opcode
SIZE = 64 * 1024
CONTENT = bytes((i * 7 + i // 251) & 0xFF for i in range(SIZE))


@dataclass
class Chain:
    head: int
    readable: list
    writable: list
    readable_len: int
    writable_len: int


def split(data: bytes, sizes) -> list[memoryview]:
    """``data`` in separate buffers of the given sizes (the last takes the rest)."""
    out, pos = [], 0
    for n in sizes:
        out.append(memoryview(bytearray(data[pos:pos + n])))
        pos += n
    if pos < len(data) or not out:
        out.append(memoryview(bytearray(data[pos:])))
    return out


def chain(request: bytes, rsizes, wsizes) -> Chain:
    readable = split(request, rsizes)
    writable = [memoryview(bytearray(n)) for n in wsizes]
    return Chain(0, readable, writable, sum(map(len, readable)), sum(map(len, writable)))


def general(server, c: Chain) -> int:
    return server.handle(Reader(c.readable, c.readable_len), Writer(c.writable, c.writable_len))


def out_bytes(c: Chain) -> bytes:
    return b"".join(bytes(v) for v in c.writable)


def request(opcode, nodeid, body, *, unique=7, length=None, extlen=0, data=b"") -> bytes:
    n = H.size + len(body) + len(data) if length is None else length
    return H.pack(n, opcode, unique, nodeid, 0, 0, 1, extlen, 0) + body + data


class World:
    def __init__(self, share) -> None:
        from vhostfs.fs.passthrough import PassthroughFs
        (share / "f").write_bytes(CONTENT)
        (share / "g").write_bytes(CONTENT)
        os.mkfifo(share / "p")
        self.share = share
        self.server = FuseServer(PassthroughFs(str(share)))
        self.session = Session(self.server)
        self.session.init()
        self.f, self.fh = self.open("f", os.O_RDWR)
        self.g, self.gh = self.open("g", os.O_RDWR)
        _, self.ro = self.open("f", os.O_RDONLY)
        self.fifo = self.lookup("p")

    def lookup(self, name: str) -> int:
        return abi.fuse_entry_out.unpack_from(
            self.session.request(O.LOOKUP, 1, name.encode() + b"\0"))[0]

    def open(self, name: str, flags: int) -> tuple[int, int]:
        nodeid = self.lookup(name)
        fh = abi.fuse_open_out.unpack_from(
            self.session.request(O.OPEN, nodeid, abi.fuse_open_in.pack(flags, 0)))[0]
        return nodeid, fh

    def read_req(self, offset, size, *, fh=None, nodeid=None, **kw) -> bytes:
        return request(O.READ, self.f if nodeid is None else nodeid,
                       abi.fuse_read_in.pack(self.fh if fh is None else fh, offset, size, 0, 0, 0, 0), **kw)

    def write_req(self, nodeid, fh, offset, data, **kw) -> bytes:
        return request(O.WRITE, nodeid, abi.fuse_write_in.pack(fh, offset, len(data), 0, 0, 0, 0),
                       data=data, **kw)


@pytest.fixture
def world(share):
    return World(share)


def same_as_general(w: World, req: bytes, rsizes, wsizes) -> int:
    fast_c, gen_c = chain(req, rsizes, wsizes), chain(req, rsizes, wsizes)
    n = w.server.serve_fast(fast_c)
    assert n is not None, "the fast path declined a request it takes"
    assert n == general(w.server, gen_c)
    assert out_bytes(fast_c)[:n] == out_bytes(gen_c)[:n]
    return n


@pytest.mark.parametrize("rsizes,wsizes", [
    ([40, 40], [16, 4096]),                  # Linux: header | args, out header | page
    ([80], [16 + 4096]),                     # one buffer each
    ([40, 40], [16] + [4096] * 3),           # several pages
    ([40, 40], [16, 1, 2, 3, 5000]),         # odd splits
    ([40, 40], [20, 4092]),                  # data starts in the out header's buffer
])
@pytest.mark.parametrize("offset,size", [(0, 4096), (8192, 4096), (SIZE - 100, 4096),
                                         (SIZE + 10, 4096), (5, 0), (3, 12288)])
def test_read_is_what_the_general_path_gives(world, rsizes, wsizes, offset, size):
    n = same_as_general(world, world.read_req(offset, size), rsizes, wsizes)
    want = CONTENT[offset:offset + min(size, sum(wsizes) - 16)]
    assert n == 16 + len(want)


@pytest.mark.parametrize("rsizes,wsizes", [([40, 40], [16, 8]), ([40, 40], [24]),
                                           ([80], [16, 4, 4]), ([40, 40, 1, 100], [16, 8])])
@pytest.mark.parametrize("offset,data", [(0, b"x" * 4096), (SIZE - 3, b"tail!"), (100, b""),
                                         (SIZE + 50, b"past the end")])
def test_write_is_what_the_general_path_does(world, rsizes, wsizes, offset, data):
    w = world
    fast_c = chain(w.write_req(w.f, w.fh, offset, data), rsizes, wsizes)
    gen_c = chain(w.write_req(w.g, w.gh, offset, data), rsizes, wsizes)
    n = w.server.serve_fast(fast_c)
    assert n == general(w.server, gen_c) == 24
    assert out_bytes(fast_c) == out_bytes(gen_c)
    assert (w.share / "f").read_bytes() == (w.share / "g").read_bytes()
    assert abi.fuse_write_out.unpack_from(out_bytes(fast_c), 16)[0] == len(data)


def declined(w: World, req: bytes, rsizes=(40, 40), wsizes=(16, 4096), server=None):
    """None from the fast path, nothing written anywhere; then the general path's reply."""
    server = server or w.server
    before = (w.share / "f").read_bytes()
    c = chain(req, rsizes, wsizes)
    assert server.serve_fast(c) is None
    assert out_bytes(c) == bytes(sum(wsizes)), "reply buffers touched"
    assert (w.share / "f").read_bytes() == before, "file touched"
    c = chain(req, rsizes, wsizes)
    n = general(server, c)
    return abi.fuse_out_header.unpack_from(out_bytes(c))[1] if n else None


def test_declines_what_the_general_path_refuses(world):
    w = world
    assert declined(w, w.read_req(0, 1 << 30)) == -22                        # > max_read
    assert declined(w, w.read_req(1 << 63, 10)) == -22                       # offset
    assert declined(w, w.read_req(0, 10, fh=12345)) == -9                    # EBADF
    assert declined(w, w.read_req(0, 10, length=90)) == -22                  # len lies
    assert declined(w, w.write_req(w.f, w.ro, 0, b"nope")) == -9             # read-only fh
    assert declined(w, w.write_req(w.f, w.fh, 0, b"abc", length=120)) == -22
    big = w.server.max_write + 1
    hdr = request(O.WRITE, w.f, abi.fuse_write_in.pack(w.fh, 0, big, 0, 0, 0, 0))
    assert declined(w, hdr + b"z" * 16, rsizes=(40, 40)) == -22              # > max_write


def test_declines_other_layouts_and_requests(world):
    w = world
    req = w.read_req(0, 100)
    assert declined(w, req, rsizes=(10, 70)) == 0                 # header split
    assert declined(w, req, rsizes=(40, 20, 20)) == 0             # arguments split
    assert declined(w, req, wsizes=(8, 4096)) == 0                # out header split
    assert declined(w, req + b"extra", rsizes=(40, 45)) == -22     # READ with trailing bytes
    readdir_req = request(O.READDIR, 1, abi.fuse_read_in.pack(0, 0, 4096, 0, 0, 0, 0))
    assert len(readdir_req) == 80 and declined(w, readdir_req) == -9       # not SMALL_OPS
    assert declined(w, w.read_req(0, 10, extlen=1)) == -22         # extensions not negotiated
    # a FIFO's READ may block: the general path serves it (on a dedicated thread)
    c = chain(w.read_req(0, 10, nodeid=w.fifo), (40, 40), (16, 4096))
    assert w.server.serve_fast(c) is None and out_bytes(c) == bytes(16 + 4096)


def test_declines_before_init(share):
    from vhostfs.fs.passthrough import PassthroughFs
    (share / "f").write_bytes(b"data")
    server = FuseServer(PassthroughFs(str(share)))
    req = request(O.READ, 1, abi.fuse_read_in.pack(1, 0, 4, 0, 0, 0, 0))
    assert server.serve_fast(chain(req, (40, 40), (16, 16))) is None


def test_metrics_observe_fast_requests(world):
    seen = []
    world.server.observer = lambda *a: seen.append(a[:4])
    same_as_general(world, world.read_req(0, 10, unique=99), (40, 40), (16, 10))
    assert seen[0] == (O.READ, 99, world.f, 0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(["read", "write"]),
       offset=st.integers(0, SIZE + 4096), size=st.integers(0, 3 * 4096),
       rsplit=st.lists(st.integers(1, 5000), max_size=5),
       wsplit=st.lists(st.integers(1, 5000), min_size=1, max_size=6),
       linux=st.booleans())
def test_fast_path_matches_the_general_path(share_factory, op, offset, size, rsplit, wsplit, linux):
    """Random buffer layouts: when the fast path serves, guest and host see what the
    general path gives; when it declines, the general path still answers."""
    w = share_factory()
    if op == "read":
        fast_req = gen_req = w.read_req(offset, size)
    else:
        data = bytes((i * 13) & 0xFF for i in range(size))
        fast_req = w.write_req(w.f, w.fh, offset, data)
        gen_req = w.write_req(w.g, w.gh, offset, data)
    rsizes = ([40, 40] if linux else []) + rsplit
    wsizes = ([16] if linux else []) + wsplit
    fast_c, gen_c = chain(fast_req, rsizes, wsizes), chain(gen_req, rsizes, wsizes)
    n = w.server.serve_fast(fast_c)
    try:
        m = general(w.server, gen_c)
    except VhostfsError:    # no room for a reply header: the runtime drops the request
        m = None
    if n is None:
        assert out_bytes(fast_c) == bytes(sum(map(len, fast_c.writable)))
        return
    assert n == m and out_bytes(fast_c)[:n] == out_bytes(gen_c)[:n]
    assert (w.share / "f").read_bytes() == (w.share / "g").read_bytes()


@pytest.fixture
def share_factory(tmp_path_factory):
    def make():
        d = tmp_path_factory.mktemp("fast")
        return World(d)
    return make


def test_fifo_node_type_is_what_declines(world):
    assert stat.S_ISFIFO(world.server.fs.node_type(world.fifo))


# --- serve_small: SMALL_OPS -----------------------------------------------------------------
READ_ONLY = [O.LOOKUP, O.GETATTR, O.READLINK, O.ACCESS, O.STATFS, O.STATX, O.GETXATTR,
             O.LISTXATTR, O.GETLK, O.LSEEK]
MUTATING = [O.OPEN, O.OPENDIR, O.CREATE, O.MKDIR, O.MKNOD, O.SYMLINK, O.LINK, O.UNLINK,
            O.RMDIR, O.RENAME, O.RENAME2, O.FLUSH, O.RELEASE, O.RELEASEDIR]


def test_small_ops_are_the_fast_path_s():
    from vhostfs.fuse import blocking, fastpath
    assert fastpath.SMALL_OPS == frozenset(READ_ONLY + MUTATING + [O.FORGET, O.BATCH_FORGET])
    assert not fastpath.SMALL_OPS & blocking.BULK_OPS and not fastpath.SMALL_OPS & blocking.ALWAYS


def small_request(w, opcode, nodeid_pick, body_pick, raw):
    nodeid = {0: 1, 1: w.f, 2: w.fifo, 3: 999_999}[nodeid_pick]
    bodies = {
        O.LOOKUP: [b"f\0", b"nope\0", b"f"],
        O.GETATTR: [abi.fuse_getattr_in.pack(0, 0, 0), abi.fuse_getattr_in.pack(1, 0, w.fh)],
        O.ACCESS: [abi.fuse_access_in.pack(4, 0)],
        O.GETXATTR: [abi.fuse_getxattr_in.pack(64, 0) + b"user.x\0"],
        O.LISTXATTR: [abi.fuse_getxattr_in.pack(0, 0)],
        O.LSEEK: [abi.fuse_lseek_in.pack(w.fh, 10, 0, 0)],
        O.OPEN: [abi.fuse_open_in.pack(os.O_RDONLY, 0)],
        O.OPENDIR: [abi.fuse_open_in.pack(os.O_RDONLY, 0)],
        O.CREATE: [abi.fuse_create_in.pack(os.O_RDWR | os.O_CREAT, 0o644, 0o022, 0) + b"new\0"],
        O.MKDIR: [abi.fuse_mkdir_in.pack(0o755, 0o022) + b"d\0"],
        O.SYMLINK: [b"s\0target\0"],
        O.LINK: [abi.fuse_link_in.pack(w.f) + b"l\0"],
        O.UNLINK: [b"g\0", b"missing\0"],
        O.RMDIR: [b"g\0", b"missing\0"],
        O.RENAME: [abi.fuse_rename_in.pack(1) + b"g\0h\0"],
        O.RENAME2: [abi.fuse_rename2_in.pack(1, 1, 0) + b"g\0f\0"],         # NOREPLACE
        O.FLUSH: [abi.fuse_flush_in.pack(w.gh, 0, 0, 0)],
        O.RELEASE: [abi.fuse_release_in.pack(w.gh, 0, 0, 0), abi.fuse_release_in.pack(77, 0, 0, 0)],
        O.RELEASEDIR: [abi.fuse_release_in.pack(w.gh, 0, 0, 0)],
    }.get(opcode, [b""])
    body = raw if raw is not None else bodies[body_pick % len(bodies)]
    return request(opcode, nodeid, body)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opcode=st.sampled_from(READ_ONLY + MUTATING), nodeid=st.integers(0, 3),
       body=st.integers(0, 3), raw=st.none() | st.binary(max_size=120),
       wsplit=st.sampled_from([[16, 4096], [4112], [16, 8, 4096], [20], [16]]),
       linux=st.booleans())
def test_small_ops_answer_as_the_general_path(share_factory, opcode, nodeid, body, raw,
                                             wsplit, linux):
    """Same reply bytes as the general path (read-only requests: on the same share;
    requests that create something: on two identical shares, same error and length)."""
    a = share_factory()
    b = a if opcode in READ_ONLY else share_factory()
    req = small_request(a, opcode, nodeid, body, raw)
    rsizes = [40] if linux else []
    fast_c, gen_c = chain(req, rsizes, wsplit), chain(req, rsizes, wsplit)
    n = a.server.serve_fast(fast_c)
    m = general(b.server, gen_c)
    if n is None:
        assert out_bytes(fast_c) == bytes(sum(wsplit))
        assert nodeid == 2 and opcode in (O.OPEN, O.OPENDIR)     # a FIFO: general path
        return
    fo, go = out_bytes(fast_c), out_bytes(gen_c)
    assert n == m
    f_len, f_err, f_unique = abi.fuse_out_header.unpack_from(fo)
    assert (f_len, f_err, f_unique) == abi.fuse_out_header.unpack_from(go)
    if opcode in READ_ONLY and opcode not in (O.GETATTR, O.STATX, O.LOOKUP):
        assert fo[:n] == go[:n]


def test_forget_has_no_reply(world):
    w = world
    nodeid = w.lookup("g")
    c = chain(request(O.FORGET, nodeid, abi.fuse_forget_in.pack(1)), [40], [])
    c.writable, c.writable_len = [], 0
    assert w.server.serve_fast(c) == 0


def test_more_buffers_than_iov_max_take_the_general_path(world):
    """preadv refuses more than IOV_MAX vectors (EINVAL, nothing read): the general path,
    which batches them, serves such a chain."""
    from vhostfs.virtqueue.iov import IOV_MAX
    wsizes = [16] + [1] * (IOV_MAX + 76)
    c = chain(world.read_req(0, 4096), [40, 40], wsizes)
    assert world.server.serve_fast(c) is None
    g = chain(world.read_req(0, 4096), [40, 40], wsizes)
    assert general(world.server, g) == 16 + IOV_MAX + 76
    assert out_bytes(g)[16:] == CONTENT[:IOV_MAX + 76]
