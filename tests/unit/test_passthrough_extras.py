"""Issue-3 opcodes through FuseServer + PassthroughFs: xattrs (+ map, ACLs), FALLOCATE,
LSEEK, COPY_FILE_RANGE, SYNCFS, TMPFILE, IOCTL, POLL, BMAP; KILLPRIV_V2; submounts;
uid/gid translation; INIT options; EMFILE -> ENFILE."""
from __future__ import annotations

import errno
import os
import select
import stat
import struct
import subprocess
import sys

import pytest

from test_passthrough_roundtrip import Client, err
from vhostfs.fs.passthrough import PassthroughFs
from vhostfs.fs.passthrough.creds import IdMap, parse_rule
from vhostfs.fs.passthrough.xattr import XattrMap, XattrMapError
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer

O = abi.Opcode
ROOT = os.geteuid() == 0


class XClient(Client):
    def setxattr(self, nodeid, name, value, flags=0, ext=0):
        if self.server.flags & abi.FUSE_SETXATTR_EXT:
            head = abi.fuse_setxattr_in.pack(len(value), flags, ext, 0)
        else:
            head = abi.fuse_setxattr_in_compat.pack(len(value), flags)
        return self.request(O.SETXATTR, nodeid, head + name + b"\0" + value)

    def getxattr(self, nodeid, name, size=4096):
        return self.request(O.GETXATTR, nodeid, abi.fuse_getxattr_in.pack(size, 0) + name + b"\0")

    def listxattr(self, nodeid, size=4096):
        return self.request(O.LISTXATTR, nodeid, abi.fuse_getxattr_in.pack(size, 0))

    def removexattr(self, nodeid, name):
        return self.request(O.REMOVEXATTR, nodeid, name + b"\0")

    def file(self, name, data=b""):
        entry, (fh, _, _) = self.create(1, name)
        if data:
            self.write(entry[0], fh, 0, data)
        return entry[0], fh


def make(share, flags2=0xFFFFFFFF, **kw):
    cl = XClient(FuseServer(PassthroughFs(str(share), **kw)))
    cl.init(flags2=flags2)
    return cl


#: what a Linux 6.1 guest offers in flags2: no FUSE_CREATE_SUPP_GROUP (bit 34)
OLD_KERNEL_FLAGS2 = 0xFFFFFFFF & ~(abi.FUSE_CREATE_SUPP_GROUP >> 32)


# --- xattrs ------------------------------------------------------------------------------
def test_xattr_disabled_is_enosys(share):
    c = make(share)
    node, _ = c.file(b"f")
    assert err(c.getxattr, node, b"user.a") == errno.ENOSYS
    assert not c.server.flags & abi.FUSE_SETXATTR_EXT


def test_xattr_round_trip(share):
    c = make(share, xattr=True)
    assert c.server.flags & abi.FUSE_SETXATTR_EXT
    node, _ = c.file(b"f")
    c.setxattr(node, b"user.a", b"value")
    assert os.getxattr(share / "f", "user.a") == b"value"
    assert c.getxattr(node, b"user.a") == b"value"
    assert abi.fuse_getxattr_out.unpack(c.getxattr(node, b"user.a", 0))[0] == 5
    assert err(c.getxattr, node, b"user.a", 2) == errno.ERANGE
    assert err(c.setxattr, node, b"user.a", b"x", os.XATTR_CREATE) == errno.EEXIST
    assert err(c.setxattr, node, b"user.b", b"x", os.XATTR_REPLACE) == errno.ENODATA
    c.setxattr(node, b"user.b", b"")
    assert set(c.listxattr(node).split(b"\0")[:-1]) >= {b"user.a", b"user.b"}
    n = abi.fuse_getxattr_out.unpack(c.listxattr(node, 0))[0]
    assert n == len(c.listxattr(node))
    assert err(c.listxattr, node, 3) == errno.ERANGE
    c.removexattr(node, b"user.a")
    assert err(c.getxattr, node, b"user.a") == errno.ENODATA
    assert err(c.removexattr, node, b"user.a") == errno.ENODATA
    assert err(c.getxattr, node, b"x" * 256) == errno.ERANGE


