"""Streaming READDIR / READDIRPLUS: each directory handle reads its own fd with getdents64
and reports the host filesystem's d_off cookies; memory per handle stays bounded."""
from __future__ import annotations

import errno
import gc
import os
import pathlib
import random
import tempfile
import threading
import tracemalloc

import pytest

from test_passthrough_roundtrip import Client, err
from vhostfs.fs.passthrough.handles import DirHandle
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer

O = abi.Opcode
N = 10_000
_DOTS = (b".", b"..")


def _tmpfs_parent():
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@pytest.fixture(params=["tmp", "tmpfs"])
def share(request, tmp_path):
    """The shared directory on the test's tmp filesystem (ext4 here: hash cookies) and on
    a tmpfs (positional cookies): the two ways Linux hands out d_off."""
    if request.param == "tmp":
        d = tmp_path / "share"
        d.mkdir()
        yield d
        return
    parent = _tmpfs_parent()
    if parent is None:
        pytest.skip("no writable /dev/shm")
    with tempfile.TemporaryDirectory(dir=parent) as t:
        yield pathlib.Path(t)


@pytest.fixture
def c(fs):
    cl = Client(FuseServer(fs))
    cl.init()
    return cl


def _populate(share, n=N):
    names = [f"entry-{i:05d}".encode() for i in range(n)]
    for name in names:
        os.close(os.open(os.path.join(share, os.fsdecode(name)), os.O_CREAT | os.O_WRONLY, 0o644))
    return names


def _list(c, fh, size, plus=False, off=0, limit=1_000_000):
    """All entries from ``off`` on, resuming at each batch's last d_off."""
    seen = []
    for _ in range(limit):
        batch = c.readdir(1, fh, off, size=size, plus=plus)
        if not batch:
            return seen
        seen += batch
        off = batch[-1][2]
    raise AssertionError("listing did not end")


class _CountSink:
    """A DirSink that takes ``room`` entries (for driving the filesystem from threads)."""

    def __init__(self, room):
        self.room, self.out = room, []

    def fits(self, name):
        return len(self.out) < self.room

    def add(self, name, ino, dtype, off, entry=None):
        assert self.fits(name)
        self.out.append((name, off))


def test_resume_at_every_offset_gives_each_name_once(c, share):
    names = _populate(share)
    fh = c.opendir(1)
    seen = _list(c, fh, size=512)          # ~12 entries per reply: ~850 resumes
    got = [e[0] for e in seen]
    assert sorted(got) == sorted(names + list(_DOTS))
    offs = [e[2] for e in seen]
    assert len(set(offs)) == len(offs)
    # Resuming at any cookie we handed out continues with exactly the next entry, on this
    # handle (seeking backwards) and on a second handle (its own fd and position).
    fh2 = c.opendir(1)
    for i in range(len(seen) - 1):
        for h in (fh, fh2) if i % 97 == 0 else (fh2,):
            one = c.readdir(1, h, offs[i], size=48)     # room for one dirent
            assert [(e[0], e[2]) for e in one] == [(got[i + 1], offs[i + 1])]
    assert c.readdir(1, fh2, offs[-1], size=4096) == []
    # A rewind (offset 0) lists everything again.
    assert sorted(e[0] for e in _list(c, fh, size=4096)) == sorted(got)
    c.release(1, fh, O.RELEASEDIR)
    c.release(1, fh2, O.RELEASEDIR)


def test_readdirplus_small_replies_count_each_name_once(c, fs, share):
    names = _populate(share, 2_000)
    fh = c.opendir(1)
    seen = _list(c, fh, size=700, plus=True)   # 3-4 direntplus per reply
    real = [e for e in seen if e[0] not in _DOTS]
    assert sorted(e[0] for e in real) == sorted(names)
    assert all(e[4][0] == 0 for e in seen if e[0] in _DOTS)
    # lookup count +1 per emitted entry only: entries that did not fit were not looked up
    assert all(fs.inodes.get(e[4][0]).nlookup == 1 for e in real)
    assert len(fs.inodes) == 1 + len(names)
    c.release(1, fh, O.RELEASEDIR)


def test_root_dotdot_does_not_reveal_the_host_parent(c, share):
    fh = c.opendir(1)
    ents = {e[0]: e for e in c.readdir(1, fh, 0)}
    root_ino = os.stat(share).st_ino
    assert ents[b"."][1] == root_ino and ents[b".."][1] == root_ino
    assert ents[b".."][3] == 4
    c.release(1, fh, O.RELEASEDIR)


