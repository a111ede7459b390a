"""Queue independence through the whole daemon: the hiprio queue (FORGET, BATCH_FORGET,
INTERRUPT) never waits behind request-queue work, and each request queue of a
multiqueue device has its own thread and pool, so a saturated queue does not hold up
another one.

The request-queue work is made slow on purpose and deterministically: READDIR of the
"gated" directory blocks in the filesystem until the test opens a gate.  READDIR is a
bulk request (fuse/blocking.py), served on the queue's one-thread bulk lane, so a gated
one occupies it and the rest wait behind it; quick requests would be served inline on
the queue thread.  Every wait is bounded.
"""
from __future__ import annotations

import os
import threading

import pytest

from tests.integration.test_stress import BOUND, DRIVER, Backend
from tests.support import fuse_client as fc
from tests.support.driver import FakeGuestMemory
from tests.support.frontend import Frontend
from vhostfs.fuse import abi
from vhostfs.vhost_user import messages as vm

POOL = 2
GATED = POOL + 4      # READDIRs submitted: one served, the rest waiting


class Gate:
    """Wraps fs.readdir: READDIR of the directory ``nodeid`` waits until ``opened``."""

    def __init__(self, fs) -> None:
        self.fs_readdir = fs.readdir
        self.nodeid = None
        self.opened = threading.Event()
        self.lock = threading.Lock()
        self.waiting = 0
        self.all_waiting = threading.Event()
        self.expect = 0

    def readdir(self, ctx, nodeid, fh, offset, buf):
        if nodeid == self.nodeid:
            with self.lock:
                self.waiting += 1
                if self.waiting >= self.expect:
                    self.all_waiting.set()
            assert self.opened.wait(BOUND), "gate never opened"
        return self.fs_readdir(ctx, nodeid, fh, offset, buf)


@pytest.fixture
def device(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "gated").mkdir()
    for i in range(8):
        (share / f"f{i}").write_bytes(b"x")
    sock = str(tmp_path / "q.sock")
    backend = Backend(share, sock, None, pool=POOL, queues=4)
    gate = Gate(backend.daemon.fs)
    backend.daemon.fs.readdir = gate.readdir
    fe = Frontend.connect(sock)
    fe.init(5)
    mem = FakeGuestMemory([(0, 32 << 20)])
    fe.set_memory(mem)
    channels = []
    for q in range(5):
        drv = DRIVER(mem, 256, event_idx=True)
        vring = fe.start_vring(q, 256, drv.desc_uva, drv.avail_uva, drv.used_uva)
        drv.set_used_event(0)
        channels.append(fc.RingChannel(drv, vring.call_fd, vring.kick, depth=16,
                                       data_size=4096 if q else 0, body_size=4096,
                                       uid=os.getuid(), gid=os.getgid(), pid=os.getpid()))
    fe.get_u64(vm.Request.GET_FEATURES)     # a round trip: every ring above is started
    try:
        yield backend, gate, channels
    finally:
        gate.opened.set()
        fe.close()
        backend.join()
        mem.close()


def ok(r: fc.Reply) -> fc.Reply:
    assert r.error == 0, (r.opcode, r.error)
    return r


def saturate(gate: Gate, ch: fc.RingChannel) -> list[int]:
    """GATED READDIRs of the gated directory (each on a handle of its own): one occupies
    the bulk lane, the rest queue behind it."""
    gate.nodeid = fc.decode_entry(ok(ch.call(fc.encode_lookup(abi.ROOT_ID, "gated"),
                                             timeout=BOUND)).body).nodeid
    fhs = [fc.decode_open(ok(ch.call(fc.encode_opendir(gate.nodeid), timeout=BOUND)).body)[0]
           for _ in range(GATED)]
    gate.expect = 1
    us = [ch.submit(fc.encode_readdir(gate.nodeid, fh, 0)) for fh in fhs]
    assert gate.all_waiting.wait(BOUND), "the pool never filled up"
    return us


def test_hiprio_is_not_behind_request_queue_work(device):
    backend, gate, ch = device
    ok(ch[1].call(fc.encode_init(), timeout=BOUND))
    ids = [fc.decode_entry(ok(ch[1].call(fc.encode_lookup(abi.ROOT_ID, f"f{i}"), timeout=BOUND)).body).nodeid
           for i in range(8)]
    us = saturate(gate, ch[1])
    inodes_before = len(backend.daemon.fs.inodes)
    # FORGET and BATCH_FORGET on hiprio complete while every request-queue worker is busy
    ch[0].call(fc.encode_forget(ids[0], 1), timeout=BOUND)
    ch[0].call(fc.encode_batch_forget([(n, 1) for n in ids[1:]]), timeout=BOUND)
    assert len(backend.daemon.fs.inodes) == inodes_before - 8
    assert not ch[1].reap(), "request-queue work finished before the gate opened"
    gate.opened.set()
    got = []
    while len(got) < len(us):
        got += [ok(r).unique for r in ch[1].reap()]
        if len(got) < len(us):
            assert ch[1].wait(BOUND), "request queue stalled after the gate opened"
    assert sorted(got) == sorted(us)


def test_each_request_queue_has_its_own_thread_and_pool(device):
    backend, gate, ch = device
    ok(ch[1].call(fc.encode_init(), timeout=BOUND))
    runners = backend.daemon.runners
    assert sorted(runners) == [0, 1, 2, 3, 4]
    assert runners[0].pool is None                       # hiprio: inline
    assert all(runners[q].pool is not None for q in (1, 2, 3, 4))
    assert len({id(runners[q].pool) for q in (1, 2, 3, 4)}) == 4
    us = saturate(gate, ch[1])           # queue 1 saturated
    for q in (2, 3, 4):                                  # the others still serve at once
        for _ in range(3):
            ok(ch[q].call(fc.encode_getattr(abi.ROOT_ID), timeout=BOUND))
        ok(ch[q].call(fc.encode_statfs(), timeout=BOUND))
    assert not ch[1].reap()
    names = {t.name for t in threading.enumerate()}
    assert {f"vq{q}" for q in range(5)} <= names
    assert all(f"vq{q}-worker-{i}" in names for q in (1, 2, 3, 4) for i in range(POOL))
    gate.opened.set()
    got = []
    while len(got) < len(us):
        got += [ok(r).unique for r in ch[1].reap()]
        if len(got) < len(us):
            assert ch[1].wait(BOUND), "queue 1 stalled after the gate opened"
    assert sorted(got) == sorted(us)