def test_xattr_on_symlink_is_the_links_own(share):
    c = make(share, xattr=True)
    os.symlink("target", share / "l")
    (share / "target").write_bytes(b"")
    node = c.lookup(1, b"l")[0]
    assert err(c.setxattr, node, b"user.a", b"v") == errno.EPERM  # user.* on a symlink
    assert b"user" not in c.listxattr(node)


def test_acls_need_posix_acl(share):
    c = make(share, xattr=True)
    node, _ = c.file(b"f")
    acl = struct.pack("<I", 2) + struct.pack("<HHI", 1, 6, 0xFFFFFFFF) + struct.pack(
        "<HHI", 4, 4, 0xFFFFFFFF) + struct.pack("<HHI", 0x20, 0, 0xFFFFFFFF)
    assert err(c.setxattr, node, b"system.posix_acl_access", acl) == errno.EOPNOTSUPP
    c2 = make(share, posix_acl=True)
    assert c2.server.flags & abi.FUSE_POSIX_ACL
    node = c2.lookup(1, b"f")[0]
    c2.setxattr(node, b"system.posix_acl_access", acl)
    assert os.stat(share / "f").st_mode & 0o777 == 0o640


@pytest.mark.skipif(not ROOT, reason="needs root for setgid + ACL semantics")
def test_acl_kill_sgid(share):
    c = make(share, posix_acl=True)
    node, _ = c.file(b"f")
    os.chmod(share / "f", 0o2770)
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, 0xFFFFFFFF)
                                          for t, p in ((1, 7), (4, 7), (0x20, 0)))
    c.setxattr(node, b"system.posix_acl_access", acl, ext=abi.FUSE_SETXATTR_ACL_KILL_SGID)
    assert not os.stat(share / "f").st_mode & stat.S_ISGID


def test_xattrmap_parse_and_translate():
    m = XattrMap.parse(":prefix:all::user.virtiofs.::bad:all:::")
    assert m.to_host(b"trusted.x") == b"user.virtiofs.trusted.x"
    assert m.to_guest(b"user.virtiofs.trusted.x") == b"trusted.x"
    assert m.to_guest(b"user.other") is None
    m = XattrMap.parse("/prefix/all/trusted./user.virtiofs./ /bad/server//trusted./"
                       " /bad/client/user.virtiofs.// /ok/all///")
    assert m.to_host(b"trusted.a") == b"user.virtiofs.trusted.a"
    assert m.to_host(b"user.a") == b"user.a"
    with pytest.raises(OSError) as e:
        m.to_host(b"user.virtiofs.x")
    assert e.value.errno == errno.EPERM
    assert m.to_guest(b"trusted.hostonly") is None
    m = XattrMap.parse(":map:trusted.:user.virtiofs.:")
    assert m.to_host(b"trusted.a") == b"user.virtiofs.trusted.a"
    assert m.to_host(b"user.a") == b"user.a"
    assert m.to_guest(b"trusted.a") is None
    m = XattrMap.parse("/unsupported/all/security.selinux/security.selinux//ok/all///")
    with pytest.raises(OSError) as e:
        m.to_host(b"security.selinux")
    assert e.value.errno == errno.EOPNOTSUPP
    for bad in ("", ":prefix:all:x", ":weird:all:::", ":ok:nowhere:::", ":map:a:b::ok:all:::"):
        with pytest.raises(XattrMapError):
            XattrMap.parse(bad)


def test_xattrmap_applied(share):
    c = make(share, xattrmap=":prefix:all::user.virtiofs.::bad:all:::")
    node, _ = c.file(b"f")
    c.setxattr(node, b"user.guest", b"1")
    assert os.getxattr(share / "f", "user.virtiofs.user.guest") == b"1"
    os.setxattr(share / "f", "user.hostonly", b"2")
    assert c.listxattr(node) == b"user.guest\0"
    assert c.getxattr(node, b"user.guest") == b"1"


