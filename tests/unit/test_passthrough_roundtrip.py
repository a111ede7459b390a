"""Every implemented opcode through FuseServer + PassthroughFs against a tmp directory."""
from __future__ import annotations

import errno
import fcntl
import os
import stat

import pytest

from test_fuse_fakes import FuseError, Session
from vhostfs.fs.passthrough import PassthroughFs
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer

O = abi.Opcode


class Client(Session):
    """Decodes replies into Python values."""

    def lookup(self, parent, name):
        return abi.fuse_entry_out.unpack(self.request(O.LOOKUP, parent, name + b"\0"))

    def getattr(self, nodeid, fh=None):
        body = abi.fuse_getattr_in.pack(abi.FUSE_GETATTR_FH if fh else 0, 0, fh or 0)
        return abi.fuse_attr_out.unpack(self.request(O.GETATTR, nodeid, body))

    def forget(self, nodeid, n=1):
        assert self.request(O.FORGET, nodeid, abi.fuse_forget_in.pack(n)) is None

    def mkdir(self, parent, name, mode=0o755, umask=0):
        return abi.fuse_entry_out.unpack(
            self.request(O.MKDIR, parent, abi.fuse_mkdir_in.pack(stat.S_IFDIR | mode, umask) + name + b"\0"))

    def create(self, parent, name, mode=0o644, flags=os.O_RDWR | os.O_CREAT, umask=0, **kw):
        out = self.request(O.CREATE, parent, abi.fuse_create_in.pack(flags, stat.S_IFREG | mode, umask, 0)
                           + name + b"\0", **kw)
        return abi.fuse_entry_out.unpack(out[:128]), abi.fuse_open_out.unpack(out[128:])

    def open(self, nodeid, flags=os.O_RDWR):
        return abi.fuse_open_out.unpack(self.request(O.OPEN, nodeid, abi.fuse_open_in.pack(flags, 0)))[0]

    def write(self, nodeid, fh, offset, data):
        out = self.request(O.WRITE, nodeid, abi.fuse_write_in.pack(fh, offset, len(data), 0, 0, 0, 0) + data)
        return abi.fuse_write_out.unpack(out)[0]

    def read(self, nodeid, fh, offset, size, capacity=1 << 21):
        return self.request(O.READ, nodeid, abi.fuse_read_in.pack(fh, offset, size, 0, 0, 0, 0),
                            capacity=capacity)

    def release(self, nodeid, fh, op=O.RELEASE):
        assert self.request(op, nodeid, abi.fuse_release_in.pack(fh, 0, 0, 0)) == b""

    def opendir(self, nodeid):
        return abi.fuse_open_out.unpack(self.request(O.OPENDIR, nodeid, abi.fuse_open_in.pack(0, 0)))[0]

    def readdir(self, nodeid, fh, offset=0, size=4096, plus=False):
        out = self.request(O.READDIRPLUS if plus else O.READDIR, nodeid,
                           abi.fuse_read_in.pack(fh, offset, size, 0, 0, 0, 0))
        entries, pos = [], 0
        while pos < len(out):
            entry = None
            if plus:
                entry = abi.fuse_entry_out.unpack_from(out, pos)
                pos += 128
            ino, off, namelen, dtype = abi.fuse_dirent.unpack_from(out, pos)
            name = out[pos + 24:pos + 24 + namelen]
            pos += (24 + namelen + 7) & ~7
            entries.append((name, ino, off, dtype, entry))
        assert pos == len(out)
        return entries


@pytest.fixture
def c(fs):
    cl = Client(FuseServer(fs))
    cl.init()
    return cl


def err(fn, *a, **kw):
    with pytest.raises(FuseError) as e:
        fn(*a, **kw)
    return e.value.errno


def test_lookup_getattr_forget(c, fs, share):
    (share / "f").write_bytes(b"12345")
    e = c.lookup(1, b"f")
    nodeid, gen, ev, av = e[:4]
    assert nodeid > 1 and gen == 0 and ev == 1 and av == 1
    attr = e[6:]
    assert attr[0] == os.stat(share / "f").st_ino and attr[1] == 5
    assert stat.S_ISREG(attr[9])
    assert c.lookup(1, b"f")[0] == nodeid  # same inode, same nodeid
    assert fs.inodes.get(nodeid).nlookup == 2
    a = c.getattr(nodeid)
    assert a[0] == 1 and a[3 + 1] == 5  # attr_valid 1 s; size
    c.forget(nodeid, 2)
    assert err(c.getattr, nodeid) == errno.ENOENT
    # nodeids are never reused
    assert c.lookup(1, b"f")[0] > nodeid
    assert err(c.lookup, 1, b"nope") == errno.ENOENT


