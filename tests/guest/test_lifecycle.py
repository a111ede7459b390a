"""Backend and guest lifecycle: clean shutdown, QEMU killed, the CLI's exit statuses."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.guest


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killing_qemu_makes_the_backend_exit_cleanly(tmp_path, runner_factory, guest_backend):
    session = runner_factory(tmp_path).session()
    with session:
        assert session.run("echo ok > f && cat f").output == "ok\n"
        backend = session.backend
        session.kill_qemu()
        status = session.wait_backend(20)
        log = session.backend_log.read_text(errors="replace")
        assert status == 0, f"backend status {status} after QEMU was killed; log:\n{log}"
        assert "Traceback" not in log, log
        if guest_backend == "vhostfs":
            assert "disconnect" in log.lower(), f"no log line about the frontend leaving:\n{log}"
        assert not _group_alive(backend.pid), "the backend left processes behind"
        session.kill()
    assert (tmp_path / "f").read_text() == "ok\n"


def test_clean_shutdown_after_a_session(tmp_path, runner_factory):
    session = runner_factory(tmp_path).session()
    with session:
        session.run("echo bye > f")
    assert session.shutdown is not None
    assert (session.shutdown.umount_status, session.shutdown.qemu_status,
            session.shutdown.backend_status) == (0, 0, 0)
    assert not _group_alive(session.backend.pid) and not _group_alive(session.qemu.pid)


def _cli(*args, timeout=300):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "vhostfs.guestrun", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_streams_output_and_returns_the_status(tmp_path):
    (tmp_path / "in").write_text("input\n")
    res = _cli("--share", str(tmp_path), "--", "cat in; echo out > out; exit 3")
    assert res.returncode == 3, res.stderr
    assert res.stdout == "input\n", res.stdout
    assert "backend log:" in res.stderr
    assert (tmp_path / "out").read_text() == "out\n"
    res = _cli("--share", str(tmp_path), "--", "sha256sum", "in")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[1] == "in"


def test_cli_timeout_kills_everything(tmp_path):
    res = _cli("--share", str(tmp_path), "--timeout", "20", "--", "touch started; sleep 600")
    assert res.returncode == 124, res.stderr
    assert "timeout" in res.stderr
    assert (tmp_path / "started").exists(), "the timeout hit during the boot, not the command"
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert left == "", f"processes left behind: {left}"


def test_cli_sigterm_kills_everything(tmp_path):
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "vhostfs.guestrun", "--share", str(tmp_path), "--",
                             "touch started; sleep 600"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline, "guest never started the command"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert left == "", f"processes left behind: {left}"
