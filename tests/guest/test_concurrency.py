"""Concurrency inside the booted guest: lock waiters never starve the request that
releases them, and parallel writers + readers lose nothing.

The deadlock test: with a worker pool of N threads per request queue, N+2 guest
processes block in fcntl(F_SETLKW) (then flock(LOCK_EX)) on a range another guest
process holds.  The holder's unlock is a request queued behind all the waiters; it is
served because waiters run on dedicated threads, and every waiter then gets the lock in
turn (each proves it was alone inside).  A static helper (tests/guest/lockhelper.c) is
built at test time with ``gcc -static`` and copied into the share: the guest has busybox
only.

The killed waiter: Linux's virtio-fs driver never sends FUSE_INTERRUPT
(fs/fuse/virtio_fs.c, ``virtio_fs_wake_interrupt_and_unlock`` is a TODO), so a waiter
killed with SIGKILL stays in D state until the backend answers its SETLKW.  The test
checks exactly that, and that the killed waiter does not stop the others from getting
the lock: when its lock is granted the dying process closes the file, which releases
it.  INTERRUPT cancellation itself is tested through the simulated frontend
(tests/integration/test_stress_interrupt.py).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import pathlib
import shutil
import subprocess

import pytest

from vhostfs.config import Config

pytestmark = pytest.mark.guest

HERE = pathlib.Path(__file__).parent
POOL = {f.name: f.default for f in dataclasses.fields(Config)}["thread_pool_size"]
WAITERS = POOL + 2


@pytest.fixture(scope="module")
def lockhelper(guest) -> str:
    """The static helper, in the share; returns its guest path."""
    gcc = shutil.which("gcc")
    if gcc is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("gcc is needed to build tests/guest/lockhelper.c")
        pytest.skip("gcc is needed to build tests/guest/lockhelper.c")
    bindir = guest.share / ".lockhelper"
    bindir.mkdir(exist_ok=True)
    out = bindir / "lockhelper"
    subprocess.run([gcc, "-static", "-O2", "-Wall", "-Werror", "-o", str(out),
                    str(HERE / "lockhelper.c")], check=True)
    guest.sh("cp /mnt/.lockhelper/lockhelper /tmp/lockhelper && chmod 755 /tmp/lockhelper")
    return "/tmp/lockhelper"


def host_lock_conflicts(path: pathlib.Path, mode: str) -> bool:
    """True if a host process cannot take the lock the guest holder holds (the guest's
    locks are real host locks, so this test exercises the backend, not the guest's
    local lock table)."""
    with open(path, "r+b") as f:
        try:
            if mode == "fcntl":
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)
            else:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        return False


# A shell function: wait (bounded: 60 s at 0.1 s steps) until every pid in $2.. sleeps
# inside a FUSE request, i.e. its wchan names a fuse/request wait; fail loudly otherwise.
BLOCKED = r"""
all_blocked() {
    want=$1; shift
    for try in $(seq 1 600); do
        n=0
        for p in "$@"; do
            case "$(cat /proc/$p/wchan 2>/dev/null)" in
                *fuse*|*request*) n=$((n + 1)) ;;
            esac
        done
        [ $n -ge $want ] && return 0
        sleep 0.1
    done
    echo "only $n of $want waiters are blocked in a FUSE request:"
    for p in "$@"; do echo "$p $(cat /proc/$p/wchan 2>/dev/null) $(grep State /proc/$p/status 2>/dev/null)"; done
    return 1
}
wait_file() {
    for try in $(seq 1 600); do [ -e "$1" ] && return 0; sleep 0.1; done
    echo "$1 never appeared"; return 1
}
"""


@pytest.mark.parametrize("mode", ["fcntl", "flock"])
def test_n_plus_2_lock_waiters_do_not_deadlock(guest, lockhelper, mode):
    host = guest.workdir(f"conc-{mode}")
    host.mkdir()
    (host / "lockfile").write_bytes(b"\0" * 100)
    d = f"/mnt/{host.name}"
    # 1. The holder takes the lock; the host sees it as a real lock.
    guest.sh(BLOCKED + f"""
rm -f /tmp/held-{mode} /tmp/release-{mode} /tmp/log-{mode} /tmp/inside-{mode}
{lockhelper} hold {mode} {d}/lockfile /tmp/held-{mode} /tmp/release-{mode} \
    >/tmp/holder-{mode}.out 2>&1 &
echo $! > /tmp/holder-{mode}.pid
wait_file /tmp/held-{mode}
""")
    assert host_lock_conflicts(host / "lockfile", mode), "the guest's lock is not a host lock"
    # 2. N+2 waiters block in the backend; then the holder's unlock is queued behind them.
    out = guest.sh(BLOCKED + f"""
pids=""
for i in $(seq 1 {WAITERS}); do
    {lockhelper} wait {mode} {d}/lockfile $i /tmp/inside-{mode} /tmp/log-{mode} \
        >/tmp/waiter-{mode}-$i.out 2>&1 &
    pids="$pids $!"
