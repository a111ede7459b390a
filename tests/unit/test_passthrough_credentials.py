"""Per-request credentials (issue 3): every request with a permission check runs with
the caller's fsuid/fsgid on the serving thread, so the host kernel decides -- DAC bits,
POSIX ACLs the guest does not see, sticky directories, uid translation -- and the
supplementary-group retry grants only groups the guest could have claimed outright."""
from __future__ import annotations

import errno
import os
import stat
import struct
import threading

import pytest

from test_passthrough_extras import OLD_KERNEL_FLAGS2, XClient
from test_passthrough_roundtrip import err
from vhostfs.fs.passthrough import PassthroughFs
from vhostfs.fs.passthrough.extras import FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer

O = abi.Opcode
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch credentials")
USER = dict(uid=1000, gid=1000)


def make(share, **kw):
    c = XClient(FuseServer(PassthroughFs(str(share), **kw)))
    c.init(flags2=OLD_KERNEL_FLAGS2)  # a Linux 6.1 guest: requests carry no groups
    return c


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    os.chmod(d, 0o755)
    return d


def acl_xattr(entries) -> bytes:
    """system.posix_acl_access in the kernel's xattr format (version 2)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
UNDEFINED = 0xFFFFFFFF


def setattr_body(valid, mode=0, uid=0, gid=0, size=0):
    return abi.fuse_setattr_in.pack(valid, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, mode, 0, uid, gid, 0)


def test_thread_credentials_are_restored(share):
    """After a switched request the thread is the daemon again (fsuid 0)."""
    c = make(share)
    (share / "f").write_bytes(b"x")
    os.chmod(share / "f", 0o644)
    node = c.lookup(1, b"f")[0]
    c.request(O.OPEN, node, abi.fuse_open_in.pack(os.O_RDONLY, 0), **USER)
    fd = os.open(share / "f", os.O_RDWR)  # needs root's DAC override: 0644 root file
    os.close(fd)


def test_open_is_checked_by_the_host(share):
    """A 0600 root file: the guest user is refused by the host itself."""
    (share / "secret").write_bytes(b"s")
    os.chmod(share / "secret", 0o600)
    c = make(share)
    node = c.lookup(1, b"secret")[0]
    assert err(c.request, O.OPEN, node, abi.fuse_open_in.pack(os.O_RDONLY, 0), **USER) == errno.EACCES
    c.open(node, os.O_RDONLY)  # guest root: the daemon's own rights


def test_host_acl_the_guest_cannot_see(share):
    """Without --posix-acl the guest sees only the mode (0666); the host's ACL denies
    uid 1000, and the host check applies it."""
    f = share / "acl"
    f.write_bytes(b"a")
    os.setxattr(f, "system.posix_acl_access", acl_xattr([
        (ACL_USER_OBJ, 6, UNDEFINED), (ACL_USER, 0, 1000), (ACL_GROUP_OBJ, 6, UNDEFINED),
        (ACL_MASK, 6, UNDEFINED), (ACL_OTHER, 6, UNDEFINED)]))
    c = make(share)
    node = c.lookup(1, b"acl")[0]
    for flags in (os.O_RDONLY, os.O_WRONLY):
        assert err(c.request, O.OPEN, node, abi.fuse_open_in.pack(flags, 0), **USER) == errno.EACCES
    # uid 1001 is not named: "other" rw applies
    c.request(O.OPEN, node, abi.fuse_open_in.pack(os.O_RDWR, 0), uid=1001, gid=1001)
    assert err(c.request, O.ACCESS, node, abi.fuse_access_in.pack(os.R_OK, 0), **USER) == errno.EACCES


def test_uid_translation_is_what_the_host_checks(share):
    """Guest 1000 is host 2000: a host file of 2000 (mode 0600) opens; a host file of
    1000, which the guest sees as its own, is refused by the host."""
    for name, owner in ((b"mine", 2000), (b"theirs", 1000)):
        (share / name.decode()).write_bytes(b"d")
        os.chown(share / name.decode(), owner, owner)
        os.chmod(share / name.decode(), 0o600)
    c = make(share, translate_uid=["map:1000:2000:1"], translate_gid=["map:1000:2000:1"])
    mine, theirs = c.lookup(1, b"mine"), c.lookup(1, b"theirs")
    assert (mine[6 + 11], theirs[6 + 11]) == (1000, 1000)  # both look like the caller's
    c.request(O.OPEN, mine[0], abi.fuse_open_in.pack(os.O_RDWR, 0), **USER)
    assert err(c.request, O.OPEN, theirs[0], abi.fuse_open_in.pack(os.O_RDWR, 0), **USER) \
        == errno.EACCES


def test_sticky_directory(share):
    """unlink/rename of another user's file in a sticky directory: EPERM from the host."""
    os.chmod(share, 0o1777)
    (share / "other").write_bytes(b"o")
    os.chown(share / "other", 1001, 1001)
    c = make(share)
    assert err(c.request, O.UNLINK, 1, b"other\0", **USER) == errno.EPERM
    assert err(c.request, O.RENAME, 1, struct.pack("<Q", 1) + b"other\0moved\0", **USER) \
        == errno.EPERM
    c.request(O.UNLINK, 1, b"other\0", uid=1001, gid=1001)
    assert not (share / "other").exists()


