"""Faults in a booted guest, host files checked byte for byte afterwards.

One vhostfs started by the runner (default sandbox) and two started here
(--keep-listening), four boots in all:

1. QEMU killed mid-write: the fsync'd file is intact, the file being written holds only
   whole copies of the block the guest wrote (plus at most one partial one: the write in
   flight), and vhostfs exits 0 on the disconnect.
2. vhostfs (--sandbox chroot --seccomp kill --keep-listening) SIGKILLed mid-write: the
   same checks; QEMU is then killed.
3. A new vhostfs (--sandbox namespace --seccomp kill --keep-listening) on the same
   socket: a new guest sees every fsync'd byte (sha256 in the guest), writes and fsyncs
   more, and powers off mid-write (sysrq o: no sync).  vhostfs keeps listening.
4. The same vhostfs serves the next boot (guest reboot without restarting the service):
   the data of boot 3 is there; SIGTERM while the guest writes: vhostfs finishes the
   requests in flight and exits 0; the file holds whole blocks only.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tests.guest.conftest import make_runner
from vhostfs.guestrun.runner import GuestError, GuestRunner, GuestSession, unix_socket_listening

pytestmark = pytest.mark.guest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BLOCK = 65536
# one 64 KiB block: line numbers, so a misplaced or torn block is visible
MAKE_BLOCK = "i=0; while [ $i -lt 4096 ]; do printf '%015d\\n' $i; i=$((i+1)); done > /tmp/blk"


def block() -> bytes:
    return b"".join(b"%015d\n" % i for i in range(4096))


def check_whole_blocks(path: pathlib.Path, *, partial_ok: bool) -> int:
    """The file is N copies of the block (plus, if ``partial_ok``, a prefix of one)."""
    data = path.read_bytes()
    blk = block()
    whole, rest = divmod(len(data), BLOCK)
    for i in range(whole):
        assert data[i * BLOCK:(i + 1) * BLOCK] == blk, f"{path.name}: block {i} corrupt"
    if rest:
        assert partial_ok, f"{path.name}: {rest} bytes of a torn block after {whole} whole ones"
        assert data[whole * BLOCK:] == blk[:rest], f"{path.name}: torn tail is not a prefix"
    return whole


def synced_file(name: str, size: int) -> bytes:
    """Deterministic content the guest writes with fsync (dd conv=fsync)."""
    seed = hashlib.sha256(name.encode()).digest()
    out = bytearray()
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[:size])


def write_synced(g, share: pathlib.Path, name: str, size: int = 300_000) -> bytes:
    """Have the guest write ``name`` and fsync it; returns the expected bytes."""
    data = synced_file(name, size)
    (share / ".src").mkdir(exist_ok=True)
    (share / ".src" / name).write_bytes(data)       # the guest copies it with fsync
    res = g.run(f"dd if=.src/{name} of={name} bs=4096 conv=fsync 2>/dev/null && echo SYNCED")
    assert res.status == 0 and "SYNCED" in res.output, res.output
    (share / ".src" / name).unlink()
    return data


def start_writer(g, name: str) -> None:
    res = g.run(f"{MAKE_BLOCK}; (while true; do cat /tmp/blk >> {name} || break; done) "
                f">/dev/null 2>&1 & echo STARTED")
    assert res.status == 0 and "STARTED" in res.output, res.output


def wait_growing(path: pathlib.Path, least: int = 4 * BLOCK, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.stat().st_size >= least:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not grow to {least} bytes")


def vhostfs(share: pathlib.Path, sock: str, log: pathlib.Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "vhostfs", "--socket-path", sock, "--shared-dir", str(share),
            "--tag", "vhostfs", "--keep-listening", *extra]
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=f, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
    end = time.monotonic() + 30
    while not unix_socket_listening(sock):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < end, "vhostfs did not listen"
        time.sleep(0.02)
    return proc


def session_on(share: pathlib.Path, sock: str) -> GuestSession:
    """A guest session against an already running backend listening on ``sock``."""
    runner = GuestRunner(share, backend='sh -c "sleep 3600" {socket}',  # placeholder process
                         kernel=os.environ.get("VHOSTFS_GUEST_KERNEL"), boot_timeout=180,
                         timeout=600)
    sess = GuestSession(runner, mode="session")
    sess.socket = sock
    return sess


def test_faults_keep_acknowledged_data(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    expect: dict[str, bytes] = {}

    # 1. QEMU killed mid-write (the runner's vhostfs, default sandbox) ---------------------
    with make_runner(share).session() as g:
        expect["a"] = write_synced(g, share, "a")
        start_writer(g, "b")
        wait_growing(share / "b")
        g.kill_qemu()
        status = g.wait_backend(30)
    assert status == 0, "vhostfs did not exit cleanly when QEMU died"
    assert (share / "a").read_bytes() == expect["a"]
    check_whole_blocks(share / "b", partial_ok=True)

    sock = str(tmp_path / "vu.sock")
    log = tmp_path / "vhostfs.log"

    # 2. vhostfs SIGKILLed mid-write ---------------------------------------------------------
    v1 = vhostfs(share, sock, log, "--sandbox", "chroot", "--seccomp", "kill")
    try:
        with session_on(share, sock) as g:
            expect["c"] = write_synced(g, share, "c")
            start_writer(g, "d")
            wait_growing(share / "d")
            os.killpg(v1.pid, signal.SIGKILL)
            v1.wait(10)
            g.kill()
    finally:
        if v1.poll() is None:
            os.killpg(v1.pid, signal.SIGKILL)
    assert (share / "c").read_bytes() == expect["c"]
    check_whole_blocks(share / "d", partial_ok=True)
    assert (share / "a").read_bytes() == expect["a"]

    # 3. a new vhostfs, --keep-listening; guest powered off mid-write ----------------------
    if os.path.exists(sock):
        os.unlink(sock)       # SIGKILL left the socket file behind (listen() replaces it too)
    v2 = vhostfs(share, sock, log, "--sandbox", "namespace", "--seccomp", "kill")
    try:
        sess = session_on(share, sock)
        with pytest.raises(GuestError):
            with sess as g:
                sums = g.run("sha256sum a c").output
                assert hashlib.sha256(expect["a"]).hexdigest() in sums, sums
                assert hashlib.sha256(expect["c"]).hexdigest() in sums, sums
                expect["e"] = write_synced(g, share, "e")
                start_writer(g, "f")
                wait_growing(share / "f")
                g.run("echo o > /proc/sysrq-trigger", timeout=30)   # power off, no sync
        sess.kill()
        assert (share / "e").read_bytes() == expect["e"]
        check_whole_blocks(share / "f", partial_ok=True)
        time.sleep(0.5)
        assert v2.poll() is None, "vhostfs --keep-listening exited:\n" + log.read_text()[-3000:]
        assert unix_socket_listening(sock)

        # 4. the next boot on the same vhostfs; SIGTERM while the guest writes -------------
        sess = session_on(share, sock)
        with sess as g:
            sums = g.run("sha256sum a c e").output
            for name in "ace":
                assert hashlib.sha256(expect[name]).hexdigest() in sums, sums
            start_writer(g, "h")
            wait_growing(share / "h")
            v2.send_signal(signal.SIGTERM)
            assert v2.wait(30) == 0, log.read_text()[-3000:]
            g.kill()
        # every request that reached vhostfs was finished: only whole 64 KiB writes
        n = check_whole_blocks(share / "h", partial_ok=False)
        assert n >= 4
        for name in "ace":
            assert (share / name).read_bytes() == expect[name]
        text = log.read_text()
        assert text.count("frontend connected") >= 3, text[-3000:]
        assert "waiting for the next one (--keep-listening)" in text
        assert "terminating on signal" in text
    finally:
        if v2.poll() is None:
            os.killpg(v2.pid, signal.SIGKILL)
