"""Benchmark workloads' reply handling (no backend, no timing): the fast READDIRPLUS walk
agrees with the full decoder, dependent CREATE cycles advance, reads check their block tag."""
from __future__ import annotations

import os
import struct

import pytest

from vhostfs.fuse import abi
from tests.bench import workloads as wl
from tests.support import fuse_client as fc


def _reply(opcode, body=b"", *, error=0, tag=0, data_view=None):
    n = 16 + (len(body) if data_view is None else len(data_view))
    return fc.Reply(1, opcode, error, 16 if error else n, body, tag, 0.0, 0.0, 0, data_view)


def _attr(ino):
    return (ino, 0, 0, 0, 0, 0, 0, 0, 0, 0o100644, 1, 0, 0, 0, 4096, 0)


def _direntplus(nodeid, off, name):
    raw = abi.fuse_direntplus.pack(nodeid, 0, 0, 0, 0, 0, *_attr(nodeid), nodeid, off, len(name), 8) + name
    return raw + bytes(-len(raw) % 8)


def test_readdirplus_walk_matches_decoder_and_counts_lookups():
    w = wl.ReaddirPlus()
    w.dir, w.handles, w.offsets, w.entries, w.scans = 7, [11], [0], 0, 0
    body = _direntplus(0, 1, b".") + _direntplus(20, 2, b"a-name") + _direntplus(21, 3, b"b" * 13)
    ents = fc.decode_readdirplus(body)
    op = w.next(0, _reply(fc.O.READDIRPLUS, body))
    assert w.offsets[0] == ents[-1].off == 3 and w.entries == 3
    assert w.forgets == {20: 1, 21: 1}                  # nodeid 0 ("." without lookup) is not counted
    assert struct.unpack_from("<QQI", op.args)[:3] == (11, 3, 4096)
    w.next(0, _reply(fc.O.READDIRPLUS, b""))            # end of directory: scan again from 0
    assert w.offsets[0] == 0 and w.scans == 1


def test_create_cycle_and_teardown_finish_interrupted_cycles():
    w = wl.CreateUnlink()
    w.dir, w.state, w.serial = 5, {}, [0, 0]
    first = w.first(1)
    assert first.opcode == fc.O.CREATE and first.args.endswith(b"s1-0\0")
    create_body = abi.fuse_entry_out.pack(40, 0, 0, 0, 0, 0, *_attr(40)) + abi.fuse_open_out.pack(9, 0, 0)
    rel = w.next(1, _reply(fc.O.CREATE, create_body))
    assert (rel.opcode, rel.nodeid, struct.unpack_from("<Q", rel.args)[0]) == (fc.O.RELEASE, 40, 9)
    unl = w.next(1, _reply(fc.O.RELEASE))
    assert unl.opcode == fc.O.UNLINK and unl.args == b"s1-0\0"
    again = w.next(1, _reply(fc.O.UNLINK))
    assert again.args.endswith(b"s1-1\0") and w.pending_forgets == [(40, 1)]
    with pytest.raises(wl.BenchError, match="File exists"):
        w.next(1, _reply(fc.O.CREATE, error=-17))


class _Conn:
    def __init__(self):
        self.calls = []
        self.channels = [self]

    def release(self, node, fh):
        self.calls.append(("release", node, fh))

    def unlink(self, parent, name):
        self.calls.append(("unlink", parent, name))

    def call(self, op):
        self.calls.append(("forget", op.opcode))
        return _reply(op.opcode)


def test_create_teardown_releases_and_unlinks_what_the_window_cut_off():
    w = wl.CreateUnlink()
    w.dir, w.serial = 5, [0, 0, 0]
    w.state = {0: (0, b"x", 0, 0), 1: (1, b"y", 41, 3), 2: (2, b"z", 42, 0)}
    conn = _Conn()
    w.teardown(conn)
    assert conn.calls[:3] == [("release", 41, 3), ("unlink", 5, b"y"), ("unlink", 5, b"z")]
    assert conn.calls[3] == ("forget", fc.O.BATCH_FORGET)


def test_read_checks_length_and_block_tag():
    w = wl.RandRead()
    w.nodeid, w.fh, w.blocks, w.pos = 3, 1, wl.RAND_SPAN // 4096, 0
    good = memoryview(struct.pack("<Q", 17) + bytes(4088))
    assert w.next(0, _reply(fc.O.READ, data_view=good)).opcode == fc.O.READ
    with pytest.raises(wl.BenchError, match="block tag"):
        w.next(0, _reply(fc.O.READ, data_view=memoryview(struct.pack("<Q", 1 << 40) + bytes(4088))))
    with pytest.raises(wl.BenchError, match="bytes of 4096"):
        w.next(0, _reply(fc.O.READ, data_view=good[:100]))


def test_sequential_offsets_wrap():
    w = wl.SeqRead()
    w.nodeid, w.fh, w.pos, w.blocks = 3, 1, wl.READ_SIZE - wl.MiB, 1
    offs = [struct.unpack_from("<QQ", w.first(0).args)[1] for _ in range(2)]
    assert offs == [wl.READ_SIZE - wl.MiB, 0]


def test_dataset_pattern(tmp_path):
    p = os.path.join(tmp_path, "f")
    wl._write_pattern_file(p, 2 * wl.MiB)
    with open(p, "rb") as f:
        data = f.read()
    assert len(data) == 2 * wl.MiB
    assert struct.unpack_from("<Q", data, 4096 * 300)[0] == 300
