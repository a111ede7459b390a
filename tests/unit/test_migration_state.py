"""Migration state format (vhostfs/migration/state.py) and the export/import of the
inode and handle tables (vhostfs/migration/tables.py) with a real PassthroughFs."""
from __future__ import annotations

import base64
import copy
import errno
import json
import gc
import os
import stat

import pytest

from vhostfs.fs.api import Context
from vhostfs.fs.passthrough import PassthroughFs
from vhostfs.fuse.server import FuseServer
from vhostfs.migration import state as S
from vhostfs.migration.state import MigrationStateError
from vhostfs.migration.tables import export_state, import_state
from vhostfs.virtqueue.iov import Writer

CTX = Context(0, 0, 1)


@pytest.fixture(autouse=True)
def _free_fds_eagerly():
    """Mappings and fds caught in reference cycles are freed here, not during a later
    test that counts open fds (tests/unit/test_vhost_user_fuzz.py)."""
    yield
    gc.collect()


def sample_state() -> dict:
    return {
        "mode": "find-paths",
        "fuse": {"initialized": True, "proto_minor": 36, "flags": (1 << 40) | 0x1234, "writeback_on": False},
        "next_nodeid": 10, "next_fh": 5,
        "inodes": [
            {"nodeid": 2, "nlookup": 3, "ftype": stat.S_IFDIR, "ino": 77,
             "path": base64.b64encode(b"dir").decode(), "handle": None, "error": None},
            {"nodeid": 7, "nlookup": 1, "ftype": stat.S_IFREG, "ino": 78,
             "path": base64.b64encode(b"dir/\xffname").decode(), "handle": None, "error": None},
            {"nodeid": 8, "nlookup": 2, "ftype": stat.S_IFREG, "ino": 79, "path": None,
             "handle": None, "error": "deleted on the host while the guest holds it"},
        ],
        "handles": [{"fh": 1, "kind": "dir", "nodeid": 1, "flags": 0},
                    {"fh": 4, "kind": "file", "nodeid": 7, "flags": os.O_RDWR}],
        "dirty_log": {"page_size": 4096, "pages_marked": 12},
    }


def test_round_trip():
    st = sample_state()
    data = S.encode(st)
    assert data[:8] == S.MAGIC
    assert S.decode(data) == st


def test_version_mismatch_rejected():
    data = bytearray(S.encode(sample_state()))
    data[8:12] = (S.STATE_VERSION + 1).to_bytes(4, "little")
    with pytest.raises(MigrationStateError, match=r"version 2 is not supported \(this vhostfs reads version 1\)"):
        S.decode(bytes(data))


@pytest.mark.parametrize("cut", [0, 5, S.HEADER.size - 1, S.HEADER.size, S.HEADER.size + 10, -1])
def test_truncated_rejected(cut):
    data = S.encode(sample_state())
    with pytest.raises(MigrationStateError, match="truncated"):
        S.decode(data[:cut] if cut >= 0 else data[:len(data) - 1])


def test_trailing_bytes_rejected():
    with pytest.raises(MigrationStateError, match="bytes after"):
        S.decode(S.encode(sample_state()) + b"x")


def test_corrupt_payload_rejected():
    data = bytearray(S.encode(sample_state()))
    data[S.HEADER.size + 20] ^= 0x01
    with pytest.raises(MigrationStateError, match="checksum mismatch"):
        S.decode(bytes(data))


def test_bad_magic_rejected():
    data = bytearray(S.encode(sample_state()))
    data[0:8] = b"NOTVHFS\0"
    with pytest.raises(MigrationStateError, match="not a vhostfs migration state"):
        S.decode(bytes(data))


def _forge(payload: dict) -> bytes:
    """A well-formed header around a payload that skips encode()'s validation."""
    import hashlib
    raw = json.dumps(payload).encode()
    return S.HEADER.pack(S.MAGIC, S.STATE_VERSION, 0, len(raw), hashlib.sha256(raw).digest()) + raw


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.pop("handles"), "missing or unexpected"),
    (lambda s: s.update(mode="guess"), "mode 'guess'"),
    (lambda s: s["inodes"].append(dict(s["inodes"][0])), "appears twice"),
    (lambda s: s["inodes"][0].update(nodeid=1), "nodeid must be >= 2"),
    (lambda s: s["inodes"][0].update(nodeid=10), "not below next_nodeid"),
    (lambda s: s["inodes"][0].update(nlookup=0), "nlookup must be >= 1"),
    (lambda s: s["inodes"][0].update(ftype=0o7), "is not a file type"),
    (lambda s: s["inodes"][0].update(path=base64.b64encode(b"../etc").decode()), "relative path inside"),
    (lambda s: s["inodes"][0].update(path=base64.b64encode(b"/etc").decode()), "relative path inside"),
    (lambda s: s["inodes"][0].update(path="***"), "base64"),
    (lambda s: s["inodes"][1].update(path=None), "neither a path nor an error"),
    (lambda s: s["handles"][1].update(nodeid=9), "not an inode of this state"),
    (lambda s: s["handles"][1].update(fh=5), "fh must be in"),
    (lambda s: s["handles"][1].update(kind="pipe"), "kind must be"),
    (lambda s: s["fuse"].update(flags=-1), "fuse.flags"),
    (lambda s: s.update(dirty_log={"page_size": 8192, "pages_marked": 0}), "dirty_log"),
])
def test_invalid_content_rejected(mutate, message):
    st = copy.deepcopy(sample_state())
    mutate(st)
    with pytest.raises(MigrationStateError, match=message):
        S.decode(_forge(st))
    with pytest.raises(MigrationStateError):
        S.encode(st)