def group_dir(share, name="g", mode=0o770):
    d = share / name
    d.mkdir()
    os.chown(d, 0, 1001)
    os.chmod(d, mode)
    return d


def test_supplementary_group_retry(share):
    """Group 1001 grants access; the request carries no groups (Linux 6.1), the guest
    kernel allowed it: open, unlink, rename, rmdir, xattrs and opendir succeed."""
    d = group_dir(share)
    (d / "f").write_bytes(b"data")
    os.chown(d / "f", 0, 1001)
    os.chmod(d / "f", 0o660)
    (d / "sub").mkdir()
    c = make(share, xattr=True)
    dn = c.lookup(1, b"g")[0]
    fn = c.lookup(dn, b"f")[0]
    c.request(O.OPENDIR, dn, abi.fuse_open_in.pack(0, 0), **USER)
    c.request(O.OPEN, fn, abi.fuse_open_in.pack(os.O_RDWR, 0), **USER)
    c.request(O.SETXATTR, fn, abi.fuse_setxattr_in.pack(1, 0, 0, 0) + b"user.k\0v", **USER)
    assert c.request(O.GETXATTR, fn, abi.fuse_getxattr_in.pack(16, 0) + b"user.k\0", **USER) == b"v"
    c.request(O.RENAME, dn, struct.pack("<Q", dn) + b"f\0f2\0", **USER)
    c.request(O.RMDIR, dn, b"sub\0", **USER)
    c.request(O.UNLINK, dn, b"f2\0", **USER)
    assert sorted(os.listdir(d)) == []


def test_retry_never_grants_a_group_the_guest_cannot_claim(share):
    """With gid 1001 forbidden by the translation, the retry does not add it."""
    d = group_dir(share)
    (d / "f").write_bytes(b"data")
    c = make(share, translate_gid=["forbid-guest:1001:1"])
    dn = c.lookup(1, b"g")[0]
    assert err(c.request, O.UNLINK, dn, b"f\0", **USER) == errno.EACCES
    assert (d / "f").exists()
    # a group nobody grants: still refused (the retry adds 1001, which does not help)
    os.chmod(d, 0o700)
    c2 = make(share)
    assert err(c2.request, O.UNLINK, c2.lookup(1, b"g")[0], b"f\0", **USER) == errno.EACCES


def test_setattr_group_semantics(share):
    """chgrp to a supplementary group and chmod g+s on a file of that group: the host
    neither refuses nor strips S_ISGID (the guest kernel made those checks)."""
    os.chmod(share, 0o777)
    c = make(share)
    entry, _ = c.create(1, b"own", mode=0o644, **USER)
    node = entry[0]
    assert os.stat(share / "own").st_gid == 1000
    c.request(O.SETATTR, node, setattr_body(abi.FATTR_GID, gid=1001), **USER)
    assert os.stat(share / "own").st_gid == 1001
    c.request(O.SETATTR, node, setattr_body(abi.FATTR_MODE, mode=stat.S_IFREG | 0o2755), **USER)
    assert stat.S_IMODE(os.stat(share / "own").st_mode) == 0o2755
    # ownership is the host's check: not the owner -> EPERM
    assert err(c.request, O.SETATTR, node, setattr_body(abi.FATTR_MODE, mode=0o777),
               uid=1001, gid=1001) == errno.EPERM
    # truncate by path needs write permission, checked with the caller's ids
    os.chmod(share / "own", 0o644)
    assert err(c.request, O.SETATTR, node, setattr_body(abi.FATTR_SIZE, size=0),
               uid=1001, gid=1002) == errno.EACCES


