"""A newer guest client: Debian bookworm-backports' Linux 6.12 (FUSE 7.41) in ONE booted guest.

The default guest kernel (Debian 12's 6.1) predates two protocol features vhostfs
negotiates; this guest drives them:

* FUSE_DIRECT_IO_ALLOW_MMAP (7.39, Linux 6.6): ``--cache never --allow-mmap`` lets the
  guest map a direct-I/O file MAP_SHARED; stores through the mapping reach the host file
  after msync.  Without ``--allow-mmap`` the same mmap fails with ENODEV (negative control).
* FUSE_CREATE_SUPP_GROUP (7.38 protocol, sent by Linux 6.7+): a guest user 1000:1000 with
  supplementary group 1001 creates files and directories in host directories owned
  root:1001 (modes 0775 and 2775); the guest kernel adds the FUSE_EXT_GROUPS extension
  (group 1001) to CREATE/MKDIR, vhostfs (root, per-request credentials) creates as
  1000:1000 + 1001 and the host owner/group follow kernel semantics (setgid directory:
  the directory's group).  A user without group 1001 is refused (negative control).
* The conformance suite (tests/conformance/conformance.c) as guest root and as uid 1000.

One boot, three virtio-fs devices, three vhostfs processes: ``/mnt`` (the conformance
options of test_conformance.py, debug log), ``/m-mmap`` (``--cache never --allow-mmap``)
and ``/m-nommap`` (``--cache never``).  Each vhostfs runs through a small probe
(``PROBE_PY``) that logs, on stderr, the INIT the guest sent and what vhostfs agreed,
and the uid/gid/supplementary groups of each creation request as vhostfs parsed them:
vhostfs itself logs neither.

The kernel is fetched by scripts/fetch-kernel-backports.sh into ~/.cache/vhostfs on first
use; if that fails the tests are skipped, except under CI=true where they fail.
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from test_conformance import (GUEST_LIMITS, TESTS, USER, _expect, _run_suite, build_layout,
                              check_guest_owners)
from tests.support.fetch import fetched
from vhostfs.fuse import abi
from vhostfs.guestrun import GuestRunner
from vhostfs.guestrun.runner import unix_socket_listening

pytestmark = pytest.mark.guest

REPO = pathlib.Path(__file__).resolve().parents[2]
FETCH = REPO / "scripts" / "fetch-kernel-backports.sh"
ENTRIES = 2000          # readdir test size (the 6.1 suite lists 10,000 as root; TCG time)

PROBE_PY = r"""
# vhostfs with a probe: logs the INIT exchange and the creation requests' credentials.
import os, struct, sys
sys.path.insert(0, @REPO@)
from vhostfs.fuse import server as _srv

def _say(line):
    os.write(2, (line + "\n").encode())

_init = _srv.FuseServer._init

def _probe_init(self, ctx, nodeid, body, reader, writer):
    major, minor, _ra, flags = struct.unpack_from("<IIII", bytes(body[:16]))
    out = _init(self, ctx, nodeid, body, reader, writer)
    _say(f"PROBE INIT kernel={major}.{minor} flags={flags:#x} reply_minor={self.proto_minor}"
         f" agreed={self.flags:#x}")
    return out

_srv.FuseServer._init = _probe_init

def _wrap(orig, op):
    def probe(self, ctx, nodeid, body, reader, writer):
        groups = ",".join(str(g) for g in ctx.groups) or "-"
        _say(f"PROBE {op} uid={ctx.uid} gid={ctx.gid} groups={groups}")
        return orig(self, ctx, nodeid, body, reader, writer)
    return probe

for _name in ("_create", "_mkdir", "_mknod", "_symlink", "_tmpfile"):
    setattr(_srv.FuseServer, _name, _wrap(getattr(_srv.FuseServer, _name), _name[1:].upper()))