def test_lookup_dot_dot_at_root_is_root(c):
    assert c.lookup(1, b"..")[0] == 1
    assert c.lookup(1, b".")[0] == 1


def test_lookup_dot_dot_below_root(c, share):
    (share / "d").mkdir()
    d = c.lookup(1, b"d")[0]
    assert c.lookup(d, b"..")[0] == 1
    assert c.lookup(d, b".")[0] == d


def test_root_is_never_dropped(c):
    c.forget(1, 1000)
    assert c.getattr(1)[3 + 9] & stat.S_IFDIR


def test_create_write_read_release(c, fs, share):
    (entry, (fh, oflags, _)) = c.create(1, b"new", mode=0o640)
    nodeid = entry[0]
    assert stat.S_IMODE(entry[6 + 9]) == 0o640
    assert c.write(nodeid, fh, 0, b"hello world") == 11
    assert c.read(nodeid, fh, 6, 100) == b"world"
    assert c.read(nodeid, fh, 100, 10) == b""
    assert c.read(nodeid, fh, 0, 100, capacity=16 + 4) == b"hell"  # clamped to the buffer
    assert c.request(O.FLUSH, nodeid, abi.fuse_flush_in.pack(fh, 0, 0, 0)) == b""
    assert c.request(O.FSYNC, nodeid, abi.fuse_fsync_in.pack(fh, 1, 0)) == b""
    assert c.request(O.FSYNC, nodeid, abi.fuse_fsync_in.pack(fh, 0, 0)) == b""
    c.release(nodeid, fh)
    assert (share / "new").read_bytes() == b"hello world"
    assert err(c.read, nodeid, fh, 0, 1) == errno.EBADF
    assert err(c.release, nodeid, fh) == errno.EBADF
    assert len(fs.handles) == 0