def test_payload_not_json_rejected():
    import hashlib
    raw = b"{not json"
    data = S.HEADER.pack(S.MAGIC, S.STATE_VERSION, 0, len(raw), hashlib.sha256(raw).digest()) + raw
    with pytest.raises(MigrationStateError, match="not JSON"):
        S.decode(data)


# -- export/import with a real filesystem ------------------------------------------------------
@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "file").write_bytes(b"hello migration\n")
    (d / "top").write_bytes(b"top file")
    return d


def make(share):
    fs = PassthroughFs(str(share))
    return FuseServer(fs), fs


def read(fs, nodeid, fh, size=64):
    buf = bytearray(size)
    w = Writer([memoryview(buf)])
    n = fs.read(CTX, nodeid, fh, 0, size, w)
    return bytes(buf[:n])


def populate(fs):
    sub = fs.lookup(CTX, 1, b"sub").nodeid
    fs.lookup(CTX, 1, b"sub")                        # nlookup 2
    f = fs.lookup(CTX, sub, b"file").nodeid
    top = fs.lookup(CTX, 1, b"top").nodeid
    fh, _ = fs.open(CTX, f, os.O_RDWR)
    dh, _ = fs.opendir(CTX, sub, os.O_RDONLY)
    return sub, f, top, fh, dh


@pytest.mark.parametrize("mode", ["find-paths", "file-handles"])
def test_export_import_round_trip(share, mode):
    server, fs = make(share)
    server.initialized, server.proto_minor, server.flags = True, 36, 0xABCDE
    sub, f, top, fh, dh = populate(fs)
    st = S.decode(S.encode(export_state(server, fs, mode, pages_marked=3)))
    assert st["mode"] == mode and st["dirty_log"]["pages_marked"] == 3
    by_id = {i["nodeid"]: i for i in st["inodes"]}
    assert by_id[sub]["nlookup"] == 2 and by_id[f]["nlookup"] == 1
    if mode == "find-paths":
        assert base64.b64decode(by_id[f]["path"]) == b"sub/file"
    else:
        assert by_id[f]["handle"] is not None and by_id[f]["path"] is None

    server2, fs2 = make(share)
    assert import_state(server2, fs2, st, "abort") == []
    assert (server2.initialized, server2.proto_minor, server2.flags) == (True, 36, 0xABCDE)
    assert fs2.inodes.get(f).nlookup == 1 and fs2.inodes.get(sub).nlookup == 2
    assert os.fstat(fs2.inodes.get(f).fd).st_ino == os.stat(share / "sub" / "file").st_ino
    assert read(fs2, f, fh) == b"hello migration\n"          # the open handle works
    assert fs2.handles.dir(dh, sub) is not None
    # New objects never reuse a migrated nodeid or fh.
    assert fs2.lookup(CTX, 1, b"top").nodeid == top       # known inode: same nodeid
    new_fh, _ = fs2.open(CTX, top, os.O_RDONLY)
    assert new_fh > max(fh, dh)


def test_import_abort_names_missing_file(share):
    server, fs = make(share)
    sub, f, top, fh, dh = populate(fs)
    st = export_state(server, fs, "find-paths")
    os.rename(share / "sub" / "file", share / "sub" / "gone")
    server2, fs2 = make(share)
    with pytest.raises(MigrationStateError, match=r"inode \d+ \(sub/file\).*No such file"):
        import_state(server2, fs2, st, "abort")
    assert len(fs2.inodes) == 1 and len(fs2.handles) == 0     # nothing applied


def test_import_guest_error_keeps_others(share):
    server, fs = make(share)
    sub, f, top, fh, dh = populate(fs)
    st = export_state(server, fs, "find-paths")
    os.unlink(share / "sub" / "file")
    (share / "sub" / "file").write_bytes(b"another file, another inode")
    server2, fs2 = make(share)
    lost = import_state(server2, fs2, st, "guest-error")
    assert any("sub/file" in e and "the guest held inode" in e for e in lost)
    assert any(f"handle {fh}" in e for e in lost)
    with pytest.raises(OSError) as info:
        read(fs2, f, fh)
    assert info.value.errno == errno.EBADF
    assert fs2.inodes.get(sub).fd >= 0                       # the directory is fine


def test_export_reports_deleted_file(share):
    server, fs = make(share)
    sub, f, top, fh, dh = populate(fs)
    os.unlink(share / "sub" / "file")
    st = export_state(server, fs, "find-paths")
    entry = next(i for i in st["inodes"] if i["nodeid"] == f)
    assert entry["path"] is None and "deleted" in entry["error"]
    S.encode(st)                                             # still a valid state


def test_import_into_used_daemon_refused(share):
    server, fs = make(share)
    populate(fs)
    st = export_state(server, fs, "find-paths")
    with pytest.raises(MigrationStateError, match="already uses"):
        import_state(server, fs, st, "abort")