from vhostfs.cli import main
sys.argv[0] = "vhostfs"
main()
"""

# Static helper the busybox guest runs: switch to a uid/gid/groups, map files.
HELPER_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc >= 6 && !strcmp(argv[1], "as")) {      /* as UID GID SUPP|- PROG ARGS... */
        gid_t g = atoi(argv[3]), supp = strcmp(argv[4], "-") ? atoi(argv[4]) : 0;
        if (setgroups(strcmp(argv[4], "-") ? 1 : 0, &supp)) { perror("setgroups"); return 2; }
        if (setresgid(g, g, g) || setresuid(atoi(argv[2]), atoi(argv[2]), atoi(argv[2]))) {
            perror("setres[ug]id"); return 2;
        }
        execv(argv[5], argv + 5);
        perror("execv");
        return 2;
    }
    if (argc == 4 && !strcmp(argv[1], "mmapw")) {   /* mmapw PATH TEXT: MAP_SHARED store + msync */
        int fd = open(argv[2], O_RDWR);
        if (fd < 0) { perror("open"); return 2; }
        struct stat st;
        if (fstat(fd, &st) || st.st_size < 8192) { fprintf(stderr, "file too small\n"); return 2; }
        char *p = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) { printf("mmap-failed errno=%d %s\n", errno, strerror(errno)); return 3; }
        printf("before=%.8s\n", p);                  /* the host's bytes, read through the map */
        size_t n = strlen(argv[3]);
        memcpy(p, argv[3], n);
        memcpy(p + 4096, argv[3], n);                /* a second page */
        if (msync(p, st.st_size, MS_SYNC)) { perror("msync"); return 2; }
        munmap(p, st.st_size);
        close(fd);
        printf("mmap-ok\n");
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "statx")) {   /* statx PATH: birth time (FUSE_STATX) */
        struct statx sx;
        if (statx(AT_FDCWD, argv[2], AT_STATX_FORCE_SYNC, STATX_BASIC_STATS | STATX_BTIME, &sx)) {
            perror("statx"); return 2;
        }
        printf("statx mask=%#x btime=%lld.%09u size=%llu mode=%o\n", sx.stx_mask,
               (long long)sx.stx_btime.tv_sec, sx.stx_btime.tv_nsec,
               (unsigned long long)sx.stx_size, sx.stx_mode);
        return 0;
    }
    fprintf(stderr, "usage: as UID GID SUPP|- PROG ARGS... | mmapw PATH TEXT | statx PATH\n");
    return 2;
}
"""


def _fetch_kernel() -> pathlib.Path:
    """The extracted backports kernel tree (fetched on first use); skip or fail with the reason."""
    return pathlib.Path(fetched(FETCH, "the backports kernel"))


def _probe_argv(probe: pathlib.Path, socket: str, share: str, *opts: str) -> list[str]:
    return [sys.executable, str(probe), "--socket-path", socket, "--shared-dir", share, *opts]


class _Extra:
    """A second/third virtio-fs device: its own vhostfs (with the probe) and share."""

    def __init__(self, probe: pathlib.Path, base: pathlib.Path, tag: str, *opts: str) -> None:
        self.tag, self.share = tag, base / f"share-{tag}"
        self.share.mkdir(mode=0o755)
        os.chmod(self.share, 0o755)
        self.socket, self.log = str(base / f"{tag}.sock"), base / f"{tag}.log"
        self.argv = _probe_argv(probe, self.socket, str(self.share), "--log-level", "info", *opts)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)
        end = time.monotonic() + 60
        while not unix_socket_listening(self.socket):
            assert self.proc.poll() is None, f"{self.tag} backend exited:\n{self.log.read_text()}"
            assert time.monotonic() < end, f"{self.tag} backend did not listen"
            time.sleep(0.02)

    def qemu_args(self, n: int) -> list[str]:
        return ["-chardev", f"socket,id=nc{n},path={self.socket}",
                "-device", f"vhost-user-fs-pci,queue-size=1024,chardev=nc{n},tag={self.tag}"]

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(30)          # exits by itself once QEMU is gone
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


