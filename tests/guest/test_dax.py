"""DAX end to end in ONE booted guest: QEMU 11.1 (Debian sid, fetched by
scripts/fetch-qemu-sid.sh into a private cache), vhost-user-test-device-pci with a 32 MiB
window (qemu-configs/dax/), the Linux 6.1 guest mounting ``-o dax=always``, vhostfs serving
with ``--dax-window 32M``.

Checked: the guest found the window (dmesg "Cache len"), the mount is dax=always and the
files are DAX inodes (statx STATX_ATTR_DAX); files of 1 B, 2 MiB - 1, 2 MiB, 2 MiB + 1 and
100 MiB (> the window: reclaim runs) read back with the host's checksums; mmap reads and
writes are coherent with host pread/pwrite, including the file's last partial page; a write
to a range first mapped read-only upgrades it at the same window offset; extending writes
arrive as FUSE WRITE; vhostfs logs SETUPMAPPING / REMOVEMAPPING.

Without QEMU 11.1 (no apt mirror, no network) the tests are skipped, except under CI=true.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.support.fetch import fetched

pytestmark = pytest.mark.guest

REPO = pathlib.Path(__file__).resolve().parents[2]
MiB = 1 << 20
WINDOW = 32 * MiB
SIZES = {"one_byte": 1, "two_mib_minus_1": 2 * MiB - 1, "two_mib": 2 * MiB,
         "two_mib_plus_1": 2 * MiB + 1, "hundred_mib": 100 * MiB}
# -o dax=inode: files of at least this size get FUSE_ATTR_DAX (the 100 MiB file does not,
# BIG_DAX does): the same boot compares DAX and non-DAX reads.
INODE_MIN = 101 * MiB
BIG_DAX = 102 * MiB
FITS = 24 * MiB                  # fits the window: read twice, the second read needs no SETUPMAPPING
BENCH = {}                       # filled by the timing tests, printed at the end

# A static helper the guest runs from the DAX mount (busybox has no mmap tool).
HELPER_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
static int die(const char *what) { perror(what); return 2; }
int main(int argc, char **argv) {
    if (argc < 3) return 2;
    const char *cmd = argv[1], *path = argv[2];
    if (!strcmp(cmd, "readbench")) {                /* read(2) 1 MiB at a time, timed */
        static char buf[1 << 20];
        int fd = open(path, O_RDONLY);
        if (fd < 0) return die("open");
        struct timespec a, b;
        long long total = 0, limit = argc > 3 ? atoll(argv[3]) : (1LL << 62);
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (ssize_t n; total < limit && (n = read(fd, buf, sizeof buf)) > 0;) total += n;
        clock_gettime(CLOCK_MONOTONIC, &b);
        printf("bytes=%lld ns=%lld\n", total,
               (b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
        return 0;
    }
    if (!strcmp(cmd, "isdax")) {
        struct statx stx;
        if (statx(AT_FDCWD, path, 0, STATX_BASIC_STATS, &stx)) return die("statx");
        printf("dax=%d\n", !!(stx.stx_attributes & STATX_ATTR_DAX));
        return 0;
    }
    int fd = open(path, !strcmp(cmd, "write") ? O_RDWR : O_RDONLY);
    if (fd < 0) return die("open");
    struct stat st;
    if (fstat(fd, &st)) return die("fstat");
    if (!strcmp(cmd, "sum")) {                     /* FNV-1a 64 of the whole file via mmap */
        unsigned char *p = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) return die("mmap");
        uint64_t h = 1469598103934665603ULL;
        for (off_t i = 0; i < st.st_size; i++) { h ^= p[i]; h *= 1099511628211ULL; }
        printf("fnv=%016llx\n", (unsigned long long)h);
        return 0;
    }
    off_t off = strtoll(argv[3], NULL, 0);
    off_t base = off & ~(off_t)4095;
    size_t len = !strcmp(cmd, "read") ? strtoul(argv[4], NULL, 0) : strlen(argv[4]);
    size_t span = off - base + len;
    int prot = PROT_READ | (!strcmp(cmd, "write") ? PROT_WRITE : 0);
    unsigned char *p = mmap(NULL, span, prot, MAP_SHARED, fd, base);
    if (p == MAP_FAILED) return die("mmap");
    if (!strcmp(cmd, "read")) {
        fwrite(p + (off - base), 1, len, stdout);
        putchar('\n');
    } else {
        memcpy(p + (off - base), argv[4], len);
        if (msync(p, span, MS_SYNC)) return die("msync");
    }
    return 0;
}
"""


def _fnv(data: bytes) -> str:
    h = 1469598103934665603
    for b in data:
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def _fetch_qemu() -> str:
    """The sid QEMU 11.1 wrapper (fetched on first use); skip or fail with the reason."""
    return fetched(REPO / "scripts" / "fetch-qemu-sid.sh", "QEMU 11.1")