done
all_blocked {WAITERS} $pids
for p in $pids; do echo "wchan $(cat /proc/$p/wchan)"; done
touch /tmp/release-{mode}
holder=$(cat /tmp/holder-{mode}.pid)
wait $holder 2>/dev/null || true
while [ -d /proc/$holder ]; do sleep 0.1; done
status=0
for p in $pids; do wait $p || status=$?; done
cat /tmp/waiter-{mode}-*.out
[ $status = 0 ] || {{ echo "a waiter failed with $status"; exit 1; }}
sort /tmp/log-{mode}
""", timeout=300)
    got = sorted(line for line in out.splitlines() if line.startswith("got "))
    assert got == sorted(f"got {i}" for i in range(1, WAITERS + 1)), out
    wchans = [line.split()[1] for line in out.splitlines() if line.startswith("wchan ")]
    print(f"waiters slept in: {sorted(set(wchans))}")
    assert len(wchans) == WAITERS
    assert not host_lock_conflicts(host / "lockfile", mode), "a lock was left behind"


@pytest.mark.parametrize("mode", ["fcntl", "flock"])
def test_killed_waiter_stays_in_d_state_and_does_not_block_the_others(guest, lockhelper, mode):
    host = guest.workdir(f"kill-{mode}")
    host.mkdir()
    (host / "lockfile").write_bytes(b"\0" * 100)
    d = f"/mnt/{host.name}"
    out = guest.sh(BLOCKED + f"""
rm -f /tmp/kheld-{mode} /tmp/krelease-{mode} /tmp/klog-{mode} /tmp/kinside-{mode}
{lockhelper} hold {mode} {d}/lockfile /tmp/kheld-{mode} /tmp/krelease-{mode} \
    >/tmp/kholder-{mode}.out 2>&1 &
holder=$!
wait_file /tmp/kheld-{mode}
pids=""
for i in 1 2 3; do
    {lockhelper} wait {mode} {d}/lockfile $i /tmp/kinside-{mode} /tmp/klog-{mode} \
        >/tmp/kwaiter-{mode}-$i.out 2>&1 &
    pids="$pids $!"
done
all_blocked 3 $pids
victim=$(echo $pids | cut -d' ' -f1)
kill -9 $victim
# No FUSE_INTERRUPT from virtio-fs: the killed waiter cannot leave its SETLKW.
for try in $(seq 1 600); do
    st=$(awk '/^State:/ {{print $2}}' /proc/$victim/status 2>/dev/null)
    [ "$st" = D ] && break
    sleep 0.1
done
echo "victim state: $st"
[ "$st" = D ] || exit 7
touch /tmp/krelease-{mode}
wait $holder
status=0
for p in $pids; do
    if [ $p = $victim ]; then wait $p 2>/dev/null || true; else wait $p || status=$?; fi
done
while [ -d /proc/$victim ]; do sleep 0.1; done
[ $status = 0 ] || {{ echo "a waiter failed with $status"; cat /tmp/kwaiter-{mode}-*.out; exit 1; }}
sort /tmp/klog-{mode}
""", timeout=300)
    assert "victim state: D" in out
    got = sorted(line for line in out.splitlines() if line.startswith("got "))
    assert got == ["got 2", "got 3"], out
    assert not host_lock_conflicts(host / "lockfile", mode), "the killed waiter's lock was left behind"


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_parallel_writers_and_readers_lose_nothing(guest):
    """8 writers and 8 readers at once (plus small-file churn); every byte checked on
    the host and in the guest after dropping the guest's page cache."""
    host = guest.workdir("rw8")
    host.mkdir()
    expected = {}
    for i in range(8):
        data = os.urandom((2 << 20) + i * 4099)
        (host / f"r{i}").write_bytes(data)
        expected[f"r{i}"] = hashlib.sha256(data).hexdigest()
    out = guest.sh("""
cd rw8
for i in 0 1 2 3 4 5 6 7; do head -c $((3145728 + i * 8191)) /dev/urandom > /tmp/src$i; done
(cd /tmp && sha256sum src[0-7]) > /tmp/src.sums
for i in 0 1 2 3 4 5 6 7; do
    ( dd if=/tmp/src$i of=w$i bs=65536 2>/dev/null &&
      mkdir churn$i && for j in $(seq 1 40); do echo $j > churn$i/f$j; done &&
      rm -r churn$i ) &
    ( for k in 1 2; do sha256sum r$i; done > /tmp/read$i.sums ) &
done
wait
cat /tmp/read*.sums
sync; echo 3 > /proc/sys/vm/drop_caches
echo WRITTEN
sed 's/src/w/' /tmp/src.sums
echo REREAD
sha256sum w*
""", timeout=600)
    reads, written, reread, section = [], {}, {}, "reads"
    for line in out.splitlines():
        if line == "WRITTEN":
            section = "written"
            continue
        if line == "REREAD":
            section = "reread"
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            continue
        if section == "reads":
            reads.append((parts[1], parts[0]))
        elif section == "written":
            written[parts[1]] = parts[0]
        else:
            reread[parts[1]] = parts[0]
    assert sorted(reads) == sorted((name, h) for name, h in expected.items() for _ in range(2))
    assert set(written) == {f"w{i}" for i in range(8)}
    assert reread == written
    for name, h in written.items():
        assert sha256(host / name) == h, f"{name}: host bytes differ from what the guest wrote"
    assert sorted(p.name for p in host.iterdir()) == sorted(
        [f"r{i}" for i in range(8)] + [f"w{i}" for i in range(8)])