@pytest.fixture(scope="module")
def newer(tmp_path_factory):
    kernel_root = _fetch_kernel()
    base = tmp_path_factory.mktemp("newer-client")
    # main share: the conformance layout of test_conformance.py (smaller readdir) + supp-group dirs
    lay = build_layout(base, ENTRIES, ENTRIES)
    share, token, mounted = lay["share"], lay["token"], lay["mounted"]
    probe = base / "probe.py"
    probe.write_text(PROBE_PY.replace("@REPO@", repr(str(REPO))))
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(share / "nchelper"), "-x", "c", "-"],
                   input=HELPER_C.encode(), check=True)
    (share / "born").write_bytes(b"x" * 1234)
    sg = share / "sg"
    sg.mkdir(mode=0o755)
    os.chmod(sg, 0o755)
    for name, mode in (("plain", 0o775), ("setgid", 0o2775)):
        (sg / name).mkdir()
        os.chown(sg / name, 0, 1001)
        os.chmod(sg / name, mode)

    mm = _Extra(probe, base, "mmap", "--cache", "never", "--allow-mmap")
    nomm = _Extra(probe, base, "nommap", "--cache", "never")
    for extra in (mm, nomm):
        (extra.share / "mm.dat").write_bytes(b"a" * 8192)
    backend = _probe_argv(probe, "{socket}", "{shared_dir}", "--log-level", "debug", "--xattr",
                          "--posix-acl", "--killpriv-v2", "--announce-submounts")
    runner = GuestRunner(share, backend=backend, kernel_root=kernel_root, boot_timeout=240,
                         timeout=900, extra_qemu=mm.qemu_args(1) + nomm.qemu_args(2))
    state = dict(base=base, share=share, token=token, mm=mm, nomm=nomm, kernel=runner.kernel)
    t0 = time.monotonic()
    try:
        mm.start()
        nomm.start()
        with runner.session() as sess:
            state["boot_seconds"] = sess.boot_seconds
            res = sess.run("set -e; cp /mnt/conformance /tmp/cf; cp /mnt/nchelper /tmp/nch; "
                           "chmod 755 /tmp/cf /tmp/nch; uname -r; "
                           "mkdir -p /m-mmap /m-nommap; mount -t virtiofs mmap /m-mmap; "
                           "mount -t virtiofs nommap /m-nommap; echo mounted", timeout=120)
            assert res.status == 0 and "mounted" in res.output, res.output
            state["uname"] = res.output.split()[0]
            state["sess"] = sess
            yield state
            state.pop("sess")
            res = sess.run("umount /m-mmap && umount /m-nommap && echo unmounted", timeout=60)
            assert res.status == 0 and "unmounted" in res.output, res.output
    finally:
        state["mm_status"], state["nomm_status"] = mm.stop(), nomm.stop()
        if mounted:
            subprocess.run(["umount", "-l", str(share / "submount")], check=False)
        print(f"test_newer_client: kernel {state.get('uname')}, boot {state.get('boot_seconds')} s, "
              f"module wall time {time.monotonic() - t0:.1f} s")
    # A clean end on all three devices: umount 0, QEMU 0, every vhostfs exited 0 by itself.
    down = sess.shutdown
    assert down is not None and (down.umount_status, down.qemu_status, down.backend_status) == (0, 0, 0), down
    assert (state["mm_status"], state["nomm_status"]) == (0, 0), state


def _inits(log: str) -> list[dict[str, str]]:
    return [dict(kv.split("=", 1) for kv in m.group(1).split())
            for m in re.finditer(r"^PROBE INIT (.*)$", log, re.M)]


def _main_log(newer) -> str:
    return newer["sess"].backend_log.read_text(errors="replace")


# --- the guest is a newer FUSE client ---------------------------------------------------------

def test_guest_runs_the_backports_kernel(newer):
    assert newer["uname"] == newer["kernel"].version
    assert tuple(int(x) for x in newer["uname"].split(".")[:2]) >= (6, 7), newer["uname"]


