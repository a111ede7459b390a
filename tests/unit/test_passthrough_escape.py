"""Escape attempts: nothing the guest sends may act outside the shared directory."""
from __future__ import annotations

import errno
import gc
import os
import stat

import pytest

from test_fuse_fakes import FuseError
from test_passthrough_roundtrip import Client, err
from vhostfs.fs.api import Context
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer

O = abi.Opcode


@pytest.fixture
def outside(tmp_path):
    f = tmp_path / "outside.txt"
    f.write_bytes(b"SECRET")
    os.utime(f, (1000, 1000))
    return f


@pytest.fixture
def share(tmp_path, outside):
    d = tmp_path / "share"
    d.mkdir()
    os.symlink(str(outside), d / "to_file")
    os.symlink("/etc", d / "to_etc")
    os.symlink("..", d / "up")
    return d


@pytest.fixture
def c(fs):
    cl = Client(FuseServer(fs))
    cl.init()
    return cl


def test_dotdot_never_leaves_root(c, share):
    assert c.lookup(1, b"..")[0] == 1
    (share / "a").mkdir()
    a = c.lookup(1, b"a")[0]
    up = c.lookup(a, b"..")[0]
    assert up == 1
    assert c.lookup(up, b"..")[0] == 1


def test_dotdot_readdir_at_root_hides_parent(c, share):
    fh = c.opendir(1)
    entries = {e[0]: e[1] for e in c.readdir(1, fh)}
    assert entries[b".."] == entries[b"."] == os.stat(share).st_ino


def test_symlink_to_etc_acts_on_link_only(c, share):
    n = c.lookup(1, b"to_etc")
    assert stat.S_ISLNK(n[6 + 9])
    nodeid = n[0]
    assert c.request(O.READLINK, nodeid) == b"/etc"
    assert err(c.open, nodeid, os.O_RDONLY) == errno.ELOOP
    assert err(c.opendir, nodeid) == errno.ENOTDIR
    assert err(c.lookup, nodeid, b"passwd") == errno.ENOTDIR
    assert err(c.create, nodeid, b"x") == errno.ENOTDIR
    a = c.getattr(nodeid)[3:]
    assert stat.S_ISLNK(a[9]) and a[0] == os.lstat(share / "to_etc").st_ino


def test_symlink_to_file_open_read_setattr(c, share, outside):
    nodeid = c.lookup(1, b"to_file")[0]
    assert err(c.open, nodeid, os.O_RDONLY) == errno.ELOOP
    assert err(c.open, nodeid, os.O_RDWR | os.O_TRUNC) == errno.ELOOP

    def setattr(valid, **kw):
        f = dict(size=0, atime=0, mtime=0, mode=0, uid=0, gid=0)
        f.update(kw)
        body = abi.fuse_setattr_in.pack(valid, 0, 0, f["size"], 0, f["atime"], f["mtime"], 0, 0, 0, 0,
                                        f["mode"], 0, f["uid"], f["gid"], 0)
        return c.request(O.SETATTR, nodeid, body)

    assert err(setattr, abi.FATTR_MODE, mode=0o777) == errno.EOPNOTSUPP
    assert err(setattr, abi.FATTR_SIZE, size=0) == errno.EINVAL
    setattr(abi.FATTR_MTIME | abi.FATTR_ATIME, atime=5, mtime=5)
    assert os.lstat(share / "to_file").st_mtime == 5
    if os.geteuid() == 0:
        setattr(abi.FATTR_UID, uid=4242)
        assert os.lstat(share / "to_file").st_uid == 4242
    st = os.stat(outside)
    assert outside.read_bytes() == b"SECRET"
    assert st.st_mtime == 1000 and stat.S_IMODE(st.st_mode) != 0o777 and st.st_uid != 4242