# --- data ops --------------------------------------------------------------------------
def test_fallocate_modes(share):
    c = make(share)
    node, fh = c.file(b"f", b"x" * 65536)
    c.request(O.FALLOCATE, node, abi.fuse_fallocate_in.pack(fh, 0, 1 << 20, 0, 0))
    assert os.stat(share / "f").st_size == 1 << 20
    c.request(O.FALLOCATE, node, abi.fuse_fallocate_in.pack(fh, 4096, 8192, 0x01 | 0x02, 0))
    data = (share / "f").read_bytes()
    assert data[:4096] == b"x" * 4096 and data[4096:12288] == bytes(8192) and data[12288:16384] == b"x" * 4096
    assert err(c.request, O.FALLOCATE, node, abi.fuse_fallocate_in.pack(fh, 0, 0, 0, 0)) == errno.EINVAL
    assert err(c.request, O.FALLOCATE, node, abi.fuse_fallocate_in.pack(fh, 0, 10, 0x100, 0)) == errno.EOPNOTSUPP
    assert err(c.request, O.FALLOCATE, node, abi.fuse_fallocate_in.pack(999, 0, 10, 0, 0)) == errno.EBADF


def test_lseek_data_hole(share):
    c = make(share)
    node, fh = c.file(b"f")
    with open(share / "f", "r+b") as f:
        f.write(b"d" * 4096)
        f.seek(1 << 20)
        f.write(b"d" * 4096)
        f.truncate(2 << 20)
    seek = lambda off, wh: abi.fuse_lseek_out.unpack(
        c.request(O.LSEEK, node, abi.fuse_lseek_in.pack(fh, off, wh, 0)))[0]
    assert seek(0, 3) == 0
    assert 4096 <= seek(0, 4) < 1 << 20
    assert seek(8192, 3) == 1 << 20
    assert err(c.request, O.LSEEK, node, abi.fuse_lseek_in.pack(fh, 3 << 20, 3, 0)) == errno.ENXIO
    assert err(c.request, O.LSEEK, node, abi.fuse_lseek_in.pack(fh, 0, 0, 0)) == errno.EINVAL


def test_copy_file_range(share):
    c = make(share)
    src, fs_ = c.file(b"src", bytes(range(256)) * 100)
    dst, fd_ = c.file(b"dst")
    body = abi.fuse_copy_file_range_in.pack(fs_, 10, dst, fd_, 3, 1000, 0)
    assert abi.fuse_write_out.unpack(c.request(O.COPY_FILE_RANGE, src, body))[0] == 1000
    assert (share / "dst").read_bytes() == bytes(3) + (bytes(range(256)) * 100)[10:1010]
    body = abi.fuse_copy_file_range_in.pack(fs_, 0, dst, fd_, 0, 10, 1)
    assert err(c.request, O.COPY_FILE_RANGE, src, body) == errno.EINVAL


def test_syncfs_and_bmap(share):
    c = make(share)
    assert c.request(O.SYNCFS, 1, abi.fuse_syncfs_in.pack(0)) == b""
    node, _ = c.file(b"f", b"x")
    assert err(c.request, O.BMAP, node, abi.fuse_bmap_in.pack(0, 4096, 0)) == errno.ENOSYS


def test_tmpfile_then_link(share):
    c = make(share)
    out = c.request(O.TMPFILE, 1, abi.fuse_create_in.pack(os.O_RDWR, stat.S_IFREG | 0o640, 0o022, 0) + b"/\0")
    entry = abi.fuse_entry_out.unpack(out[:128])
    fh = abi.fuse_open_out.unpack(out[128:])[0]
    node = entry[0]
    assert entry[6 + 10] == 0  # nlink
    assert os.listdir(share) == []
    c.write(node, fh, 0, b"tmp")
    c.request(O.LINK, 1, abi.fuse_link_in.pack(node) + b"named\0")
    assert (share / "named").read_bytes() == b"tmp"
    assert os.stat(share / "named").st_mode & 0o777 == 0o640
    bad = abi.fuse_create_in.pack(os.O_RDONLY, stat.S_IFREG | 0o600, 0, 0) + b"/\0"
    assert err(c.request, O.TMPFILE, 1, bad) == errno.EINVAL