def test_guest_offers_fuse_7_39_or_newer(newer):
    """The INIT the guest sent (all three devices): minor >= 39, and vhostfs agreed the flags."""
    inits = _inits(_main_log(newer))
    assert len(inits) == 1, inits
    major, minor = (int(x) for x in inits[0]["kernel"].split("."))
    assert major == 7 and minor >= 39, inits[0]
    # vhostfs answers min(guest minor, the minor it implements)
    assert int(inits[0]["reply_minor"]) == min(minor, abi.KERNEL_MINOR_VERSION), inits[0]
    assert int(inits[0]["agreed"], 16) & abi.FUSE_CREATE_SUPP_GROUP, inits[0]
    for extra, allow in ((newer["mm"], True), (newer["nomm"], False)):
        got = _inits(extra.log.read_text(errors="replace"))
        assert len(got) == 1, (extra.tag, got)
        assert bool(int(got[0]["agreed"], 16) & abi.FUSE_DIRECT_IO_ALLOW_MMAP) == allow, got[0]
    print(f"guest FUSE {major}.{minor}; vhostfs replied minor {inits[0]['reply_minor']}")


def test_negotiated_minor_is_39_or_newer(newer):
    inits = _inits(_main_log(newer))
    assert int(inits[0]["reply_minor"]) >= 39, inits[0]


# --- FUSE_DIRECT_IO_ALLOW_MMAP ----------------------------------------------------------------

def test_shared_mmap_with_cache_never_and_allow_mmap(newer):
    res = newer["sess"].run("/tmp/nch mmapw /m-mmap/mm.dat MMAP-WRITE-1", timeout=120)
    assert res.status == 0 and "mmap-ok" in res.output, res.output
    assert "before=aaaaaaaa" in res.output, res.output
    data = (newer["mm"].share / "mm.dat").read_bytes()
    assert data[:12] == b"MMAP-WRITE-1" and data[4096:4108] == b"MMAP-WRITE-1", data[:16]
    assert len(data) == 8192 and data[12:4096] == b"a" * 4084
    # the file really is direct I/O: a host change is read at once (no guest page cache)
    (newer["mm"].share / "mm.dat").write_bytes(b"b" * 8192)
    out = newer["sess"].run("head -c 8 /m-mmap/mm.dat; echo", timeout=60).output
    assert out.strip() == "bbbbbbbb", out


def test_shared_mmap_without_allow_mmap_is_enodev(newer):
    """Negative control: the same mmap on the --cache never share without --allow-mmap."""
    res = newer["sess"].run("/tmp/nch mmapw /m-nommap/mm.dat MMAP-WRITE-2", timeout=120)
    assert res.status == 3 and "mmap-failed errno=19" in res.output, res.output
    assert (newer["nomm"].share / "mm.dat").read_bytes() == b"a" * 8192


# --- FUSE_CREATE_SUPP_GROUP -------------------------------------------------------------------