@pytest.fixture(scope="module")
def dax_share(tmp_path_factory):
    """The share (test files, the static mmap helper) and the QEMU 11.1 set-up."""
    from vhostfs.guestrun import qemu

    wrapper = _fetch_qemu()
    share = tmp_path_factory.mktemp("dax-share")
    files = {}
    for name, size in SIZES.items():
        data = os.urandom(size)
        (share / name).write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()
    (share / "fits").write_bytes(os.urandom(FITS))
    (share / "big_dax").write_bytes(b"")
    os.truncate(share / "big_dax", BIG_DAX)
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the guest's mmap helper (static)")
    src = share / "daxmmap.c"
    src.write_text(HELPER_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(share / "daxmmap"), str(src)], check=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("VHOSTFS_QEMU", wrapper)
    mp.setattr(qemu, "CONFIG_DIR", REPO / "qemu-configs" / "dax")
    try:
        yield share, files
    finally:
        mp.undo()


def _boot(share, mount_opts: str):
    from vhostfs.guestrun import GuestRunner
    backend = [sys.executable, "-m", "vhostfs", "--socket-path", "{socket}", "--shared-dir",
               "{shared_dir}", "--tag", "{tag}", "--log-level", "{log_level}",
               "--dax-window", str(WINDOW), "--dax-inode-min-size", str(INODE_MIN)]
    runner = GuestRunner(share, tag="daxfs", backend=backend, mount_opts=mount_opts,
                         memory="512M", boot_timeout=180, timeout=300, log_level="info",
                         kernel=os.environ.get("VHOSTFS_GUEST_KERNEL"))
    return runner.session()


@pytest.fixture(scope="module")
def dax_guest(dax_share):
    """The one -o dax=always boot every test but the dax=inode one shares."""
    share, files = dax_share
    with _boot(share, "dax=always") as session:
        yield session, share, files


def _sh(session, script: str, timeout: float = 240) -> str:
    res = session.run("set -e\n" + script, timeout=timeout)
    assert res.status == 0, f"guest script failed ({res.status}):\n{script}\n---\n{res.output}"
    return res.output


def _backend_log(session) -> str:
    return pathlib.Path(session.backend_log).read_text(errors="replace")


def test_window_found_and_mounted_dax_always(dax_guest):
    session, _, _ = dax_guest
    out = _sh(session, "dmesg | grep 'Cache len'; grep ' /mnt ' /proc/mounts; /mnt/daxmmap isdax /mnt/two_mib")
    assert re.search(rf"virtiofs virtio\d+: Cache len: 0x{WINDOW:x} @ 0x[0-9a-f]+", out), out
    assert "dax=always" in out and "dax=1" in out, out
    assert "DAX window announced" in _backend_log(session)


def test_files_read_back_through_dax(dax_guest):
    session, _, files = dax_guest
    t0 = time.monotonic()
    out = _sh(session, "sha256sum " + " ".join(f"/mnt/{n}" for n in SIZES), timeout=400)
    elapsed = time.monotonic() - t0
    got = {pathlib.Path(path).name: digest for digest, path in (l.split() for l in out.splitlines() if l.strip())}
    assert got == files
    log = _backend_log(session)
    setups = log.count("SETUPMAPPING")
    removes = re.findall(r"REMOVEMAPPING +count=(\d+)", log)
    # 100 MiB = 50 ranges through a 16-range window: the guest had to reclaim
    assert setups >= 50 + 4, setups
    assert removes, "no REMOVEMAPPING logged although the file is larger than the window"
    print(f"sha256 of {sum(SIZES.values()) / MiB:.0f} MiB through DAX in {elapsed:.1f} s (TCG); "
          f"{setups} SETUPMAPPING, {len(removes)} REMOVEMAPPING")


def test_mmap_coherent_with_host_pread_pwrite(dax_guest):
    session, share, _ = dax_guest
    path = share / "coherent"
    data = bytearray(os.urandom(3 * MiB + 100))
    path.write_bytes(data)
    out = _sh(session, "/mnt/daxmmap sum /mnt/coherent")
    assert f"fnv={_fnv(bytes(data))}" in out
    # guest mmap store -> host pread (a read-only range upgraded at the same moffset)
    _sh(session, "/mnt/daxmmap write /mnt/coherent 4096 GUEST-WROTE-THIS")
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pread(fd, 16, 4096) == b"GUEST-WROTE-THIS"
        # host pwrite -> guest mmap load and read(2), no invalidation needed: no guest page cache
        os.pwrite(fd, b"HOST-WROTE-THIS!", 2 * MiB + 10)
        out = _sh(session, "/mnt/daxmmap read /mnt/coherent 2097162 16; dd if=/mnt/coherent bs=1 "
                           "skip=2097162 count=16 2>/dev/null; echo")
        assert out.count("HOST-WROTE-THIS!") == 2, out
        # the last, partial page (served from a shadow copy): guest store + msync -> the file
        _sh(session, f"/mnt/daxmmap write /mnt/coherent {3 * MiB + 50} TAIL-PAGE")
        assert os.pread(fd, 9, 3 * MiB + 50) == b"TAIL-PAGE"
        assert os.fstat(fd).st_size == 3 * MiB + 100
    finally:
        os.close(fd)
    assert re.search(r"SETUPMAPPING .*upgrade=True.*writable=True", _backend_log(session))