def test_create_over_symlink_never_follows(c, outside):
    assert err(c.create, 1, b"to_file") == errno.ELOOP
    assert err(c.create, 1, b"to_file", flags=os.O_RDWR | os.O_CREAT | os.O_TRUNC) == errno.ELOOP
    assert err(c.create, 1, b"to_file", flags=os.O_RDWR | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    assert err(c.mkdir, 1, b"to_etc") == errno.EEXIST
    assert outside.read_bytes() == b"SECRET"


def test_dir_symlink_up_is_not_followed(c):
    up = c.lookup(1, b"up")[0]
    assert err(c.lookup, up, b"share") == errno.ENOTDIR
    assert err(c.opendir, up) == errno.ENOTDIR


def test_link_of_symlink_links_the_symlink(c, share, outside):
    n = c.lookup(1, b"to_file")[0]
    c.request(O.LINK, 1, abi.fuse_link_in.pack(n) + b"hard\0")
    assert os.path.islink(share / "hard")
    assert os.lstat(share / "hard").st_ino == os.lstat(share / "to_file").st_ino


@pytest.mark.parametrize("name", [b"../x", b"a/b", b"/etc", b"etc/"])
def test_slash_names_refused_by_server(c, name):
    for op, body in ((O.LOOKUP, name + b"\0"), (O.UNLINK, name + b"\0"),
                     (O.MKDIR, abi.fuse_mkdir_in.pack(0o40755, 0) + name + b"\0"),
                     (O.CREATE, abi.fuse_create_in.pack(0o2, 0o100644, 0, 0) + name + b"\0"),
                     (O.SYMLINK, name + b"\0target\0"),
                     (O.RENAME, abi.fuse_rename_in.pack(1) + b"ok\0" + name + b"\0")):
        with pytest.raises(FuseError) as e:
            c.request(op, 1, body)
        assert e.value.errno == errno.EINVAL, op


@pytest.mark.parametrize("name", [b"../x", b"a/b", b"", b"a\0b"])
def test_slash_names_refused_by_fs(fs, name):
    ctx = Context(0, 0, 1)
    for call in (lambda: fs.lookup(ctx, 1, name), lambda: fs.mkdir(ctx, 1, name, 0o755),
                 lambda: fs.unlink(ctx, 1, name), lambda: fs.create(ctx, 1, name, 0o644, 2),
                 lambda: fs.rename(ctx, 1, b"to_file", 1, name, 0),
                 lambda: fs.symlink(ctx, 1, name, b"t")):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("name", [b".", b".."])
def test_dot_names_refused_for_modifying_ops(fs, name):
    ctx = Context(0, 0, 1)
    for call in (lambda: fs.mkdir(ctx, 1, name, 0o755), lambda: fs.unlink(ctx, 1, name),
                 lambda: fs.rmdir(ctx, 1, name), lambda: fs.rename(ctx, 1, name, 1, b"x", 0),
                 lambda: fs.rename(ctx, 1, b"to_file", 1, name, 0),
                 lambda: fs.symlink(ctx, 1, name, b"t"), lambda: fs.create(ctx, 1, name, 0o644, 2)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EINVAL


def test_guessed_nodeids_and_handles(c):
    for nodeid in (0, 2, 99, 1 << 63, (1 << 64) - 1):
        assert err(c.getattr, nodeid) == errno.ENOENT
        assert err(c.lookup, nodeid, b"x") == errno.ENOENT
    assert err(c.read, 1, 12345, 0, 10) == errno.EBADF
    assert err(c.write, 1, 12345, 0, b"x") == errno.EBADF
    assert err(c.readdir, 1, 12345) == errno.EBADF
    fh = c.opendir(1)
    assert err(c.read, 1, fh, 0, 10) == errno.EBADF  # a dir handle is not a file handle
    assert err(c.release, 1, fh) == errno.EBADF


def test_open_directory_and_opendir_file(c, share):
    (share / "f").write_bytes(b"")
    assert err(c.open, 1, os.O_RDONLY) == errno.EISDIR
    f = c.lookup(1, b"f")[0]
    assert err(c.opendir, f) == errno.ENOTDIR


def test_forget_does_not_close_fd_in_use(fs, share):
    (share / "f").write_bytes(b"")
    ctx = Context(0, 0, 1)
    e = fs.lookup(ctx, 1, b"f")
    inode = fs.inodes.get(e.nodeid)
    fd = inode.fd
    fs.forget(e.nodeid, 1)
    os.fstat(fd)  # still open: a request in flight holds the Inode
    del inode
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_dotdot_of_directory_moved_outside_is_refused(c, share, tmp_path):
    (share / "a" / "b").mkdir(parents=True)
    a = c.lookup(1, b"a")[0]
    b = c.lookup(a, b"b")[0]
    assert c.lookup(b, b"..")[0] == a
    # the host moves the directory out of the share while the guest holds its nodeid
    os.rename(share / "a", tmp_path / "moved")
    assert err(c.lookup, b, b"..") == errno.EACCES
    assert err(c.lookup, a, b"..") == errno.EACCES
