"""--sandbox namespace|chroot|none, the capability drop and --seccomp, for real.

Each case runs tests/unit/sandbox_child.py in a subprocess: it enters the sandbox the
way the daemon does (sandbox.apply), then attacks the share through the FUSE server
(the escape scenarios of test_passthrough_escape.py: symlinks out of the share, "..",
names with "/"), fills the inode table past --max-inodes, and reports JSON.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from vhostfs import sandbox
from vhostfs.config import Config
from vhostfs.errors import ConfigError
from vhostfs.sandbox import _libc, caps

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHILD = pathlib.Path(__file__).with_name("sandbox_child.py")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")
DEFAULT_MASK = sum(1 << caps.CAPS[n] for n in caps.DEFAULT_KEEP)


@pytest.fixture
def share(tmp_path):
    (tmp_path / "outside").write_bytes(b"SECRET")
    d = tmp_path / "share"
    d.mkdir()
    os.symlink(str(tmp_path / "outside"), d / "to_outside")
    os.symlink("/etc", d / "to_etc")
    return d


def run_child(mode, action, share, modcaps="-", extra="", user=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(CHILD), mode, action, str(share), modcaps, extra],
                          capture_output=True, text=True, timeout=60, env=env, user=user)


def last_json(res):
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert lines, (res.stdout, res.stderr)
    return json.loads(lines[-1])


def report(res):
    assert res.returncode == 0, res.stdout + res.stderr
    return last_json(res)


def test_modcaps_syntax():
    assert caps.parse_modcaps(None) == frozenset(caps.DEFAULT_KEEP)
    kept = caps.parse_modcaps("+sys_admin:-mknod:+CAP_LEASE")
    assert "sys_admin" in kept and "lease" in kept and "mknod" not in kept
    for bad in ("sys_admin", "+nosuchcap", "*chown"):
        with pytest.raises(ConfigError, match="--modcaps"):
            caps.parse_modcaps(bad)
    with pytest.raises(ConfigError, match="--modcaps"):
        Config(shared_dir="/", socket_path="s", modcaps="+bogus").validate()
    with pytest.raises(ConfigError, match="--sandbox"):
        Config(shared_dir="/", socket_path="s", sandbox="jail").validate()
    with pytest.raises(ConfigError, match="--seccomp"):
        Config(shared_dir="/", socket_path="s", seccomp="maybe").validate()
    with pytest.raises(ConfigError, match="--max-inodes"):
        Config(shared_dir="/", socket_path="s", max_inodes=1).validate()


def test_default_mode():
    assert sandbox.default_mode() == ("namespace" if os.geteuid() == 0 else "none")


@needs_root
@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_sandbox_confines_and_drops_privileges(mode, share):
    r = report(run_child(mode, "none", share, extra="unshare"))
    assert r["root"] == ["to_etc", "to_outside"]          # "/" is the share
    assert (r["pid"] == 1) == (mode == "namespace")        # PID 1 of its own namespace
    assert r["proc_self_fd"] == "."                        # re-opens via /proc's fd dir
    assert r["socket_path"] is None                        # host paths are not used inside
    for key in ("CapEff", "CapPrm", "CapBnd"):
        assert int(r["caps"][key], 16) == DEFAULT_MASK, (key, r["caps"])
    assert int(r["caps"]["CapAmb"], 16) == 0 and int(r["caps"]["CapInh"], 16) == 0
    assert r["caps"]["Groups"] == ""
    # the passthrough still works, and every escape attempt fails with an errno
    assert r["read_back"] == ["ok", "b'inside'"]
    assert r["dotdot"] == ["ok", "1"]
    assert r["open_symlink"] == ["errno", "ELOOP"]
    assert r["open_symlink_dir"] == ["errno", "ENOTDIR"]
    assert r["lookup_under_symlink"] == ["errno", "ENOTDIR"]
    assert r["lookup_slash"] == ["errno", "EINVAL"]
    # no capability left to undo the sandbox
    assert r["unshare"] == ["oserror", "EPERM"]
    assert r["mount"] == ["oserror", "EPERM"]
    assert (share / "created").read_bytes() == b"inside"
    # --max-inodes 64: root + 3 held, then 60 mkdirs, then ENFILE
    assert r["mkdir_ok"] == 60 and r["mkdir_results"] == ["ENFILE", "ok"] and r["inodes"] == 64


@needs_root
def test_sandbox_none_changes_nothing(share):
    r = report(run_child("none", "none", share))
    assert "to_etc" not in r["root"] and r["proc_self_fd"] == "/proc/self/fd"
    assert int(r["caps"]["CapEff"], 16) == _libc.capget()[0]
    assert r["open_symlink"] == ["errno", "ELOOP"]


@needs_root
def test_modcaps_adjusts_the_kept_set(share):
    r = report(run_child("chroot", "none", share, modcaps="+sys_admin:-mknod"))
    eff = int(r["caps"]["CapEff"], 16)
    assert eff == (DEFAULT_MASK | 1 << caps.CAPS["sys_admin"]) & ~(1 << caps.CAPS["mknod"])


@needs_root
@pytest.mark.parametrize("mode", ["namespace", "chroot", "none"])
def test_seccomp_kill_allows_serving_and_kills_on_execve(mode, share):
    res = run_child(mode, "kill", share, extra="exec")
    r = last_json(res)
    assert r["caps"]["Seccomp"] == "2" and r["caps"]["NoNewPrivs"] == "1"
    assert r["read_back"] == ["ok", "b'inside'"] and r["mkdir_ok"] == 60
    # execve is not on the allow-list: SIGSYS kills the (sandboxed) process
    if mode == "namespace":      # the parent outside reports 128 + SIGSYS
        assert res.returncode == 128 + signal.SIGSYS, res.stderr
        out = res.stdout + res.stderr
        assert "killed by a signal" in out and "SIGSYS" in out
    else:
        assert res.returncode == -signal.SIGSYS, res.stderr


@needs_root
def test_seccomp_trap_shows_the_call_then_dies(share):
    res = run_child("chroot", "trap", share, extra="exec")
    assert res.returncode == -signal.SIGSYS, res.stdout + res.stderr
    # faulthandler's dump: the Python line that made the call
    assert "Current thread" in res.stderr and 'sandbox_child.py", line' in res.stderr


@needs_root
def test_seccomp_log_allows(share, tmp_path):
    res = run_child("none", "log", share, extra="exec")
    assert res.returncode == 0, res.stderr               # execve ran /bin/true


@needs_root
def test_namespace_forbidden_names_the_alternatives(share):
    # without CAP_SYS_ADMIN the kernel refuses the namespaces: the error says what to
    # use instead
    code = ("import sys; from vhostfs import sandbox; from vhostfs.config import Config\n"
            "from vhostfs.sandbox import caps; caps.drop({'chown'})\n"
            "try:\n"
            f"    sandbox.enter(Config(shared_dir={str(share)!r}, socket_path='s', sandbox='namespace'))\n"
            "except OSError as e:\n"
            "    print(e); sys.exit(3)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 3, res.stderr
    assert "--sandbox namespace: the host does not allow" in res.stdout
    assert "--sandbox chroot or --sandbox none" in res.stdout


def test_namespace_forbidden_by_the_host(monkeypatch, share):
    def refuse(flags):
        raise OSError(1, "unshare: Operation not permitted")
    monkeypatch.setattr(_libc, "unshare", refuse)
    with pytest.raises(sandbox.SandboxError, match="--sandbox chroot or --sandbox none"):
        sandbox.enter(Config(shared_dir=str(share), socket_path="s", sandbox="namespace"))
