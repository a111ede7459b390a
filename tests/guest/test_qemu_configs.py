"""qemu-configs/: the exact QEMU lines boot a guest that mounts the shares; the libvirt
pieces (domain XML, vhost-user descriptor) have the shape libvirt reads and produce a
command line vhostfs accepts.

One boot (TCG, ~5-10 s): guest-tcg.args + vhostfs-share.args + second-share.args +
multiqueue.args, two vhostfs processes with 2 request queues each.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from vhostfs import cli
from vhostfs.guestrun import GuestRunner, qemu

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "qemu-configs"
QUEUES = 2


def _wait_listening(path: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    import time
    from vhostfs.guestrun.runner import unix_socket_listening
    end = time.monotonic() + timeout
    while not unix_socket_listening(path):
        assert proc.poll() is None, f"second backend exited: {proc.returncode}"
        assert time.monotonic() < end, "second backend did not listen"
        time.sleep(0.02)


@pytest.mark.guest
def test_two_shares_multiqueue_from_the_config_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    share1, share2 = tmp_path / "one", tmp_path / "two"
    share1.mkdir()
    share2.mkdir()
    (share1 / "a.txt").write_text("first share\n")
    (share2 / "b.txt").write_text("second share\n")
    sock2 = str(tmp_path / "second.sock")
    log2 = tmp_path / "second.log"
    values = {"SOCKET2": sock2, "TAG2": "data", "QUEUE_SIZE": "1024",
              "REQUEST_QUEUES": str(QUEUES)}
    extra = (qemu.read_args(CONFIGS / "second-share.args", values)
             + qemu.read_args(CONFIGS / "multiqueue.args", values))
    backend1 = [sys.executable, "-m", "vhostfs", "--socket-path", "{socket}", "--shared-dir",
                "{shared_dir}", "--tag", "{tag}", "--num-request-queues", str(QUEUES),
                "--log-level", "debug"]
    with open(log2, "wb") as out:
        second = subprocess.Popen(
            [sys.executable, "-m", "vhostfs", "--socket-path", sock2, "--shared-dir", str(share2),
             "--num-request-queues", str(QUEUES), "--log-level", "debug"],
            stdout=out, stderr=out, start_new_session=True)
    try:
        _wait_listening(sock2, second)
        runner = GuestRunner(share1, backend=backend1, extra_qemu=extra, boot_timeout=180,
                             timeout=300)
        res = runner.run(
            "cat /mnt/a.txt\n"
            "mkdir -p /mnt2 && mount -t virtiofs data /mnt2\n"
            "cat /mnt2/b.txt\n"
            "echo from-guest > /mnt2/c.txt\n"
            "grep -c virtiofs /proc/mounts\n"
            "umount /mnt2\n")
        assert res.status == 0, res.output
        assert res.output.splitlines() == ["first share", "second share", "2"], res.output
        assert (share2 / "c.txt").read_text() == "from-guest\n"
        assert res.shutdown.backend_status == 0 and res.shutdown.qemu_status == 0, res.shutdown
        assert second.wait(30) == 0          # the second backend exits when QEMU goes away
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    # Both processes saw 1 + QUEUES queues started by QEMU: hiprio and the request queues.
    text2 = log2.read_text(errors="replace")
    for q in range(1 + QUEUES):
        assert f"queue={q}" in text2, f"queue {q} never started on the second share:\n{text2[-3000:]}"
    assert "Traceback" not in text2


def test_args_files_have_every_placeholder_documented():
    """Each ${NAME} used in an args file is one the runner or the file's header provides."""
    import re
    runner_values = {"KERNEL", "INITRD", "APPEND", "SOCKET", "TAG", "MEMORY", "SMP", "QUEUE_SIZE"}
    for path in sorted(CONFIGS.glob("*.args")):
        text = path.read_text()
        lines = [l for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
        used = set(re.findall(r"\$\{(\w+)\}", "\n".join(lines)))
        header = "\n".join(l for l in text.splitlines() if l.lstrip().startswith("#"))
        for name in used - runner_values:
            assert "${" + name + "}" in header, f"{path.name}: ${{{name}}} not explained"


def test_vhost_user_descriptor_json():
    """qemu-configs/50-vhostfs.json: QEMU's docs/interop/vhost-user.json schema."""
    desc = json.loads((CONFIGS / "50-vhostfs.json").read_text())
    assert set(desc) <= {"description", "type", "binary", "tags"}
    assert desc["type"] == "fs"
    assert os.path.isabs(desc["binary"])
    assert desc["binary"] == "/usr/local/bin/vhostfs"     # where `pip install` puts the entry point
    assert isinstance(desc["description"], str)


def test_libvirt_domain_snippet():
    root = ET.parse(CONFIGS / "libvirt-domain.xml").getroot()
    assert root.tag == "domain"
    mb = root.find("memoryBacking")
    assert mb.find("source").get("type") == "memfd"
    assert mb.find("access").get("mode") == "shared"
    filesystems = root.findall("devices/filesystem")
    assert len(filesystems) == 2
    desc = json.loads((CONFIGS / "50-vhostfs.json").read_text())
    for fs in filesystems:
        assert fs.get("type") == "mount" and fs.get("accessmode") == "passthrough"
        assert fs.find("driver").get("type") == "virtiofs"
        assert fs.find("binary").get("path") == desc["binary"]
        assert fs.find("source").get("dir").startswith("/")
        assert fs.find("target").get("dir")


def test_libvirt_command_lines_are_accepted(monkeypatch, tmp_path):
    """What libvirt runs for each <filesystem> (qemuVirtioFSBuildCommandLine) parses."""
    root = ET.parse(CONFIGS / "libvirt-domain.xml").getroot()
    for fs in root.findall("devices/filesystem"):
        binary = fs.find("binary")
        opts = [f"source={tmp_path}"]
        cache = binary.find("cache")
        if cache is not None:
            opts.append(f"cache={cache.get('mode')}")
        if binary.get("xattr") in ("on", "off"):
            opts.append("xattr" if binary.get("xattr") == "on" else "no_xattr")
        argv = ["--fd=3", "-o", ",".join(opts)]
        pool = binary.find("thread_pool")
        if pool is not None:
            argv.append(f"--thread-pool-size={pool.get('size')}")
        captured = []
        monkeypatch.setattr(cli, "serve", lambda c: captured.append(c) or 0)
        from click.testing import CliRunner
        res = CliRunner().invoke(cli.main, argv)
        assert res.exit_code == 0, (argv, res.output)
        assert captured[0].fd == 3 and captured[0].shared_dir == str(tmp_path)