def test_ioctl_flags_safe_subset(share):
    c = make(share)
    node, fh = c.file(b"f", b"x")
    get = lambda: struct.unpack("<i", c.request(O.IOCTL, node, abi.fuse_ioctl_in.pack(
        fh, 0, 0x80086601, 0, 0, 4))[16:20])[0]
    try:
        flags = get()
    except Exception as e:  # the host FS has no attribute flags (e.g. some tmpfs)
        pytest.skip(f"host fs: {e}")
    setf = lambda v: c.request(O.IOCTL, node, abi.fuse_ioctl_in.pack(fh, 0, 0x40086602, 0, 4, 0)
                               + struct.pack("<i", v))
    out = setf(flags | 0x80)
    assert abi.fuse_ioctl_out.unpack(out[:16])[0] == 0
    assert get() & 0x80
    setf(flags)
    assert not get() & 0x80
    assert err(setf, flags | 0x800) == errno.EOPNOTSUPP  # FS_ENCRYPT_FL: not the guest's
    tcgets = abi.fuse_ioctl_in.pack(fh, 0, 0x5401, 0, 0, 60)
    assert err(c.request, O.IOCTL, node, tcgets) == errno.ENOTTY
    unrestricted = abi.fuse_ioctl_in.pack(fh, abi.FUSE_IOCTL_UNRESTRICTED, 0x80086601, 0, 0, 4)
    assert err(c.request, O.IOCTL, node, unrestricted) == errno.ENOTTY


def test_poll_regular_file(share):
    c = make(share)
    node, fh = c.file(b"f", b"x")
    out = c.request(O.POLL, node, abi.fuse_poll_in.pack(fh, 0, 0, select.POLLIN | select.POLLOUT))
    assert abi.fuse_poll_out.unpack(out)[0] == select.POLLIN | select.POLLOUT


# --- KILLPRIV_V2, submounts, ids, options ---------------------------------------------------
def test_killpriv_v2(share):
    c = make(share, killpriv_v2=True)
    assert c.server.flags & abi.FUSE_HANDLE_KILLPRIV_V2
    node, fh = c.file(b"f", b"x")
    os.chmod(share / "f", 0o6755)
    c.request(O.WRITE, node, abi.fuse_write_in.pack(fh, 0, 1, abi.FUSE_WRITE_KILL_SUIDGID, 0, 0, 0) + b"y")
    assert os.stat(share / "f").st_mode & 0o7777 == 0o755
    os.chmod(share / "f", 0o2644)  # setgid without group-exec stays
    c.request(O.WRITE, node, abi.fuse_write_in.pack(fh, 0, 1, abi.FUSE_WRITE_KILL_SUIDGID, 0, 0, 0) + b"y")
    assert os.stat(share / "f").st_mode & 0o7777 == 0o2644
    os.chmod(share / "f", 0o4755)
    c.request(O.WRITE, node, abi.fuse_write_in.pack(fh, 0, 1, 0, 0, 0, 0) + b"z")  # no flag: kept
    assert os.stat(share / "f").st_mode & 0o7777 == 0o4755
    body = abi.fuse_setattr_in.pack(abi.FATTR_SIZE | abi.FATTR_KILL_SUIDGID, 0, 0, 0, 0, 0, 0, 0,
                                    0, 0, 0, 0, 0, 0, 0, 0)
    c.request(O.SETATTR, node, body)
    assert os.stat(share / "f").st_mode & 0o7777 == 0o755
    os.chmod(share / "f", 0o4755)
    c.request(O.OPEN, node, abi.fuse_open_in.pack(os.O_WRONLY | os.O_TRUNC, abi.FUSE_OPEN_KILL_SUIDGID))
    assert os.stat(share / "f").st_mode & 0o7777 == 0o755


@pytest.mark.skipif(not ROOT, reason="needs root to mount a tmpfs")
def test_submount_flag(share):
    sub = share / "sub"
    sub.mkdir()
    (share / "plain").mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "none", str(sub)]).returncode:
        pytest.skip("cannot mount tmpfs")
    try:
        c = make(share)
        assert c.server.flags & abi.FUSE_SUBMOUNTS
        e = c.lookup(1, b"sub")
        assert e[6 + 15] & abi.FUSE_ATTR_SUBMOUNT
        assert not c.lookup(1, b"plain")[6 + 15] & abi.FUSE_ATTR_SUBMOUNT
        (sub / "inner").mkdir()
        assert not c.lookup(e[0], b"inner")[6 + 15] & abi.FUSE_ATTR_SUBMOUNT
        off = make(share, announce_submounts=False)
        assert not off.server.flags & abi.FUSE_SUBMOUNTS
        assert not off.lookup(1, b"sub")[6 + 15] & abi.FUSE_ATTR_SUBMOUNT
    finally:
        subprocess.run(["umount", "-l", str(sub)])


