"""SIGTERM at any moment of start-up ends the whole daemon, sandbox child included.

In namespace mode the daemon forks (the child is PID 1 of a new PID namespace) and the
parent forwards signals.  These tests send SIGTERM at several moments after the socket
appears (during preload, around the fork, while the child waits in accept) and require
parent and child to be gone, with exit status 0.  The fork itself is now covered by
blocking the forwarded signals across it (vhostfs.sandbox._fork_with_forwarding); that
window is microseconds wide and these delays did not hit it on the code before the fix,
so they guard the start-up sequence as a whole rather than reproduce that race.
"""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the namespace sandbox needs root")


def start(tmp_path: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "vhostfs", "--shared-dir", str(tmp_path),
         "--socket-path", str(tmp_path / "s"), "--sandbox", "namespace", "--log-level", "error"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("delay", [0.0, 0.0005, 0.002, 0.005, 0.01, 0.03, 0.1, 0.3])
def test_sigterm_soon_after_listening_ends_parent_and_child(tmp_path, delay):
    proc = start(tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(tmp_path / "s"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "socket never appeared"
            time.sleep(0.0005)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        # communicate() returns only when every holder of the stdio pipes is gone: the
        # sandboxed child as well as the parent.
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