def test_extending_writes_go_through_fuse_write(dax_guest):
    session, share, _ = dax_guest
    path = share / "growing"
    path.write_bytes(b"x" * 5000)
    _sh(session, "cat /mnt/growing > /dev/null; printf 'APPENDED' >> /mnt/growing; "
                 "dd if=/dev/zero bs=4096 count=3 conv=notrunc oflag=append of=/mnt/growing 2>/dev/null; "
                 "tail -c 12296 /mnt/growing | head -c 8")
    assert path.read_bytes()[:5008] == b"x" * 5000 + b"APPENDED"
    assert os.path.getsize(path) == 5008 + 3 * 4096
    assert "extending WRITE" in _backend_log(session)
    out = _sh(session, "/mnt/daxmmap read /mnt/growing 5000 8")
    assert "APPENDED" in out


def _mib_per_s(out: str, tag: str, size: int = 100 * MiB) -> float:
    m = re.search(r"(?<![A-Z])" + tag + r" bytes=(\d+) ns=(\d+)", out)   # DAX is not NODAX
    assert m, out
    assert int(m.group(1)) == size, out
    return int(m.group(1)) / MiB / max(int(m.group(2)) / 1e9, 1e-9)


def test_dax_read_that_fits_the_window(dax_guest):
    """dax=always: a 24 MiB file read twice; the second pass finds every range mapped."""
    session, _, _ = dax_guest
    out = _sh(session, "for t in FITS1 FITS2; do printf \"$t \"; /mnt/daxmmap readbench /mnt/fits; done")
    BENCH[f"DAX {FITS >> 20} MiB, cold window"] = _mib_per_s(out, "FITS1", FITS)
    BENCH[f"DAX {FITS >> 20} MiB, warm window"] = _mib_per_s(out, "FITS2", FITS)


def test_dax_inode_policy_and_dax_vs_non_dax_reads(dax_guest, dax_share):
    """A second boot, -o dax=inode (a mount's DAX mode is fixed while the guest's init
    holds it): the 100 MiB file (< --dax-inode-min-size) is read through FUSE READ, the
    102 MiB one through the window; both timed with cold guest caches."""
    share, files = dax_share
    with _boot(share, "dax=inode") as session:
        _inode_policy_and_timing(session, files)


def _inode_policy_and_timing(session, files):
    timed = "echo 3 > /proc/sys/vm/drop_caches; printf '{tag} '; /mnt/daxmmap readbench /mnt/{f} %d; " % (100 * MiB)
    out = _sh(session, "grep ' /mnt ' /proc/mounts; "
                       "/mnt/daxmmap isdax /mnt/hundred_mib; /mnt/daxmmap isdax /mnt/big_dax; "
                       + timed.format(f="hundred_mib", tag="NODAX") + timed.format(f="big_dax", tag="DAX")
                       + timed.format(f="fits", tag="FITS1"),
              timeout=400)
    assert "dax=inode" in out
    assert out.count("dax=0") == 1 and out.count("dax=1") == 1, out
    assert out.index("dax=0") < out.index("dax=1")          # hundred_mib: no; big_dax: yes
    nodax, dax = _mib_per_s(out, "NODAX"), _mib_per_s(out, "DAX")
    fits = _mib_per_s(out, "FITS1", FITS)
    BENCH.update({"FUSE READ 100 MiB (cold guest cache)": nodax,
                  f"DAX 100 MiB through a {WINDOW >> 20} MiB window (reclaim)": dax,
                  f"FUSE READ {FITS >> 20} MiB (cold guest cache)": fits})
    print("\n".join(f"  guest read(2) 1 MiB blocks, TCG: {k}: {v:.0f} MiB/s" for k, v in BENCH.items()))


def test_backend_log_has_no_errors(dax_guest):
    session, _, _ = dax_guest
    log = _backend_log(session)
    bad = [line for line in log.splitlines() if "[error" in line or "Traceback" in line]
    assert not bad, "\n".join(bad[:20])
    if os.environ.get("VHOSTFS_DAX_SHOW_LOG"):
        print(log[-6000:])
