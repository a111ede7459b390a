"""Concurrent requests: exact lookup counts and per-thread credentials under threads."""
from __future__ import annotations

import os
import threading

import pytest

from test_passthrough_roundtrip import Client
from vhostfs.fs.passthrough import PassthroughFs
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer

O = abi.Opcode


def run_threads(n, target):
    errors = []

    def wrap(i):
        try:
            target(i)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_concurrent_lookup_forget_counts(tmp_path):
    for i in range(4):
        (tmp_path / f"f{i}").write_bytes(b"")
    fs = PassthroughFs(str(tmp_path))
    c = Client(FuseServer(fs))
    c.init()

    def worker(i):
        name = f"f{i % 4}".encode()
        for _ in range(300):
            nodeid = c.lookup(1, name)[0]
            c.getattr(nodeid)
            c.forget(nodeid, 1)

    run_threads(8, worker)
    assert len(fs.inodes) == 1  # only the root is left


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch fsuid")
def test_concurrent_creates_get_their_callers_ids(tmp_path):
    os.chmod(tmp_path, 0o777)
    c = Client(FuseServer(PassthroughFs(str(tmp_path))))
    c.init()

    def worker(i):
        uid = 1000 + i
        for j in range(100):
            body = abi.fuse_create_in.pack(os.O_RDWR | os.O_CREAT, 0o100644, 0, 0) + f"u{i}_{j}\0".encode()
            out = c.request(O.CREATE, 1, body, uid=uid, gid=uid)
            fh = abi.fuse_open_out.unpack(out[128:])[0]
            c.release(abi.fuse_entry_out.unpack(out[:128])[0], fh)

    run_threads(6, worker)
    for i in range(6):
        for j in range(100):
            st = os.stat(tmp_path / f"u{i}_{j}")
            assert (st.st_uid, st.st_gid) == (1000 + i, 1000 + i)
    assert os.getuid() == 0 and os.geteuid() == 0
