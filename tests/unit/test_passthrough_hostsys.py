"""The syscall wrappers the passthrough needs (cffi_build/parts/10_syscalls.*)."""
from __future__ import annotations

import errno
import os
import threading

import pytest

from vhostfs import hostsys


def test_statx_matches_stat_and_has_mnt_id(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    fd = os.open(f, os.O_PATH | os.O_NOFOLLOW)
    try:
        st = hostsys.statx(fd, b"", hostsys.AT_EMPTY_PATH | hostsys.AT_SYMLINK_NOFOLLOW)
    finally:
        os.close(fd)
    ref = os.stat(f)
    assert (st.ino, st.dev, st.size, st.mode, st.nlink) == (ref.st_ino, ref.st_dev, 3, ref.st_mode, 1)
    assert st.mtime * 10**9 + st.mtime_nsec == ref.st_mtime_ns
    assert st.mask & hostsys.STATX_MNT_ID and st.mnt_id > 0


def test_statx_error():
    with pytest.raises(OSError) as e:
        hostsys.statx(-1, b"", hostsys.AT_EMPTY_PATH)
    assert e.value.errno == errno.EBADF


def test_openat2_resolve_beneath(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"x")
    dfd = os.open(tmp_path / "d", os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as e:
            hostsys.openat2(dfd, b"../f", os.O_RDONLY, 0, hostsys.RESOLVE_BENEATH)
        assert e.value.errno == errno.EXDEV
        fd = hostsys.openat2(dfd, b".", os.O_RDONLY | os.O_DIRECTORY, 0,
                             hostsys.RESOLVE_BENEATH | hostsys.RESOLVE_NO_MAGICLINKS)
        os.close(fd)
    finally:
        os.close(dfd)


def test_renameat2_flags(tmp_path):
    (tmp_path / "a").write_bytes(b"A")
    (tmp_path / "b").write_bytes(b"B")
    dfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            hostsys.renameat2(dfd, b"a", dfd, b"b", hostsys.RENAME_NOREPLACE)
        hostsys.renameat2(dfd, b"a", dfd, b"b", hostsys.RENAME_EXCHANGE)
        assert (tmp_path / "a").read_bytes() == b"B"
    finally:
        os.close(dfd)


def test_utimensat_now_and_omit(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"")
    os.utime(f, ns=(5 * 10**9, 6 * 10**9))
    hostsys.utimensat(os.open(tmp_path, os.O_PATH), b"f", (0, hostsys.UTIME_OMIT), (0, hostsys.UTIME_NOW))
    st = os.stat(f)
    assert st.st_atime_ns == 5 * 10**9 and st.st_mtime > 6


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_setfsuid_is_per_thread(tmp_path):
    os.chmod(tmp_path, 0o777)
    seen = {}

    go = threading.Event()

    def other():
        go.wait()
        fd = os.open(tmp_path / "other", os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
        seen["uid"] = os.stat(tmp_path / "other").st_uid

    dfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)  # ancestors are root-only
    t = threading.Thread(target=other)  # started before the switch: new threads inherit creds
    t.start()
    prev_gid = hostsys.setfsgid(1001)
    prev_uid = hostsys.setfsuid(1000)
    try:
        fd = os.open("mine", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd)
        os.close(fd)
        go.set()
        t.join()
    finally:
        hostsys.setfsuid(prev_uid)
        hostsys.setfsgid(prev_gid)
        os.close(dfd)
    st = os.stat(tmp_path / "mine")
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    assert seen["uid"] == 0


def test_setfsuid_invalid_is_refused():
    with pytest.raises(OSError):
        hostsys.setfsuid(0xFFFFFFFF)