def test_concurrent_readdirs_two_handles_same_dir(fs, share):
    names = _populate(share, 3_000)
    expect = sorted(names + list(_DOTS))
    fhs = [fs.opendir(None, 1, 0)[0] for _ in range(2)]
    errors = []

    def full_listing(fh, room):
        out, off = [], 0
        while True:
            sink = _CountSink(room)
            fs.readdir(None, 1, fh, off, sink)
            if not sink.out:
                return out
            out += sink.out
            off = sink.out[-1][1]

    def own_handle(fh, room):
        try:
            for _ in range(3):
                got = sorted(n for n, _ in full_listing(fh, room))
                assert got == expect
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    # one thread per handle: each keeps its own position
    threads = [threading.Thread(target=own_handle, args=(fh, room)) for fh, room in zip(fhs, (7, 13))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors

    # several threads on the SAME handle at cookies of a reference listing: each request
    # is served whole under the handle lock, so every reply is the right slice
    ref = full_listing(fhs[0], 50)
    index = {off: i for i, (_, off) in enumerate(ref)}

    def same_handle(seed):
        rng = random.Random(seed)
        try:
            for _ in range(300):
                i = rng.randrange(-1, len(ref) - 1)
                off = 0 if i < 0 else ref[i][1]
                sink = _CountSink(rng.randrange(1, 40))
                fs.readdir(None, 1, fhs[1], off, sink)
                assert sink.out == ref[i + 1:i + 1 + len(sink.out)] and sink.out
                assert index[sink.out[-1][1]] == i + len(sink.out)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=same_handle, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for fh in fhs:
        fs.releasedir(None, 1, fh)


@pytest.mark.parametrize("plus", [False, True])
def test_entries_added_and_removed_during_listing(c, share, plus):
    names = _populate(share, 1_500)
    stable = set(names[::2])               # never touched during the listing
    doomed = names[1::2]
    fh = c.opendir(1)
    seen, off, batches = [], 0, 0
    rng = random.Random(1)
    while True:
        batch = c.readdir(1, fh, off, size=1024, plus=plus)
        if not batch:
            break
        batches += 1
        assert batches < 10_000, "listing loops"
        seen += [e[0] for e in batch]
        off = batch[-1][2]
        for _ in range(3):                  # churn: remove old names, add new ones
            if doomed:
                os.unlink(share / os.fsdecode(doomed.pop(rng.randrange(len(doomed)))))
            (share / f"new-{batches}-{_}").write_bytes(b"")
    counts = {}
    for n in seen:
        counts[n] = counts.get(n, 0) + 1
    assert all(counts.get(n) == 1 for n in stable)   # each unchanged name exactly once
    assert all(v == 1 for v in counts.values())       # nothing reported twice
    c.release(1, fh, O.RELEASEDIR)


def test_memory_per_handle_is_bounded(fs, share):
    _populate(share)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.take_snapshot()
        fhs = []
        for _ in range(100):
            fh = fs.opendir(None, 1, 0)[0]
            sink = _CountSink(20)               # each handle mid-listing: its buffer held
            fs.readdirplus(None, 1, fh, 0, sink)
            assert len(sink.out) == 20
            fhs.append(fh)
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    finally:
        tracemalloc.stop()
    # 100 snapshots of a 10,000-entry directory held ~135 MiB; now at most one getdents64
    # buffer's worth of records per handle (+ the worker's own buffer)
    assert grown < 100 * (DirHandle.BUF_SIZE + 8 * 1024) + (1 << 20), grown
    assert grown < 4 << 20, grown
    for fh in fhs:
        fs.releasedir(None, 1, fh)


def test_finished_listing_drops_its_buffer(fs, share):
    _populate(share, 100)
    fh = fs.opendir(None, 1, 0)[0]
    sink = _CountSink(1_000)
    fs.readdir(None, 1, fh, 0, sink)
    assert len(sink.out) == 102
    h = fs.handles.dir(fh)
    assert h.data == b"" and h.pos == 0     # nothing held by an idle, finished handle
    fs.releasedir(None, 1, fh)


GARBAGE = [1, 2, 3, 7, 12345, 1 << 31, (1 << 32) + 5, 1 << 62, (1 << 63) - 1, 1 << 63,
           (1 << 63) + 1, (1 << 64) - 1, 0xDEADBEEFCAFEBABE]


@pytest.mark.parametrize("plus", [False, True])
def test_hostile_offsets(c, fs, share, plus):
    names = _populate(share, 300)
    fh = c.opendir(1)
    rng = random.Random(7)
    for off in GARBAGE + [rng.getrandbits(64) for _ in range(50)]:
        try:
            got = c.readdir(1, fh, off, size=4096, plus=plus)
        except Exception as exc:  # noqa: BLE001
            # the kernel's answer to a cookie it never gave, passed through as errno
            assert getattr(exc, "errno", None) in (errno.EINVAL, errno.ENOENT, errno.EOVERFLOW), exc
            continue
        assert all(e[0] in names or e[0] in _DOTS for e in got)
    # the handle still works: a rewind lists everything once
    assert sorted(e[0] for e in _list(c, fh, 4096, plus)) == sorted(names + list(_DOTS))
    c.release(1, fh, O.RELEASEDIR)
    assert err(c.readdir, 1, fh) == errno.EBADF


def test_negative_cookie_is_einval(c):
    fh = c.opendir(1)
    assert err(c.readdir, 1, fh, (1 << 64) - 1) == errno.EINVAL   # off_t -1
    assert c.readdir(1, fh, 0)                                     # and the handle recovers
    c.release(1, fh, O.RELEASEDIR)


def test_hostsys_dirent_wrappers_raise_the_kernel_errno(tmp_path):
    from vhostfs import hostsys

    buf, cbuf = hostsys.dirent_buffer(4096)
    with pytest.raises(OSError) as e:
        hostsys.getdents64(-1, cbuf, 4096)
    assert e.value.errno == errno.EBADF
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as e:
            hostsys.dir_seek(fd, (1 << 64) - 5)         # off_t -5
        assert e.value.errno == errno.EINVAL
        hostsys.dir_seek(fd, 0)
        n = hostsys.getdents64(fd, cbuf, 4096)
        assert n > 0 and b"." in bytes(buf[:n])
        hostsys.dir_seek(fd, 0)
        with pytest.raises(OSError) as e:
            hostsys.getdents64(fd, cbuf, 8)             # smaller than one record
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    file_fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDONLY, 0o600)
    try:
        with pytest.raises(OSError) as e:
            hostsys.getdents64(file_fd, cbuf, 4096)
        assert e.value.errno == errno.ENOTDIR
    finally:
        os.close(file_fd)
