"""Per-request credentials in a booted guest (issue 3): the host kernel checks each
request with the guest caller's (translated) ids.

One boot, vhostfs run as root with ``--xattr --translate-uid map:1000:2000:1
--translate-gid map:1000:2000:1`` (guest 1000 is host 2000).  The guest user is uid
1000, gid 1000, supplementary group 1001 (tests/guest/credtool.c drops to it).  Each
check is one the guest kernel alone would get wrong -- it sees only modes and
translated owners -- so it fails if vhostfs served the request with its own rights:

* a host POSIX ACL that denies host uid 2000 on a 0666 file (no ``--posix-acl``: the
  guest neither sees nor enforces it);
* a 0600 host file of host uid 1000, which the guest sees as its user's own (1000 is
  no rule's host id, so it passes through untranslated);
* group 1001 granting access on a Linux 6.1 guest, which sends no supplementary groups:
  open, append, rename, unlink, mkdir, rmdir, chgrp and chmod g+s all go through,
  and the host shows the results;
* FS_IOC_FSSETXATTR (chattr's fsxattr path, sent as FUSE_IOCTL): NOATIME reaches the
  host file; a project id change is refused.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vhostfs.guestrun import GuestRunner

pytestmark = pytest.mark.guest
HERE = Path(__file__).parent
USER = "/tmp/credtool as 1000 1000 1001"
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20


def _acl(entries) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("vhostfs switches credentials only when it runs as root")
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed to build credtool")
    share = tmp_path_factory.mktemp("creds")
    os.chmod(share, 0o755)
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(share / "credtool"),
                    str(HERE / "credtool.c")], check=True)
    acl = share / "acl"
    acl.write_text("acl secret\n")
    acl.chmod(0o666)
    os.setxattr(acl, "system.posix_acl_access", _acl([
        (ACL_USER_OBJ, 6, 0xFFFFFFFF), (ACL_USER, 0, 2000), (ACL_GROUP_OBJ, 6, 0xFFFFFFFF),
        (ACL_MASK, 6, 0xFFFFFFFF), (ACL_OTHER, 6, 0xFFFFFFFF)]))
    for name, owner in (("host1000", 1000), ("host2000", 2000)):
        (share / name).write_text(f"{name} data\n")
        os.chown(share / name, owner, owner)
        os.chmod(share / name, 0o600)
    grp = share / "grp"
    grp.mkdir()
    os.chown(grp, 0, 1001)
    grp.chmod(0o770)
    (grp / "f").write_text("group data\n")
    os.chown(grp / "f", 0, 1001)
    (grp / "f").chmod(0o660)
    work = share / "work"
    work.mkdir()
    work.chmod(0o777)
    backend = (f"{sys.executable} -m vhostfs --socket-path {{socket}} --shared-dir {{shared_dir}}"
               " --log-level {log_level} --xattr --translate-uid map:1000:2000:1"
               " --translate-gid map:1000:2000:1")
    runner = GuestRunner(share, backend=backend, kernel=os.environ.get("VHOSTFS_GUEST_KERNEL"),
                         boot_timeout=180, timeout=600)
    with runner.session() as sess:
        res = sess.run("cp /mnt/credtool /tmp/credtool && chmod 755 /tmp/credtool", timeout=60)
        assert res.status == 0, res.output
        yield sess, share


def run(sess, cmd: str, timeout: float = 120):
    res = sess.run(cmd, timeout=timeout)
    return res.status, res.output


def test_host_acl_denies_what_the_guest_mode_allows(guest):
    sess, share = guest
    status, out = run(sess, f"ls -l /mnt/acl; {USER} cat /mnt/acl")
    assert "-rw-rw-rw-" in out, out          # the guest sees a 0666 file
    assert status != 0 and "Permission denied" in out and "acl secret" not in out, out
    status, out = run(sess, f"{USER} sh -c 'echo x >> /mnt/acl'")
    assert status != 0 and "Permission denied" in out, out
    status, out = run(sess, "cat /mnt/acl")   # guest root: the daemon's own rights
    assert status == 0 and "acl secret" in out, out
    assert (share / "acl").read_text() == "acl secret\n"


def test_translated_uid_is_what_the_host_checks(guest):
    sess, share = guest
    status, out = run(sess, "stat -c '%u %a %n' /mnt/host1000 /mnt/host2000")
    assert "1000 600 /mnt/host1000" in out and "1000 600 /mnt/host2000" in out, out
    status, out = run(sess, f"{USER} sh -c 'cat /mnt/host2000 && echo more >> /mnt/host2000'")
    assert status == 0 and "host2000 data" in out, out
    assert (share / "host2000").read_text() == "host2000 data\nmore\n"
    status, out = run(sess, f"{USER} cat /mnt/host1000")
    assert status != 0 and "Permission denied" in out and "host1000 data" not in out, out


def test_supplementary_group_on_a_61_guest(guest):
    sess, share = guest
    script = ("set -e; cat /mnt/grp/f; echo appended >> /mnt/grp/f; mv /mnt/grp/f /mnt/grp/f2; "
              "mkdir /mnt/grp/d; rmdir /mnt/grp/d; touch /mnt/grp/new; cat /mnt/grp/f2; "
              "rm /mnt/grp/f2; echo DONE")
    status, out = run(sess, f"{USER} sh -c '{script}'")
    assert status == 0 and "DONE" in out and out.count("group data") == 2, out
    assert sorted(p.name for p in (share / "grp").iterdir()) == ["new"]
    st = os.stat(share / "grp" / "new")
    assert (st.st_uid, st.st_gid) == (2000, 2000)   # guest 1000:1000, translated
    # without the supplementary group the guest refuses on its own
    status, out = run(sess, "/tmp/credtool as 1000 1000 - cat /mnt/grp/new")
    assert status != 0 and "Permission denied" in out, out


def test_chgrp_and_setgid_through_a_supplementary_group(guest):
    sess, share = guest
    status, out = run(sess, f"{USER} sh -c 'set -e; echo x > /mnt/work/own; chgrp 1001 /mnt/work/own;"
                            " chmod 2750 /mnt/work/own; stat -c \"%u %g %a\" /mnt/work/own'")
    assert status == 0 and "1000 1001 2750" in out, out
    st = os.stat(share / "work" / "own")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (2000, 1001, 0o2750)


def test_fssetxattr(guest):
    sess, share = guest
    f = share / "work" / "attrs"
    status, out = run(sess, f"{USER} sh -c 'echo a > /mnt/work/attrs && /tmp/credtool noatime "
                            "/mnt/work/attrs'")
    assert status == 0 and "xflags" in out, out
    xflags = int(out.split("xflags")[1].split()[0], 16)
    assert xflags & 0x40, out                     # FS_XFLAG_NOATIME, as the guest sees it
    buf = bytearray(8)
    fd = os.open(f, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, 0x80086601, buf)          # FS_IOC_GETFLAGS on the host
    finally:
        os.close(fd)
    assert struct.unpack("<i", buf[:4])[0] & 0x80, "FS_NOATIME_FL is not set on the host file"
    status, out = run(sess, "/tmp/credtool projid /mnt/work/attrs 7")
    assert status != 0 and "Operation not supported" in out, out