def test_create_applies_umask_and_exclusive(c, share):
    entry, _ = c.create(1, b"m", mode=0o666, umask=0o027)
    assert stat.S_IMODE(os.stat(share / "m").st_mode) == 0o640
    assert err(c.create, 1, b"m", flags=os.O_RDWR | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    # without O_EXCL an existing file is opened, same nodeid
    entry2, (fh, _, _) = c.create(1, b"m")
    assert entry2[0] == entry[0]


def test_open_existing_and_trunc(c, share):
    (share / "f").write_bytes(b"abcdef")
    nodeid = c.lookup(1, b"f")[0]
    fh = c.open(nodeid, os.O_RDONLY)
    assert c.read(nodeid, fh, 0, 3) == b"abc"
    assert err(c.write, nodeid, fh, 0, b"x") == errno.EBADF
    fh2 = c.open(nodeid, os.O_WRONLY | os.O_TRUNC)
    assert (share / "f").read_bytes() == b""
    c.release(nodeid, fh)
    c.release(nodeid, fh2)


def test_large_write_read(c, share):
    (entry, (fh, _, _)) = c.create(1, b"big")
    data = os.urandom(1 << 20)
    assert c.write(entry[0], fh, 0, data) == 1 << 20
    assert c.read(entry[0], fh, 0, 1 << 20) == data


def test_setattr(c, share):
    (share / "f").write_bytes(b"abcdef")
    nodeid = c.lookup(1, b"f")[0]

    def setattr(valid, **kw):
        f = dict(fh=0, size=0, atime=0, mtime=0, atimensec=0, mtimensec=0, mode=0, uid=0, gid=0)
        f.update(kw)
        body = abi.fuse_setattr_in.pack(valid, 0, f["fh"], f["size"], 0, f["atime"], f["mtime"], 0,
                                        f["atimensec"], f["mtimensec"], 0, f["mode"], 0, f["uid"],
                                        f["gid"], 0)
        return abi.fuse_attr_out.unpack(c.request(O.SETATTR, nodeid, body))[3:]

    a = setattr(abi.FATTR_MODE, mode=0o100600)
    assert stat.S_IMODE(a[9]) == 0o600 == stat.S_IMODE(os.stat(share / "f").st_mode)
    a = setattr(abi.FATTR_SIZE, size=2)
    assert a[1] == 2 and (share / "f").read_bytes() == b"ab"
    fh = c.open(nodeid)
    setattr(abi.FATTR_SIZE | abi.FATTR_FH, size=1, fh=fh)
    assert (share / "f").read_bytes() == b"a"
    a = setattr(abi.FATTR_ATIME | abi.FATTR_MTIME, atime=1000, atimensec=5, mtime=2000, mtimensec=7)
    st = os.stat(share / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1000 * 10**9 + 5, 2000 * 10**9 + 7)
    assert (a[3], a[4]) == (1000, 2000)
    setattr(abi.FATTR_MTIME | abi.FATTR_MTIME_NOW)
    st2 = os.stat(share / "f")
    assert st2.st_mtime > 2000 and st2.st_atime_ns == 1000 * 10**9 + 5
    if os.geteuid() == 0:
        a = setattr(abi.FATTR_UID | abi.FATTR_GID, uid=1234, gid=4321)
        assert (a[11], a[12]) == (1234, 4321)
        assert (os.stat(share / "f").st_uid, os.stat(share / "f").st_gid) == (1234, 4321)
    assert err(setattr, abi.FATTR_SIZE | abi.FATTR_FH, size=1, fh=999) == errno.EBADF
    c.release(nodeid, fh)


def test_mkdir_rmdir_unlink(c, share):
    e = c.mkdir(1, b"d", 0o777, umask=0o022)
    assert stat.S_ISDIR(e[6 + 9]) and stat.S_IMODE(os.stat(share / "d").st_mode) == 0o755
    sub = c.create(e[0], b"f")[0][0]
    assert err(c.request, O.RMDIR, 1, b"d\0") == errno.ENOTEMPTY
    assert c.request(O.UNLINK, e[0], b"f\0") == b""
    assert c.request(O.RMDIR, 1, b"d\0") == b""
    assert not (share / "d").exists()
    assert err(c.request, O.UNLINK, 1, b"d\0") == errno.ENOENT
    assert err(c.lookup, sub, b"x") == errno.ENOTDIR


def test_rename_and_rename2(c, share):
    (share / "a").write_bytes(b"A")
    (share / "b").write_bytes(b"B")
    (share / "d").mkdir()
    d = c.lookup(1, b"d")[0]
    assert c.request(O.RENAME, 1, abi.fuse_rename_in.pack(d) + b"a\0a2\0") == b""
    assert (share / "d" / "a2").read_bytes() == b"A"
    assert err(c.request, O.RENAME2, d, abi.fuse_rename2_in.pack(1, 1, 0) + b"a2\0b\0") == errno.EEXIST
    assert c.request(O.RENAME2, d, abi.fuse_rename2_in.pack(1, 2, 0) + b"a2\0b\0") == b""  # EXCHANGE
    assert (share / "b").read_bytes() == b"A" and (share / "d" / "a2").read_bytes() == b"B"
    assert err(c.request, O.RENAME2, d, abi.fuse_rename2_in.pack(1, 1 << 5, 0) + b"a2\0c\0") == errno.EINVAL


def test_link(c, share):
    (share / "f").write_bytes(b"x")
    n = c.lookup(1, b"f")[0]
    e = c.request(O.LINK, 1, abi.fuse_link_in.pack(n) + b"g\0")
    entry = abi.fuse_entry_out.unpack(e)
    assert entry[0] == n and entry[6 + 10] == 2  # same nodeid, nlink 2
    assert os.stat(share / "g").st_ino == os.stat(share / "f").st_ino


def test_symlink_readlink(c, share):
    e = abi.fuse_entry_out.unpack(c.request(O.SYMLINK, 1, b"l\0/etc/passwd\0"))
    assert stat.S_ISLNK(e[6 + 9])
    assert os.readlink(share / "l") == "/etc/passwd"
    assert c.request(O.READLINK, e[0]) == b"/etc/passwd"
    assert err(c.request, O.SYMLINK, 1, b"l2\0\0") == errno.EINVAL
    f = c.create(1, b"f")[0][0]
    assert err(c.request, O.READLINK, f) == errno.EINVAL


def test_mknod(c, share):
    body = abi.fuse_mknod_in.pack(stat.S_IFIFO | 0o644, 0, 0o022, 0) + b"fifo\0"
    e = abi.fuse_entry_out.unpack(c.request(O.MKNOD, 1, body))
    assert stat.S_ISFIFO(os.lstat(share / "fifo").st_mode)
    # FIFOs are never opened on the host (a worker would block)
    assert err(c.open, e[0], os.O_RDONLY) == errno.EACCES
    # device nodes: created when the host permits (root here), never opened
    body = abi.fuse_mknod_in.pack(stat.S_IFCHR | 0o644, 0x0103, 0, 0) + b"null\0"
    if os.geteuid() != 0:
        assert err(c.request, O.MKNOD, 1, body) == errno.EPERM
        return
    e = abi.fuse_entry_out.unpack(c.request(O.MKNOD, 1, body))
    st = os.lstat(share / "null")
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert e[6 + 13] == 0x0103  # fuse_attr.rdev, new_encode_dev
    assert err(c.open, e[0], os.O_RDONLY) == errno.EACCES
    big = abi.fuse_mknod_in.pack(stat.S_IFBLK | 0o600, (0x123 << 8) | 0x45 | (0x67800 << 12), 0, 0)
    c.request(O.MKNOD, 1, big + b"blk\0")
    st = os.lstat(share / "blk")
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (0x123, 0x45 | (0x678 << 8))


def test_statfs_access(c):
    out = abi.fuse_kstatfs.unpack(c.request(O.STATFS, 1))
    st = os.statvfs("/")  # any fs; just sanity
    assert out[5] > 0 and out[6] > 0 and st.f_bsize > 0
    assert c.request(O.ACCESS, 1, abi.fuse_access_in.pack(os.R_OK | os.X_OK, 0)) == b""
    assert err(c.request, O.ACCESS, 1, abi.fuse_access_in.pack(64, 0)) == errno.EINVAL


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch fsuid")
def test_access_as_caller(c, share):
    (share / "secret").write_bytes(b"x")
    os.chmod(share / "secret", 0o600)
    n = c.lookup(1, b"secret")[0]
    assert c.request(O.ACCESS, n, abi.fuse_access_in.pack(os.R_OK, 0)) == b""
    assert err(c.request, O.ACCESS, n, abi.fuse_access_in.pack(os.R_OK, 0), uid=1000, gid=1000) \
        == errno.EACCES


def test_readdir_and_resume(c, share):
    names = sorted(f"file{i:03d}".encode() for i in range(50))
    for n in names:
        (share / os.fsdecode(n)).write_bytes(b"")
    (share / "sub").mkdir()
    fh = c.opendir(1)
    seen, off = [], 0
    while True:
        batch = c.readdir(1, fh, off, size=256)
        if not batch:
            break
        seen += batch
        off = batch[-1][2]
    got = [s[0] for s in seen]
    # the host filesystem's order and d_off cookies (ext4: hash order, '.'/'..' anywhere)
    assert sorted(got) == sorted(names + [b"sub", b".", b".."])
    offs = [s[2] for s in seen]
    assert len(set(offs)) == len(offs) and 0 not in offs
    types = {s[0]: s[3] for s in seen}
    assert types[b"sub"] == 4 and types[b"file000"] == 8 and types[b".."] == 4
    assert c.readdir(1, fh, off) == []          # resuming after the last entry: the end
    c.release(1, fh, O.RELEASEDIR)
    assert err(c.readdir, 1, fh) == errno.EBADF


def test_readdirplus_counts_only_emitted(c, fs, share):
    for i in range(20):
        (share / f"f{i:02d}").write_bytes(b"x")
    fh = c.opendir(1)
    first = c.readdir(1, fh, 0, size=600, plus=True)
    assert 0 < len(first) < 22
    dots = [e for e in first if e[0] in (b".", b"..")]
    assert all(e[4][0] == 0 for e in dots)  # . and .. carry nodeid 0
    real = [e for e in first if e[0] not in (b".", b"..")]
    assert len(fs.inodes) == 1 + len(real)  # one inode per emitted entry, no more
    for e in real:
        assert fs.inodes.get(e[4][0]).nlookup == 1
        assert e[4][6] == e[1]  # attr.ino == dirent ino
    rest = c.readdir(1, fh, first[-1][2], size=1 << 16, plus=True)
    assert len(first) + len(rest) == 22
    assert len(fs.inodes) == 21
    c.release(1, fh, O.RELEASEDIR)


def test_fsyncdir(c):
    fh = c.opendir(1)
    assert c.request(O.FSYNCDIR, 1, abi.fuse_fsync_in.pack(fh, 0, 0)) == b""
    c.release(1, fh, O.RELEASEDIR)


def test_batch_forget(c, fs, share):
    (share / "a").write_bytes(b"")
    (share / "b").write_bytes(b"")
    a, b = c.lookup(1, b"a")[0], c.lookup(1, b"b")[0]
    c.lookup(1, b"a")
    body = abi.fuse_batch_forget_in.pack(2, 0) + abi.fuse_forget_one.pack(a, 1) + abi.fuse_forget_one.pack(b, 1)
    assert c.request(O.BATCH_FORGET, 0, body) is None
    assert fs.inodes.get(a).nlookup == 1
    assert err(c.getattr, b) == errno.ENOENT


def test_destroy_drops_everything(c, fs, share):
    (share / "a").write_bytes(b"")
    a = c.lookup(1, b"a")[0]
    c.open(a)
    assert c.request(O.DESTROY, 0) == b""
    assert len(fs.inodes) == 1 and len(fs.handles) == 0


def test_readonly(share):
    (share / "f").write_bytes(b"abc")
    c = Client(FuseServer(PassthroughFs(str(share), readonly=True)))
    c.init()
    n = c.lookup(1, b"f")[0]
    assert err(c.open, n, os.O_RDWR) == errno.EROFS
    fh = c.open(n, os.O_RDONLY)
    assert c.read(n, fh, 0, 10) == b"abc"
    assert err(c.mkdir, 1, b"d") == errno.EROFS
    assert err(c.create, 1, b"g") == errno.EROFS
    assert err(c.request, O.UNLINK, 1, b"f\0") == errno.EROFS


def test_cache_policies(share):
    (share / "f").write_bytes(b"abc")
    c = Client(FuseServer(PassthroughFs(str(share), cache="never")))
    c.init()
    e = c.lookup(1, b"f")
    assert e[2:6] == (0, 0, 0, 0)
    assert abi.fuse_open_out.unpack(c.request(O.OPEN, e[0], abi.fuse_open_in.pack(0, 0)))[1] \
        & abi.FOPEN_DIRECT_IO
    c = Client(FuseServer(PassthroughFs(str(share), cache="always", timeout=2.5)))
    c.init()
    assert c.lookup(1, b"f")[2] >= 86400
    with pytest.raises(ValueError):
        PassthroughFs(str(share), cache="sometimes")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch fsuid")
def test_create_ops_use_caller_ids(c, share):
    os.chmod(share, 0o777)
    c.create(1, b"f", uid=1000, gid=1001)
    d = abi.fuse_entry_out.unpack(c.request(O.MKDIR, 1, abi.fuse_mkdir_in.pack(0o40755, 0) + b"d\0",
                                            uid=1000, gid=1001))
    s = abi.fuse_entry_out.unpack(c.request(O.SYMLINK, 1, b"l\0target\0", uid=1000, gid=1001))
    for name in ("f", "d", "l"):
        st = os.lstat(share / name)
        assert (st.st_uid, st.st_gid) == (1000, 1001), name
    assert (d[6 + 11], s[6 + 11]) == (1000, 1000)
    # credentials are restored afterwards
    c.create(1, b"mine")
    assert os.stat(share / "mine").st_uid == 0
    # and the caller's permissions apply: uid 1000 cannot create in a root-only directory
    os.mkdir(share / "rootonly", 0o755)
    r = c.lookup(1, b"rootonly")[0]
    assert err(c.create, r, b"x", uid=1000, gid=1001) == errno.EACCES


def test_open_flags_filtered(c, fs, share):
    (share / "f").write_bytes(b"abc")
    n = c.lookup(1, b"f")[0]
    fh = c.open(n, os.O_RDWR | os.O_DIRECT | os.O_NOFOLLOW | os.O_CREAT | os.O_EXCL | os.O_APPEND)
    fd = fs.handles.file(fh).fd
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    assert fl & os.O_APPEND and not fl & os.O_DIRECT and fl & os.O_ACCMODE == os.O_RDWR
    assert err(c.open, n, os.O_ACCMODE) == errno.EINVAL


def test_encode_rdev_matches_kernel_new_encode_dev():
    from vhostfs.fs.passthrough.filesystem import encode_rdev

    assert encode_rdev(os.makedev(1, 3)) == 0x103
    assert encode_rdev(os.makedev(259, 0x12345)) == (0x45 | (259 << 8) | (0x12300 << 12)) & 0xFFFFFFFF
