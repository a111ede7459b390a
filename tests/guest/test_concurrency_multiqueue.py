"""Multiqueue with a real QEMU: the guest's vhost-user-fs-pci device asks for 4 request
queues (``-global vhost-user-fs-pci.num-request-queues=4``); vhostfs, configured for 4,
accepts it, QEMU starts all 5 rings (hiprio + 4) and each gets its own queue thread and
pool.  A Linux 6.1 guest creates the 4 request virtqueues but sends every request on
the first one (spreading per CPU arrived in 6.11), so the traffic check is that the
share works; the other queues are exercised by tests/integration/test_stress*.py.

This test boots a guest of its own (the backend is configured differently from the
shared session's).
"""
from __future__ import annotations

import os
import re
import sys

import pytest

from vhostfs.guestrun import GuestRunner

pytestmark = pytest.mark.guest

QUEUES = 4
# Started through the library, not the CLI: the daemon under test with 4 request queues.
BACKEND = [sys.executable, "-c",
           "import sys; from vhostfs import log; from vhostfs.config import Config; "
           "from vhostfs.runtime.daemon import Daemon; log.configure('debug'); "
           "sys.exit(Daemon(Config(shared_dir=sys.argv[2], socket_path=sys.argv[1], "
           f"tag=sys.argv[3], num_request_queues={QUEUES}).validate()).run())",
           "{socket}", "{shared_dir}", "{tag}"]


@pytest.mark.skipif(os.environ.get("VHOSTFS_GUEST_BACKEND", "vhostfs") != "vhostfs",
                    reason="checks vhostfs's own multiqueue support")
def test_qemu_with_four_request_queues(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_text("multiqueue\n")
    runner = GuestRunner(share, backend=BACKEND, kernel=os.environ.get("VHOSTFS_GUEST_KERNEL"),
                         boot_timeout=180, timeout=300,
                         extra_qemu=["-global", f"vhost-user-fs-pci.num-request-queues={QUEUES}"])
    with runner.session() as g:
        res = g.run("set -e; cat hello; grep -c 'requests\\.' /proc/interrupts || true; "
                    "grep -o 'virtio[0-9]*-requests\\.[0-9]*' /proc/interrupts | sort -u; "
                    "mkdir d && for i in $(seq 1 50); do echo $i > d/f$i; done; cat d/f50",
                    timeout=120)
        assert res.status == 0, res.output
        log = res.backend_log.read_text() if res.backend_log else ""
    assert "multiqueue" in res.output and res.output.rstrip().endswith("50")
    # the guest driver set up one virtqueue (and MSI-X vector) per request queue
    vqs = set(re.findall(r"virtio\d+-requests\.(\d+)", res.output))
    assert vqs == {str(i) for i in range(QUEUES)}, res.output
    # QEMU started every ring; each request queue got a thread and a pool
    started = set(re.findall(r"queue started\s.*?queue=(\d+)", log))
    assert started == {str(i) for i in range(QUEUES + 1)}, log[-3000:]
    assert (share / "d" / "f50").read_text() == "50\n"
    assert g.shutdown is not None and g.shutdown.umount_status == 0 and g.shutdown.backend_status == 0, \
        g.shutdown