def test_idmap_rules():
    m = IdMap(["map:1000:5000:10", "squash-guest:2000:65534:100", "forbid-guest:3000:5",
               "squash-host:7000:99:10"])
    assert m.to_host(1005) == 5005 and m.to_guest(5005) == 1005
    assert m.to_host(2050) == 65534 and m.to_host(42) == 42
    with pytest.raises(OSError) as e:
        m.to_host(3002)
    assert e.value.errno == errno.EPERM
    assert m.to_guest(7003) == 99
    for bad in ("map:1:2", "wat:1:2:3", "map:1:2:0", "guest:0:4294967295:2"):
        with pytest.raises(ValueError):
            parse_rule(bad)


@pytest.mark.skipif(not ROOT, reason="needs root to create files for other ids")
def test_translated_ids(share):
    os.chmod(share, 0o777)
    c = make(share, translate_uid=["map:1000:5000:10"], translate_gid=["map:1000:6000:10"])
    entry, _ = c.create(1, b"f", uid=1001, gid=1002)
    st = os.stat(share / "f")
    assert (st.st_uid, st.st_gid) == (5001, 6002)
    assert (entry[6 + 11], entry[6 + 12]) == (1001, 1002)  # the guest sees its own ids
    with pytest.raises(ValueError):
        PassthroughFs(str(share), posix_acl=True, translate_uid=["map:0:1:1"])


@pytest.mark.skipif(not ROOT, reason="needs root to switch credentials")
def test_create_credentials_and_group_fallback(share):
    """Creates run as the caller: owned by it, refused where the guest could not have
    allowed them either... but a request without a group list (Linux < 6.7) that the
    host refuses only for lack of supplementary groups is made by the daemon and given
    to the caller (the guest kernel checked with the full list)."""
    c = make(share, flags2=OLD_KERNEL_FLAGS2)
    assert not c.server.flags & abi.FUSE_CREATE_SUPP_GROUP
    d = share / "d"
    d.mkdir()
    os.chown(d, 0, 1001)
    os.chmod(d, 0o770)
    node = c.lookup(1, b"d")[0]
    entry, _ = c.create(node, b"x", uid=1000, gid=1000)
    st = os.stat(d / "x")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    body = abi.fuse_mkdir_in.pack(stat.S_IFDIR | 0o755, 0)
    c.request(O.MKDIR, node, body + b"sub\0", uid=1000, gid=1000)
    assert os.stat(d / "sub").st_uid == 1000
    os.chmod(d, 0o2770)  # setgid parent: the group stays the directory's
    c.request(O.MKNOD, node, abi.fuse_mknod_in.pack(stat.S_IFIFO | 0o600, 0, 0, 0) + b"p\0",
              uid=1000, gid=1000)
    st = os.lstat(d / "p")
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    # a plain caller-owned create keeps its own ids and never uses the fallback
    os.chmod(share, 0o777)
    c.create(1, b"own", uid=1000, gid=1000)
    assert os.stat(share / "own").st_uid == 1000
    # EPERM-type refusals (not EACCES) are never retried as the daemon
    os.chmod(share, 0o1777)
    (share / "rootfile").write_bytes(b"")
    assert err(c.request, O.MKNOD, 1, abi.fuse_mknod_in.pack(stat.S_IFCHR | 0o600, 0x0103, 0, 0)
               + b"dev\0", uid=1000, gid=1000) == errno.EPERM


def test_options_in_init(share):
    c = make(share, readdirplus=False, writeback=True)
    assert not c.server.flags & (abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO)
    assert c.server.flags & abi.FUSE_WRITEBACK_CACHE
    # writeback: O_WRONLY is upgraded, O_APPEND dropped (the kernel positions writes)
    (share / "f").write_bytes(b"abc")
    node = c.lookup(1, b"f")[0]
    fh = c.open(node, os.O_WRONLY | os.O_APPEND)
    assert c.read(node, fh, 0, 3) == b"abc"
    c.write(node, fh, 0, b"X")
    assert (share / "f").read_bytes() == b"Xbc"
    plain = make(share)
    assert plain.server.flags & abi.FUSE_DO_READDIRPLUS and not plain.server.flags & abi.FUSE_WRITEBACK_CACHE
    node = plain.lookup(1, b"f")[0]
    fh = plain.open(node, os.O_WRONLY | os.O_APPEND)
    plain.write(node, fh, 0, b"Y")
    assert (share / "f").read_bytes() == b"XbcY"
    with pytest.raises(ValueError):
        PassthroughFs(str(share), inode_file_handles="sometimes")


