"""systemd integration: the units pass `systemd-analyze verify`, their command line is one
vhostfs accepts, and socket activation works for real: `systemd-socket-activate` (the
LISTEN_FDS protocol systemd's .socket units speak) listens, QEMU connects, vhostfs is
exec'd on the listening fd, reports READY=1 over $NOTIFY_SOCKET, and the booted guest
mounts the share through it.

systemd itself is not PID 1 in this container, so the units are checked statically
(`systemd-analyze verify` / `security --offline`) and the protocol is exercised with
systemd's own activation tool.
"""
from __future__ import annotations

import configparser
import json
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

from vhostfs import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
ANALYZE = shutil.which("systemd-analyze")
ACTIVATE = shutil.which("systemd-socket-activate")


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str
    cp.read(UNITS / name)
    return cp


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory) -> pathlib.Path:
    """A root tree for `systemd-analyze --root`: the distribution's units, an executable at
    the ExecStart path (verify checks it exists), and our units in /etc/systemd/system."""
    root = tmp_path_factory.mktemp("sdroot")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    binary = root / "usr/local/bin/vhostfs"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in ("vhostfs@.service", "vhostfs@.socket"):
        shutil.copy(UNITS / unit, root / "etc/systemd/system" / unit)
    return root


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify(unit_root):
    res = subprocess.run([ANALYZE, "verify", f"--root={unit_root}", "vhostfs@share.service",
                          "vhostfs@share.socket"], capture_output=True, text=True)
    # verify only warns (status 0) about unknown keys or bad values: any output is a finding.
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stdout + res.stderr


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_verify_would_catch_a_bad_key(unit_root, tmp_path):
    """Control: the same check reports a misspelt directive."""
    bad = unit_root / "etc/systemd/system/vhostfs-bad@.service"
    bad.write_text((UNITS / "vhostfs@.service").read_text().replace("Restart=on-failure",
                                                                     "Restart=on-failur"))
    try:
        res = subprocess.run([ANALYZE, "verify", f"--root={unit_root}", "vhostfs-bad@x.service"],
                             capture_output=True, text=True)
    finally:
        bad.unlink()
    assert "on-failur" in res.stdout + res.stderr


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_hardening_exposure(unit_root):
    res = subprocess.run([ANALYZE, "security", "--offline=true", f"--root={unit_root}",
                          "vhostfs@share.service"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    line = [l for l in res.stdout.splitlines() if "Overall exposure level" in l][0]
    score = float(line.split(":")[1].split()[0])
    assert score <= 3.0, line          # measured 2.5 ("OK"); the default for a service is 9.6


def _all_values(name: str, key: str) -> list[str]:
    """Every value of a key that systemd accumulates over several lines."""
    return [line.split("=", 1)[1] for line in (UNITS / name).read_text().splitlines()
            if line.startswith(key + "=")]


def test_service_settings():
    svc, sock = _unit("vhostfs@.service"), _unit("vhostfs@.socket")
    s = svc["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["Restart"] == "on-failure"
    assert s["EnvironmentFile"] == "/etc/vhostfs/%i.conf"
    assert svc["Unit"]["Requires"] == "vhostfs@%i.socket"
    # What the daemon needs must stay allowed: per-thread setresuid/setgroups (@setuid is
    # in @system-service), unix sockets, its own credentials switching capabilities.
    allowed = " ".join(_all_values("vhostfs@.service", "SystemCallFilter")).split()
    assert allowed == ["@system-service", "open_by_handle_at", "seccomp"]
    assert s["RestrictAddressFamilies"] == "AF_UNIX"
    caps = set(s["CapabilityBoundingSet"].split())
    assert {"CAP_SETUID", "CAP_SETGID", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_CHOWN",
            "CAP_DAC_READ_SEARCH", "CAP_SETFCAP", "CAP_FSETID"} <= caps
    assert "CAP_SYS_ADMIN" not in caps
    assert "RestrictSUIDSGID" not in s        # the guest may chmod u+s its own files
    k = sock["Socket"]
    assert k["ListenStream"] == "%t/vhostfs/%i.sock" and k["Accept"] == "no"


def execstart_words(shared_dir: str) -> list[str]:
    """vhostfs@.service's ExecStart with /etc/vhostfs/NAME.conf (the example) substituted
    as systemd does: ${VAR} is one word, $VAR is split on white space."""
    env = {}
    for line in (UNITS / "vhostfs.conf.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    env["SHARED_DIR"] = shared_dir
    words = []
    for word in shlex.split(_unit("vhostfs@.service")["Service"]["ExecStart"]):
        if word.startswith("${") and word.endswith("}"):
            words.append(env[word[2:-1]])
        elif word.startswith("$"):
            words += env[word[1:]].split()
        else:
            words.append(word)
    return words


def test_execstart_with_the_example_conf_is_a_valid_command_line(monkeypatch, tmp_path):
    """The unit's command line parses and takes the socket from LISTEN_FDS."""
    words = execstart_words(str(tmp_path))
    assert words[0] == "/usr/local/bin/vhostfs"
    captured = []
    monkeypatch.setattr(cli, "serve", lambda c: captured.append(c) or 0)
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    from click.testing import CliRunner
    res = CliRunner().invoke(cli.main, words[1:])
    assert res.exit_code == 0, res.output
    assert captured[0].fd == 3 and captured[0].shared_dir == str(tmp_path)
    assert captured[0].log_format == "json"


@pytest.mark.guest
@pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate not installed")
def test_guest_mounts_through_socket_activation(tmp_path, monkeypatch):
    from vhostfs.guestrun import GuestRunner
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("activated\n")
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(1)
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path)       # inherited by the backend
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    # As vhostfs@.service runs it: no --socket-path/--fd, the socket arrives as LISTEN_FDS.
    # Exactly the unit's ExecStart (with the example conf), the installed entry point
    # replaced by this checkout; systemd-socket-activate gives the child a clean
    # environment: -E passes variables on.
    words = execstart_words("{shared_dir}")
    backend = [ACTIVATE, "--listen={socket}", "-E", "NOTIFY_SOCKET", "-E", "PYTHONPATH",
               sys.executable, "-m", "vhostfs", *words[1:]]
    try:
        res = GuestRunner(share, backend=backend, boot_timeout=180, timeout=300, keep=True).run(
            "cat /mnt/hello.txt && echo written > /mnt/out.txt && grep -c virtiofs /proc/mounts")
        log = res.backend_log.read_text(errors="replace")
        shutil.rmtree(res.backend_log.parent, ignore_errors=True)     # kept to read the log
        messages = []
        while True:
            try:
                messages.append(notify.recv(4096).decode())
            except (TimeoutError, socket.timeout):
                break
    finally:
        notify.close()
    assert res.status == 0, res.output
    assert res.output.splitlines() == ["activated", "1"]
    assert (share / "out.txt").read_text() == "written\n"
    assert res.shutdown.backend_status == 0 and res.shutdown.umount_status == 0, res.shutdown
    assert messages and messages[0].startswith("READY=1\nSTATUS=waiting for a vhost-user frontend on fd 3")
    assert "STOPPING=1" in messages
    assert "Communication attempt on fd 3" in log       # systemd-socket-activate's own line
    assert '"socket": "fd 3"' in log and "Traceback" not in log     # --log-format json
    stats = [json.loads(l) for l in log.splitlines() if '"fuse stats"' in l]
    assert stats and stats[-1]["reason"] == "exit" and stats[-1]["requests"] > 0
