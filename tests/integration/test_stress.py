"""Stress: the real daemon assembly (vhost-user device, QueueRunners, FuseServer,
PassthroughFs) over a real socket, driven by the simulated frontend and driver rings.

100,000 mixed FUSE requests per EVENT_IDX setting (``VHOSTFS_STRESS_REQUESTS=1000000``
for the long run) on 4 request queues with pools of 8, ring sizes from 128 to
32768 whose indices start just below 2^16 so both the ring slots and the u16 indices
wrap, EVENT_IDX on and off.  Completion order is shuffled on purpose (a shim sleeps a
random few hundred microseconds before a third of the requests).  Mid-run the frontend
adds then removes a memory region (memory-table changes with requests in flight) and stops and
restarts rings (GET_VRING_BASE with requests in flight: everything popped must be in
the used ring when the base is reported).

Checked for every request: exactly one reply (uniques are counted; an unknown head or
a wrong unique in the used ring fails at once), the right length and the right content
(READ bytes equal the host file's, LOOKUP/GETATTR name the right inode, WRITE sizes,
ENOENT for missing names); at the end every WRITE's bytes are read back on the host.

The driver never waits forever: every wait on a call eventfd is bounded (BOUND seconds)
and a timeout fails loudly, telling a lost notification (completions sat in the used
ring without a call) from a stalled backend.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import select
import threading
import time

import pytest

from tests.support import fuse_client as fc
from tests.support.driver import Driver, FakeGuestMemory
from tests.support.frontend import Frontend, MemfdRam
from vhostfs.config import Config
from vhostfs.fuse import abi
from vhostfs.fuse.blocking import BULK
from vhostfs.runtime.daemon import Daemon
from vhostfs.vhost_user import messages as vm
from vhostfs.vhost_user import transport

# RingChannel's own lean Driver subclass where the client has one.
DRIVER = getattr(fc, "SlotDriver", Driver)
REQUESTS = int(os.environ.get("VHOSTFS_STRESS_REQUESTS", "100000"))
QUEUES = 4
POOL = 8
BOUND = 30.0              # seconds any single wait may take before the test fails
READ_FILE_SIZE = 1 << 20
DATA = 8 << 10            # per-slot data buffer (READ destination / WRITE payload)
WRITE_BLOCK = 64
NAMES = [f"n{i:03d}" for i in range(32)]


class Shuffle:
    """Wraps the FuseServer: a random delay before a third of the requests, so replies
    complete in an order unrelated to the submission order.  The delayed ones are
    routed to the worker pool (``BULK``), as a slow request would be: a quick one is
    served inline on the queue thread, in ring order."""

    def __init__(self, server, seed: int) -> None:
        self.server = server
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._delay: dict[int, float] = {}      # id(reader) -> seconds

    def may_block(self, reader):
        key = self.server.may_block(reader)
        with self._lock:
            delay = self._rng.random() * 0.0006 if self._rng.random() < 0.33 else 0.0
            if delay and key is None:
                self._delay[id(reader)] = delay
                return BULK
        return key

    def handle(self, reader, writer, cancel=None):
        with self._lock:
            delay = self._delay.pop(id(reader), 0.0)
        if delay:
            time.sleep(delay)
        if cancel is None:
            return self.server.handle(reader, writer)
        return self.server.handle(reader, writer, cancel=cancel)


class Backend:
    def __init__(self, share, sock_path: str, shuffle_seed: int | None, *, pool: int = POOL,
                 queues: int = QUEUES) -> None:
        config = Config(shared_dir=str(share), socket_path=sock_path, thread_pool_size=pool,
                        num_request_queues=queues, log_level="error").validate()
        self.daemon = Daemon(config)
        if shuffle_seed is not None:
            self.daemon.server = Shuffle(self.daemon.server, shuffle_seed)
        self.listener = transport.listen(sock_path)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="stress-backend", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            sock, _ = self.listener.accept()
            self.listener.close()
            transport.serve_connection(sock, self.daemon.make_device())
        except BaseException as exc:   # surfaced by the test
            self.error = exc
        finally:
            self.daemon.stop_all()

    def join(self) -> None:
        self.thread.join(BOUND)
        assert not self.thread.is_alive(), "backend did not finish after the frontend closed"
        assert self.error is None, repr(self.error)


class Queue:
    """One request queue as the driver sees it, with what it expects back."""

    def __init__(self, index: int, channel: fc.RingChannel, driver: Driver, size: int,
                 start: int) -> None:
        self.index = index
        self.channel = channel
        self.driver = driver
        self.size = size
        self.start = start
        self.expect: dict[int, tuple] = {}     # unique -> what the reply must be
        self.write_seq = 0
        self.max_unique = 0
        self.out_of_order = 0    # replies that completed before an earlier-submitted one


def make_share(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    data = random.Random(7).randbytes(READ_FILE_SIZE)
    (share / "r").write_bytes(data)
    for name in NAMES:
        (share / name).write_bytes(name.encode() * 3)
    for q in range(1, QUEUES + 1):
        (share / f"w{q}").write_bytes(b"")
    return share, data


def connect(share, tmp_path, event_idx: bool, sizes: list[int], seed: int):
    sock = str(tmp_path / f"stress-{int(event_idx)}.sock")
    backend = Backend(share, sock, seed)
    fe = Frontend.connect(sock)
    fe.init(QUEUES + 1)
    assert fe.queue_num >= QUEUES + 1
    if not event_idx:
        fe.features &= ~(1 << vm.VIRTIO_RING_F_EVENT_IDX)
    assert bool(fe.features & (1 << vm.VIRTIO_RING_F_EVENT_IDX)) == event_idx
    mem = FakeGuestMemory([(0, 64 << 20)])
    fe.set_memory(mem)
    queues, hiprio = [], None
    for q, size in enumerate([128] + sizes):
        # Start the indices just below 2^16 so the u16 indices wrap mid-run (and the ring
        # slots with them: 2^16 is a multiple of every ring size).
        start = (0x10000 - 13 * (q + 1)) & 0xFFFF
        drv = DRIVER(mem, size, event_idx=event_idx, start_idx=start)
        vring = fe.start_vring(q, size, drv.desc_uva, drv.avail_uva, drv.used_uva, base=start)
        if event_idx:
            drv.set_used_event(start)
        depth = 4 if q == 0 else min(64, size // fc.MAX_LINKS)
        ch = fc.RingChannel(drv, vring.call_fd, vring.kick, depth=depth,
                            data_size=DATA if q else 0, body_size=8192 if q else 4096,
                            uid=os.getuid(), gid=os.getgid(), pid=os.getpid())
        if q == 0:
            hiprio = Queue(0, ch, drv, size, start)
        else:
            queues.append(Queue(q, ch, drv, size, start))
    return backend, fe, mem, hiprio, queues


def call(queue: Queue, op: fc.Op, data: bytes | None = None) -> fc.Reply:
    r = queue.channel.call(op, data=data, timeout=BOUND)
    if r.error:
        raise fc.FuseError(r.opcode, r.error)
    return r


class Mix:
    """Random requests and the reply each must get."""

    def __init__(self, rng: random.Random, ids: dict, read_data: bytes) -> None:
        self.rng = rng
        self.ids = ids
        self.read_data = read_data

    def next(self, q: Queue):
        rng, ids = self.rng, self.ids
        k = rng.random()
        if k < 0.30:
            off = rng.randrange(0, READ_FILE_SIZE + 4096)
            size = rng.choice((1, 512, 4096, DATA, rng.randrange(1, DATA)))
            return (fc.encode_read(ids["r"], ids["r.fh"], off, size),
                    ("read", self.read_data[off:off + size]), None)
        if k < 0.50:
            seq = q.write_seq
            q.write_seq += 1
            payload = block(q.index, seq)
            return (fc.encode_write(ids[f"w{q.index}"], ids[f"w{q.index}.fh"], seq * WRITE_BLOCK,
                                    WRITE_BLOCK, flags=os.O_RDWR), ("write", WRITE_BLOCK), payload)
        if k < 0.70:
            name = rng.choice(NAMES)
            return fc.encode_lookup(abi.ROOT_ID, name), ("lookup", ids[name]), None
        if k < 0.85:
            name = rng.choice(NAMES + ["r"])
            return fc.encode_getattr(ids[name]), ("getattr", ids[name + ".ino"]), None
        if k < 0.93:
            return fc.encode_lookup(abi.ROOT_ID, f"missing{rng.randrange(1000)}"), ("enoent",), None
        return fc.encode_statfs(), ("statfs",), None


def block(q: int, seq: int) -> bytes:
    return hashlib.blake2b(f"{q}:{seq}".encode(), digest_size=WRITE_BLOCK).digest()


def check_reply(r: fc.Reply, want: tuple, counts: dict) -> None:
    kind = want[0]
    if kind == "enoent":
        assert r.error == -errno.ENOENT, (r.unique, r.error)
        return
    assert r.error == 0, (kind, r.unique, r.error)
    if kind == "read":
        assert bytes(r.data_view) == want[1], f"READ {r.unique}: wrong bytes"
    elif kind == "write":
        assert fc.decode_write(r.body) == want[1]
    elif kind == "lookup":
        e = fc.decode_entry(r.body)
        assert e.nodeid == want[1], (e.nodeid, want[1])
        counts[e.nodeid] = counts.get(e.nodeid, 0) + 1
    elif kind == "getattr":
        assert fc.decode_attr(r.body).ino == want[1]
    elif kind == "statfs":
        assert len(r.body) == abi.fuse_statfs_out.size


def wait_any(queues: list[Queue], hiprio: Queue) -> None:
    """Sleep on every call eventfd, bounded; on timeout say why and fail."""
    fds = [q.channel.call_fd for q in queues] + [hiprio.channel.call_fd]
    ready = select.select(fds, [], [], BOUND)[0]
    for fd in ready:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
    if ready:
        return
    lost = [(q.index, q.driver.used_idx, q.driver.last_used) for q in queues
            if q.driver.used_idx != q.driver.last_used]
    outstanding = {q.index: q.channel.in_flight for q in queues}
    if lost:
        pytest.fail(f"lost used-buffer notification: completions sat in the used ring "
                    f"with no call for {BOUND} s (queue, used idx, reaped up to): {lost}")
    pytest.fail(f"backend stalled: no completion for {BOUND} s; in flight per queue: {outstanding}")


def run_stress(tmp_path, *, event_idx: bool, sizes: list[int], total: int, seed: int):
    share, read_data = make_share(tmp_path)
    backend, fe, mem, hiprio, queues = connect(share, tmp_path, event_idx, sizes, seed)
    rng = random.Random(seed)
    extra_ram = None
    try:
        q1 = queues[0]
        init = fc.decode_init(call(q1, fc.encode_init()).body)
        assert init.major == abi.KERNEL_VERSION
        ids, counts = {}, {}
        for name in NAMES + ["r"] + [f"w{q.index}" for q in queues]:
            e = fc.decode_entry(call(q1, fc.encode_lookup(abi.ROOT_ID, name)).body)
            ids[name], ids[name + ".ino"] = e.nodeid, e.attr.ino
            counts[e.nodeid] = counts.get(e.nodeid, 0) + 1
        ids["r.fh"] = fc.decode_open(call(q1, fc.encode_open(ids["r"])).body)[0]
        for q in queues:
            ids[f"w{q.index}.fh"] = fc.decode_open(
                call(q1, fc.encode_open(ids[f"w{q.index}"], os.O_RDWR)).body)[0]
        mix = Mix(rng, ids, read_data)

        submitted = done = 0
        seen: set[tuple[int, int]] = set()
        events = {total // 4: "stop", total // 2: "add-region", (3 * total) // 5: "remove-region",
                  (3 * total) // 4: "stop"}
        stops = 0
        while done < total:
            for q in queues:
                ch = q.channel
                while ch.has_free_slot and submitted < total:
                    op, want, payload = mix.next(q)
                    if payload is not None:
                        ch.next_free_slot().data[:len(payload)] = payload
                    unique = ch.submit(op, publish=False)
                    q.expect[unique] = want
                    submitted += 1
                ch.publish()
            wait_any(queues, hiprio)
            for q in queues:
                for r in q.channel.reap():
                    key = (q.index, r.unique)
                    assert key not in seen, f"second reply for {key}"
                    seen.add(key)
                    if r.unique < q.max_unique:
                        q.out_of_order += 1
                    q.max_unique = max(q.max_unique, r.unique)
                    check_reply(r, q.expect.pop(r.unique), counts)
                    done += 1
            for mark in [m for m in events if done >= m]:
                what = events.pop(mark)
                if what == "add-region":
                    # A new region while requests are in flight: every runner re-attaches
                    # under its lock; nothing in use is unmapped.
                    extra_ram = MemfdRam([(1 << 34, 1 << 20)])
                    fe.add_mem_reg(extra_ram.table()[0])
                elif what == "remove-region":
                    gpa, size, uva, _fd, _map = extra_ram.regions[0]
                    fe.rem_mem_reg((gpa, size, uva, 0))
                else:
                    q = queues[stops % len(queues)]
                    stops += 1
                    base = fe.stop_vring(q.index)
                    # Everything popped is in the used ring when the base is reported.
                    assert base == q.driver.used_idx, (q.index, base, q.driver.used_idx)
                    fe.start_vring(q.index, q.size, q.driver.desc_uva, q.driver.avail_uva,
                                   q.driver.used_uva, base=base)
        assert submitted == done == total == len(seen)
        for q in queues:
            assert not q.expect and q.channel.in_flight == 0
            assert q.driver.used_idx == q.driver.avail_idx      # nothing left behind
        # hiprio: FORGET everything we looked up, BATCH_FORGET style
        items = sorted(counts.items())
        per = 200
        for i in range(0, len(items), per):
            hiprio.channel.call(fc.encode_batch_forget(items[i:i + per]), timeout=BOUND)
        # every WRITE's bytes, read back on the host
        for q in queues:
            raw = (share / f"w{q.index}").read_bytes()
            assert len(raw) == q.write_seq * WRITE_BLOCK
            for seq in range(q.write_seq):
                assert raw[seq * WRITE_BLOCK:(seq + 1) * WRITE_BLOCK] == block(q.index, seq), \
                    f"queue {q.index}: WRITE {seq} bytes wrong on the host"
        return {"wrapped": [q.driver.avail_idx < q.start for q in queues], "stops": stops,
                "out_of_order": [q.out_of_order for q in queues]}
    finally:
        fe.close()
        backend.join()
        mem.close()
        if extra_ram is not None:
            extra_ram.close()


@pytest.mark.parametrize("event_idx,sizes", [
    (True, [128, 1024, 4096, 32768]),
    (False, [32768, 8192, 256, 128]),
], ids=["event_idx", "no_event_idx"])
def test_stress_mixed_requests(tmp_path, event_idx, sizes):
    seed = 1234 + int(event_idx)
    info = run_stress(tmp_path, event_idx=event_idx, sizes=sizes, total=REQUESTS, seed=seed)
    assert all(info["wrapped"]), "the ring indices were meant to wrap past 2^16"
    assert info["stops"] == 2
    # replies really came back out of submission order on every queue
    assert all(n > 0 for n in info["out_of_order"]), info["out_of_order"]
    print(f"out-of-order completions per queue: {info['out_of_order']}")