def test_create_through_a_supplementary_group(newer):
    sess, sg = newer["sess"], newer["share"] / "sg"
    mark = len(re.findall(r"^PROBE (CREATE|MKDIR) ", _main_log(newer), re.M))
    script = ("for d in plain setgid; do "
              "  /tmp/nch as 1000 1000 1001 /bin/sh -c \"echo data > /mnt/sg/$d/file && "
              "  mkdir /mnt/sg/$d/dir\" && echo created-$d; "
              "done; "
              # negative control: the same user without the supplementary group
              "/tmp/nch as 1000 1000 - /bin/sh -c 'mkdir /mnt/sg/plain/nogroup' 2>&1 || echo refused; "
              "stat -c '%n %u %g %a' /mnt/sg/*/file /mnt/sg/*/dir")
    res = sess.run(script, timeout=120)
    assert "created-plain" in res.output and "created-setgid" in res.output, res.output
    assert "refused" in res.output and "Permission denied" in res.output, res.output
    assert not (sg / "plain" / "nogroup").exists()
    want = {  # (uid, gid, setgid bit): the creator's fsgid, or the setgid directory's group
        "plain/file": (1000, 1000, False), "plain/dir": (1000, 1000, False),
        "setgid/file": (1000, 1001, False), "setgid/dir": (1000, 1001, True),
    }
    for rel, (uid, gid, sgid) in want.items():
        st = os.lstat(sg / rel)
        assert (st.st_uid, st.st_gid, bool(st.st_mode & 0o2000)) == (uid, gid, sgid), (rel, st)
    assert (sg / "plain" / "file").read_text() == "data\n"
    # the guest's view agrees with the host's
    for rel, (uid, gid, _) in want.items():
        assert f"/mnt/sg/{rel} {uid} {gid} " in res.output, res.output
    # vhostfs received the groups extension: each creation carried group 1001 (the parent
    # directory's group, which is not the caller's fsgid) ...
    reqs = re.findall(r"^PROBE (CREATE|MKDIR) uid=(\d+) gid=(\d+) groups=(\S+)$",
                      _main_log(newer), re.M)[mark:]
    # ... and nothing reached vhostfs for the refused mkdir (the guest checked first)
    assert sorted(reqs) == [("CREATE", "1000", "1000", "1001")] * 2 + \
        [("MKDIR", "1000", "1000", "1001")] * 2, reqs


# --- the conformance suite under the newer kernel ---------------------------------------------

@pytest.fixture(scope="module")
def root_results(newer):
    return _run_suite(newer["sess"], f"--entries {ENTRIES} --escape-token {newer['token']} /mnt/work")


@pytest.fixture(scope="module")
def user_results(newer, root_results):
    return _run_suite(newer["sess"], f"--user {USER} --entries {ENTRIES} "
                                     f"--escape-token {newer['token']} /mnt/work-user")


#: Items that fail with this guest kernel for a reason outside vhostfs (none measured).
NEWER_LIMITS: dict[str, str] = dict(GUEST_LIMITS)


@pytest.mark.parametrize("name", TESTS)
def test_conformance_as_root(root_results, name):
    _expect(root_results, name, "guest root (Linux 6.12)", NEWER_LIMITS)


@pytest.mark.parametrize("name", TESTS)
def test_conformance_as_user(user_results, name):
    _expect(user_results, name, "uid 1000 (Linux 6.12)", NEWER_LIMITS)


def test_conformance_owners_and_escapes_seen_from_the_host(newer, root_results, user_results):
    check_guest_owners(newer["share"])
    assert (newer["base"] / "outside-secret").read_text() == newer["token"] + "\n"


# --- FUSE_STATX (7.39): a 6.6+ guest asks for the birth time -----------------------------

def test_statx_birth_time(newer):
    """statx(STATX_BTIME) in the guest: the guest sends FUSE_STATX and gets the host
    file's birth time (answered ENOSYS, the guest would report no btime at all)."""
    from vhostfs import hostsys
    res = newer["sess"].run("/tmp/nch statx /mnt/born", timeout=60)
    assert res.status == 0 and "statx mask=" in res.output, res.output
    fields = dict(kv.split("=", 1) for kv in res.output.split("statx ", 1)[1].split())
    host = hostsys.statx(-100, str(newer["share"] / "born"), 0,
                         hostsys.STATX_BASIC_STATS | hostsys.STATX_BTIME)
    assert host.mask & hostsys.STATX_BTIME, "the host filesystem reports no birth time"
    assert int(fields["mask"], 16) & hostsys.STATX_BTIME, res.output
    assert fields["btime"] == f"{host.btime}.{host.btime_nsec:09d}", (res.output, host)
    assert fields["size"] == "1234" and fields["mode"] == "100644", res.output
    assert re.search(r"op=STATX\b", _main_log(newer)), "no FUSE_STATX in the daemon's log"