def test_noatime_and_direct_io_flags(share):
    fs = PassthroughFs(str(share))
    assert not fs._open_flags(os.O_RDONLY | os.O_NOATIME | os.O_DIRECT) & (os.O_NOATIME | os.O_DIRECT)
    fs = PassthroughFs(str(share), preserve_noatime=True, allow_direct_io=True)
    assert fs._open_flags(os.O_RDONLY | os.O_NOATIME | os.O_DIRECT) & (os.O_NOATIME | os.O_DIRECT) \
        == os.O_NOATIME | os.O_DIRECT


def test_fd_exhaustion_is_enfile(share, tmp_path):
    """With RLIMIT_NOFILE reached, requests fail with ENFILE and the server survives."""
    script = f"""
import errno, os, resource, sys
sys.path[:0] = {sys.path!r}
from test_passthrough_extras import make
from test_fuse_fakes import FuseError
c = make({str(share)!r})
for i in range(50):
    (open({str(share)!r} + f"/f{{i}}", "w")).close()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
used = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 10, hard))
errs = set()
for i in range(50):
    try:
        node = c.lookup(1, f"f{{i}}".encode())[0]
        c.open(node)
    except FuseError as e:
        errs.add(e.errno)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
c.lookup(1, b"f0")
print(sorted(errs))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=os.path.dirname(__file__))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"[{errno.ENFILE}]"


# --- attribute sanity ---------------------------------------------------------------------
def test_attr_sanity_caps_and_type_change(share):
    from vhostfs import hostsys
    from vhostfs.fs.passthrough.filesystem import to_attr

    st = hostsys.Statx(0, 0o100644, 1, 0, 0, 0, 7, (1 << 64) - 1, (1 << 64) - 1, 4096,
                       0, 2_000_000_000, 0, 0, 0, 0, 1, 1)
    a = to_attr(st)
    assert a.size == a.blocks == (1 << 63) - 1 and a.atimensec == 999_999_999
    # the same (dev, ino, mnt_id) with another file type is a new nodeid, never a reuse
    fs = PassthroughFs(str(share))
    (share / "f").write_bytes(b"")
    real = hostsys.statx(os.open(share / "f", os.O_PATH), b"", hostsys.AT_EMPTY_PATH)
    one = fs.inodes.add_ref(os.open(share / "f", os.O_PATH), real)
    as_dir = real._replace(mode=stat.S_IFDIR | 0o755)
    two = fs.inodes.add_ref(os.open(share / "f", os.O_PATH), as_dir)
    assert two.nodeid != one.nodeid and two.ftype == stat.S_IFDIR and one.ftype == stat.S_IFREG


@pytest.mark.skipif(not ROOT, reason="needs root to switch credentials")
def test_create_supp_group_extension(share):
    """FUSE_CREATE_SUPP_GROUP (Linux >= 6.7): the group the kernel sends is used for the
    host's check, and the daemon never falls back to its own credentials."""
    c = make(share)
    assert c.server.flags & abi.FUSE_CREATE_SUPP_GROUP
    d = share / "d"
    d.mkdir()
    os.chown(d, 0, 1001)
    os.chmod(d, 0o770)
    node = c.lookup(1, b"d")[0]

    def create(name, groups, extlen=None):
        body = abi.fuse_create_in.pack(os.O_RDWR | os.O_CREAT, stat.S_IFREG | 0o644, 0, 0) + name + b"\0"
        body += bytes(-len(body) & 7)
        ext = b""
        if groups is not None:
            payload = abi.fuse_supp_groups.pack(len(groups)) + b"".join(struct.pack("<I", g) for g in groups)
            payload += bytes(-(8 + len(payload)) & 7)
            ext = abi.fuse_ext_header.pack(8 + len(payload), abi.FUSE_EXT_GROUPS) + payload
        hdr = abi.fuse_in_header.pack(40 + len(body) + len(ext), O.CREATE, 77, node, 1000, 1000, 1,
                                      len(ext) // 8 if extlen is None else extlen, 0)
        from test_fuse_fakes import FakeReader, FakeWriter
        w = FakeWriter(4096)
        c.server.handle(FakeReader(hdr + body + ext), w)
        return abi.fuse_out_header.unpack_from(w.buf)[1]

    assert create(b"with", [1001]) == 0
    st = os.stat(d / "with")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert create(b"without", None) == -errno.EACCES      # no fallback once negotiated
    assert create(b"other", [1002]) == -errno.EACCES
    assert create(b"bad", [1001], extlen=1000) == -errno.EINVAL


def _secctx_ext(records):
    body = b""
    for name, value in records:
        rec = abi.fuse_secctx.pack(len(value), 0) + name + b"\0" + value
        body += rec + bytes(-len(rec) & 7)
    return abi.fuse_secctx_header.pack(8 + len(body), len(records)) + body


def _create_with_ext(c, parent, name, ext, opcode=O.CREATE):
    from test_fuse_fakes import FakeReader, FakeWriter
    if opcode == O.CREATE:
        body = abi.fuse_create_in.pack(os.O_RDWR | os.O_CREAT, stat.S_IFREG | 0o644, 0, 0) + name + b"\0"
    else:
        body = abi.fuse_mkdir_in.pack(stat.S_IFDIR | 0o755, 0) + name + b"\0"
    body += bytes(-len(body) & 7)
    hdr = abi.fuse_in_header.pack(40 + len(body) + len(ext), opcode, 9, parent, 0, 0, 1, len(ext) // 8, 0)
    w = FakeWriter(4096)
    c.server.handle(FakeReader(hdr + body + ext), w)
    return abi.fuse_out_header.unpack_from(w.buf)[1]


def test_security_label_contexts(share):
    c = make(share, security_label=True)
    assert c.server.flags & abi.FUSE_SECURITY_CTX
    # what a guest without an LSM sends: an empty header (nr_secctx 0)
    assert _create_with_ext(c, 1, b"plain", _secctx_ext([])) == 0
    try:
        os.setxattr(share / "plain", "security.vhostfs-probe", b"x")
    except OSError:
        pytest.skip("the host refuses security.* xattrs")
    assert _create_with_ext(c, 1, b"f", _secctx_ext([(b"security.vhostfs", b"label_t\0")])) == 0
    assert os.getxattr(share / "f", "security.vhostfs") == b"label_t\0"
    assert _create_with_ext(c, 1, b"d", _secctx_ext([(b"security.vhostfs", b"dir_t")]), O.MKDIR) == 0
    assert os.getxattr(share / "d", "security.vhostfs") == b"dir_t"
    # only security.* names; malformed records refused
    assert _create_with_ext(c, 1, b"g", _secctx_ext([(b"trusted.x", b"v")])) == -errno.EPERM
    assert not (share / "g").exists()
    bad = abi.fuse_secctx_header.pack(16, 1) + abi.fuse_secctx.pack(100, 0)
    assert _create_with_ext(c, 1, b"h", bad) == -errno.EINVAL
    # not negotiated: extensions are refused
    plain = make(share, flags2=OLD_KERNEL_FLAGS2)
    assert not plain.server.flags & (abi.FUSE_SECURITY_CTX | abi.FUSE_CREATE_SUPP_GROUP)
    assert _create_with_ext(plain, 1, b"i", _secctx_ext([])) == -errno.EINVAL


def _symlink_or_mknod_with_ext(c, parent, name, ext, opcode):
    from test_fuse_fakes import FakeReader, FakeWriter
    if opcode == O.SYMLINK:
        body = name + b"\0" + b"target\0"
    else:
        body = abi.fuse_mknod_in.pack(stat.S_IFIFO | 0o644, 0, 0, 0) + name + b"\0"
    body += bytes(-len(body) & 7)
    hdr = abi.fuse_in_header.pack(40 + len(body) + len(ext), opcode, 9, parent, 0, 0, 1, len(ext) // 8, 0)
    w = FakeWriter(4096)
    c.server.handle(FakeReader(hdr + body + ext), w)
    return abi.fuse_out_header.unpack_from(w.buf)[1]


def test_security_labels_are_set_before_the_name_exists(share, monkeypatch):
    """Every create type: when the label is written, the final name does not exist
    yet (the object is labelled under a hidden name and renamed into place); nothing
    hidden is left behind, and an existing name is EEXIST without relabelling it."""
    c = make(share, security_label=True)
    try:
        os.setxattr(share, "security.vhostfs-probe", b"x")
    except OSError:
        pytest.skip("the host refuses security.* xattrs")
    fs = c.server.fs
    seen = []
    real_label = fs._label

    def spy(ctx, target):
        seen.append(sorted(n for n in os.listdir(share) if not n.startswith(".vhostfs-new-")))
        real_label(ctx, target)
    monkeypatch.setattr(fs, "_label", spy)
    ext = _secctx_ext([(b"security.vhostfs", b"t")])
    assert _create_with_ext(c, 1, b"f", ext) == 0
    assert _create_with_ext(c, 1, b"d", ext, O.MKDIR) == 0
    assert _symlink_or_mknod_with_ext(c, 1, b"l", ext, O.SYMLINK) == 0
    assert _symlink_or_mknod_with_ext(c, 1, b"p", ext, O.MKNOD) == 0
    assert seen == [[], ["f"], ["d", "f"], ["d", "f", "l"]]
    for n in ("f", "d", "l", "p"):
        assert os.getxattr(share / n, "security.vhostfs", follow_symlinks=False) == b"t", n
    assert os.readlink(share / "l") == "target" and stat.S_ISFIFO(os.lstat(share / "p").st_mode)
    # an existing name: EEXIST for MKDIR, the existing file opened for CREATE (no O_EXCL)
    os.setxattr(share / "d", "security.vhostfs", b"old")
    assert _create_with_ext(c, 1, b"d", ext, O.MKDIR) == -errno.EEXIST
    assert os.getxattr(share / "d", "security.vhostfs") == b"old"
    assert _create_with_ext(c, 1, b"f", _secctx_ext([(b"security.vhostfs", b"new")])) == 0
    assert os.getxattr(share / "f", "security.vhostfs") == b"t"
    assert not [n for n in os.listdir(share) if n.startswith(".vhostfs-new-")]
    # a host filesystem without RENAME_NOREPLACE: made under the name, labelled after
    from vhostfs import hostsys

    def no_noreplace(*a, **kw):
        raise OSError(errno.EINVAL, "RENAME_NOREPLACE unsupported")
    monkeypatch.setattr(hostsys, "renameat2", no_noreplace)
    assert _create_with_ext(c, 1, b"d2", ext, O.MKDIR) == 0
    assert os.getxattr(share / "d2", "security.vhostfs") == b"t"
    assert not [n for n in os.listdir(share) if n.startswith(".vhostfs-new-")]


# --- FUSE_STATX (7.39) -------------------------------------------------------------------
def test_statx_reports_birth_time_and_translated_ids(share):
    from vhostfs import hostsys
    (share / "f").write_bytes(b"12345")
    os.chown(share / "f", 5001, 6002)
    c = make(share, translate_uid=["map:1000:5000:10"], translate_gid=["map:1000:6000:10"])
    node = c.lookup(1, b"f")[0]
    out = c.request(O.STATX, node, abi.fuse_statx_in.pack(0, 0, 0, 0, 0x7ff | 0x800))
    v = abi.fuse_statx_out.unpack(out)
    attr_valid, _nsec, _flags, mask, blksize, _attrs, nlink, uid, gid, mode, ino, size = v[:12]
    host = hostsys.statx(-100, str(share / "f"), 0, hostsys.STATX_BASIC_STATS | hostsys.STATX_BTIME)
    assert mask & 0x7ff == 0x7ff and bool(mask & 0x800) == bool(host.mask & 0x800)
    assert (uid, gid, size, nlink, ino) == (1001, 1002, 5, 1, host.ino)
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == stat.S_IMODE(host.mode)
    btime_sec, btime_nsec = v[17], v[18]
    assert (btime_sec, btime_nsec) == (host.btime, host.btime_nsec)
    # a device node: rdev goes back to major/minor
    os.mknod(share / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    dev_node = c.lookup(1, b"null")[0]
    v = abi.fuse_statx_out.unpack(c.request(O.STATX, dev_node, abi.fuse_statx_in.pack(0, 0, 0, 0, 0x7ff)))
    assert v[-4:-2] == (1, 3)
    # a truncated request is EINVAL, an unknown node ENOENT
    assert err(c.request, O.STATX, node, b"\0" * 8) == errno.EINVAL
    assert err(c.request, O.STATX, 999, abi.fuse_statx_in.pack(0, 0, 0, 0, 0x7ff)) == errno.ENOENT