def test_writeback_write_only_open(share):
    """--writeback opens O_WRONLY as O_RDWR; a write-only file (0200) still opens for
    the owner (the caller's own O_WRONLY open is the check)."""
    os.chmod(share, 0o777)
    (share / "wo").write_bytes(b"abc")
    os.chown(share / "wo", 1000, 1000)
    os.chmod(share / "wo", 0o200)
    c = XClient(FuseServer(PassthroughFs(str(share), writeback=True)))
    c.init(flags2=OLD_KERNEL_FLAGS2)
    node = c.lookup(1, b"wo")[0]
    c.request(O.OPEN, node, abi.fuse_open_in.pack(os.O_WRONLY, 0), **USER)
    # another user still gets EACCES
    assert err(c.request, O.OPEN, node, abi.fuse_open_in.pack(os.O_WRONLY, 0),
               uid=1001, gid=1001) == errno.EACCES


def test_lookup_needs_search_permission(share):
    d = share / "closed"
    d.mkdir(mode=0o700)
    (d / "x").write_bytes(b"")
    c = make(share)
    dn = c.lookup(1, b"closed")[0]
    assert err(c.request, O.LOOKUP, dn, b"x\0", **USER) == errno.EACCES
    c.lookup(dn, b"x")


def test_credentials_are_per_thread(share):
    """While one thread serves uid 1000, another thread keeps the daemon's rights."""
    (share / "secret").write_bytes(b"s")
    os.chmod(share / "secret", 0o600)
    fs = PassthroughFs(str(share))
    from vhostfs.fs.api import Context
    inside, go = threading.Event(), threading.Event()

    def slow_open():
        ctx = Context(1000, 1000, 1)
        with fs._as_caller(ctx):
            inside.set()
            go.wait(5)

    t = threading.Thread(target=slow_open)
    t.start()
    assert inside.wait(5)
    try:
        os.close(os.open(share / "secret", os.O_RDWR))  # this thread: still root
    finally:
        go.set()
        t.join()


def test_fssetxattr_safe_flags(share):
    """FS_IOC_FSSETXATTR: NOATIME (a safe xflag) is changed on the host; a project id
    change is refused."""
    (share / "f").write_bytes(b"x")
    c = make(share)
    node = c.lookup(1, b"f")[0]
    fh = c.open(node, os.O_RDONLY)

    def ioctl(cmd, data=b"", out=0):
        return c.request(O.IOCTL, node, abi.fuse_ioctl_in.pack(fh, 0, cmd, 0, len(data), out) + data)

    cur = ioctl(FS_IOC_FSGETXATTR, out=28)[16:]
    xflags, extsize, nextents, projid, cow = struct.unpack("<5I8x", cur)
    try:
        ioctl(FS_IOC_FSSETXATTR, struct.pack("<5I8x", xflags | 0x40, extsize, nextents, projid, cow))
    except Exception as e:  # pragma: no cover - host filesystem without FSSETXATTR
        pytest.skip(f"host filesystem refuses FS_IOC_FSSETXATTR: {e}")
    got = struct.unpack("<5I8x", ioctl(FS_IOC_FSGETXATTR, out=28)[16:])[0]
    assert got & 0x40
    import fcntl
    buf = bytearray(8)
    fcntl.ioctl(os.open(share / "f", os.O_RDONLY), 0x80086601, buf)
    assert struct.unpack("<i", buf[:4])[0] & 0x80  # FS_NOATIME_FL on the host
    assert err(ioctl, FS_IOC_FSSETXATTR,
               struct.pack("<5I8x", xflags, extsize, nextents, projid + 7, cow)) == errno.EOPNOTSUPP
    assert err(ioctl, FS_IOC_FSSETXATTR,
               struct.pack("<5I8x", xflags | 0x8000, extsize, nextents, projid, cow)) == errno.EOPNOTSUPP
