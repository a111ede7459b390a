"""The command line: every virtiofsd 1.13 option, the -o compat syntax, --help,
--print-capabilities, socket activation, and the "never accept and ignore" rule.

Parsing is tested through click (CliRunner) with ``serve`` replaced, so each case shows
the Config the daemon would get, or the exact error.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from vhostfs import cli
from vhostfs.config import FS_OPTIONS, Config, parse_compat, resolve_fs_options
from vhostfs.errors import ConfigError

REFERENCE = "/root/.cache/reference-virtiofsd/virtiofsd"
#: --sandbox/--seccomp/--modcaps are refused until vhostfs has a sandbox (issue 6).

#: Every option of `virtiofsd --help` (1.13), long and short.
VIRTIOFSD_OPTIONS = {
    "--shared-dir", "--tag", "--socket", "--socket-path", "--socket-group", "--fd",
    "--thread-pool-size", "--xattr", "--posix-acl", "--xattrmap", "--sandbox", "--readonly",
    "--seccomp", "--announce-submounts", "--no-announce-submounts", "--inode-file-handles",
    "--cache", "--allow-mmap", "--no-readdirplus", "--writeback", "--allow-direct-io",
    "--print-capabilities", "--modcaps", "--log-level", "--syslog", "--rlimit-nofile", "-o",
    "-d", "--no-killpriv-v2", "--killpriv-v2", "-f", "--security-label", "--uid-map",
    "--gid-map", "--translate-uid", "--translate-gid", "--preserve-noatime",
    "--migration-mode", "--migration-on-error", "--migration-verify-handles",
    "--migration-confirm-paths", "-h", "--help", "-V", "--version",
}


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    return str(d)


@pytest.fixture
def parse(monkeypatch):
    """parse(args, available=frozenset(), env=None) -> (exit_code, Config | None, output)."""
    def run(args, available=frozenset(), env=None):
        seen = []
        monkeypatch.setattr(cli, "serve", lambda config: seen.append(config) or 0)
        monkeypatch.setattr(cli, "passthrough_parameters", lambda: frozenset(available))
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            monkeypatch.delenv(name, raising=False)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        res = CliRunner().invoke(cli.main, args)
        if res.exception and not isinstance(res.exception, SystemExit):
            raise res.exception
        return res.exit_code, (seen[0] if seen else None), res.output
    return run


def ok(parse, args, **kw) -> Config:
    code, config, out = parse(args, **kw)
    assert code == 0 and config is not None, out
    return config


def fails(parse, args, message, **kw) -> None:
    code, config, out = parse(args, **kw)
    assert code == 2 and config is None, out
    assert message in out, out


# --- the option set -----------------------------------------------------------------------

def test_every_virtiofsd_option_exists():
    ctx = cli.main.make_context("vhostfs", ["--fd", "3"], resilient_parsing=True)
    ours = {d for p in cli.main.get_params(ctx) for d in (*p.opts, *p.secondary_opts)}
    assert VIRTIOFSD_OPTIONS <= ours, sorted(VIRTIOFSD_OPTIONS - ours)


@pytest.mark.skipif(not os.access(REFERENCE, os.X_OK), reason="reference virtiofsd not present")
def test_option_list_matches_reference_virtiofsd_help():
    text = subprocess.run([REFERENCE, "--help"], capture_output=True, text=True).stdout
    theirs = set()
    for short, long in re.findall(r"^ {2,6}(-[\w-]+)(?:, (--[\w-]+))?", text, re.M):
        theirs |= {short, long} - {""}
    assert len(theirs) > 40
    assert theirs == VIRTIOFSD_OPTIONS, (sorted(theirs - VIRTIOFSD_OPTIONS),
                                         sorted(VIRTIOFSD_OPTIONS - theirs))


def test_help_is_grouped_and_complete():
    out = CliRunner().invoke(cli.main, ["--help"]).output
    for section in cli.SECTIONS:
        assert f"{section}:" in out
    for opt in VIRTIOFSD_OPTIONS | {"--log-format", "--num-request-queues"}:
        assert opt in out, opt
    assert "guest-run" in out
    # Section order follows cli.SECTIONS.
    positions = [out.index(f"{s}:") for s in cli.SECTIONS]
    assert positions == sorted(positions)


def test_help_marks_options_passthrough_lacks(monkeypatch):
    monkeypatch.setattr(cli, "passthrough_parameters", lambda: frozenset({"xattr"}))
    ctx = cli.main.make_context("vhostfs", ["--fd", "3"], resilient_parsing=True,
                                terminal_width=400, max_content_width=400)
    out = cli.main.get_help(ctx)
    line = {l.split()[0]: l for l in out.splitlines() if l.strip().startswith("--")}
    assert "not supported" not in line["--xattr"]
    assert "not supported by vhostfs yet" in line["--writeback"]
    assert "not supported by vhostfs yet" in line["--preserve-noatime"]


# --- --print-capabilities -------------------------------------------------------------------

def test_print_capabilities_is_libvirt_json():
    res = subprocess.run([sys.executable, "-m", "vhostfs", "--print-capabilities"],
                         capture_output=True, text=True, cwd=os.path.dirname(cli.__file__) + "/..")
    assert res.returncode == 0 and res.stderr == ""
    caps = json.loads(res.stdout)
    # libvirt (qemuVhostUserFSLoadCapabilities) reads "type" and the "features" strings.
    assert caps["type"] == "fs"
    assert isinstance(caps["features"], list) and all(isinstance(f, str) for f in caps["features"])
    assert set(caps["features"]) <= {"migrate-precopy", "separate-options"}
    assert "migrate-precopy" in caps["features"]              # vhostfs/migration (DEVICE_STATE)


def test_print_capabilities_wins_over_other_options(parse):
    code, config, out = parse(["--print-capabilities", "--sandbox", "namespace"])
    assert code == 0 and config is None
    assert json.loads(out)["type"] == "fs"


@pytest.mark.skipif(not os.access(REFERENCE, os.X_OK), reason="reference virtiofsd not present")
def test_capabilities_shape_matches_reference():
    theirs = json.loads(subprocess.run([REFERENCE, "--print-capabilities"], capture_output=True,
                                       text=True).stdout)
    assert set(theirs) == set(cli.CAPABILITIES)
    assert set(cli.CAPABILITIES["features"]) <= set(theirs["features"])


# --- share and socket -----------------------------------------------------------------------

def test_minimal(parse, share):
    c = ok(parse, ["--shared-dir", share, "--socket-path", "/tmp/x.sock"])
    assert (c.shared_dir, c.socket_path, c.fd, c.cache, c.thread_pool_size) == \
        (share, "/tmp/x.sock", None, "auto", 4)
    assert c.fs_options == {} and c.tag is None and not c.readonly


def test_shared_dir_made_absolute(parse, share, monkeypatch):
    monkeypatch.chdir(os.path.dirname(share))
    assert ok(parse, ["--shared-dir", "share", "--fd", "3"]).shared_dir == share


def test_equals_forms(parse, share):
    c = ok(parse, [f"--shared-dir={share}", "--fd=7", "--thread-pool-size=0", "--cache=never",
                   "--tag=fs0", "--log-level=debug"])
    assert (c.fd, c.thread_pool_size, c.cache, c.tag, c.log_level) == (7, 0, "never", "fs0", "debug")


def test_socket_deprecated_alias(parse, share):
    assert ok(parse, ["--shared-dir", share, "--socket", "/tmp/a"]).socket_path == "/tmp/a"
    fails(parse, ["--shared-dir", share, "--socket", "/tmp/a", "--socket-path", "/tmp/b"],
          "--socket and --socket-path name different paths")


def test_socket_and_fd_exclusive(parse, share):
    fails(parse, ["--shared-dir", share, "--socket-path", "/tmp/a", "--fd", "3"],
          "exactly one of --socket-path, --fd or socket activation")
    fails(parse, ["--shared-dir", share], "exactly one of --socket-path, --fd")


def test_shared_dir_required(parse):
    fails(parse, ["--fd", "3"], "--shared-dir (or -o source=DIR) is required")


def test_tag_validated(parse, share):
    fails(parse, ["--shared-dir", share, "--fd", "3", "--tag", "x" * 37], "--tag: must be 1..36 bytes")


def test_socket_group(parse, share):
    import grp
    name = grp.getgrgid(os.getgid()).gr_name
    c = ok(parse, ["--shared-dir", share, "--socket-path", "/tmp/a", "--socket-group", name])
    assert c.socket_group == name
    fails(parse, ["--shared-dir", share, "--socket-path", "/tmp/a", "--socket-group",
                  "no-such-group-xyz"], "--socket-group: no group named 'no-such-group-xyz'")
    fails(parse, ["--shared-dir", share, "--fd", "3", "--socket-group", name],
          "--socket-group applies to --socket-path only")


def test_readonly_and_queues(parse, share):
    c = ok(parse, ["--shared-dir", share, "--fd", "3", "--readonly", "--num-request-queues", "4"])
    assert c.readonly and c.num_request_queues == 4
    code, _, out = parse(["--shared-dir", share, "--fd", "3", "--num-request-queues", "17"])
    assert code == 2 and "--num-request-queues" in out


def test_thread_pool_size(parse, share):
    assert ok(parse, ["--shared-dir", share, "--fd", "3", "--thread-pool-size", "16"]).thread_pool_size == 16
    fails(parse, ["--shared-dir", share, "--fd", "3", "--thread-pool-size", "-1"],
          "--thread-pool-size: expected 0..1024")


# --- socket activation ------------------------------------------------------------------------

def test_listen_fds_become_fd(parse, share):
    c = ok(parse, ["--shared-dir", share],
           env={"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "x"})
    assert c.fd == 3
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ


def test_listen_fds_for_another_pid_ignored(parse, share):
    fails(parse, ["--shared-dir", share], "exactly one of --socket-path, --fd",
          env={"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1)})


def test_listen_fds_two_sockets_refused(parse, share):
    fails(parse, ["--shared-dir", share], "socket activation passed 2 sockets",
          env={"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid())})


def test_explicit_socket_beats_listen_fds(parse, share):
    c = ok(parse, ["--shared-dir", share, "--socket-path", "/tmp/a"],
           env={"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid())})
    assert (c.socket_path, c.fd) == ("/tmp/a", None)


# --- logging ----------------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["error", "warn", "info", "debug", "trace", "off"])
def test_log_levels(parse, share, level):
    assert ok(parse, ["--shared-dir", share, "--fd", "3", "--log-level", level]).log_level == level


def test_log_format_syslog_and_d(parse, share):
    c = ok(parse, ["--shared-dir", share, "--fd", "3", "--log-format", "json", "--syslog", "-d"])
    assert (c.log_format, c.syslog, c.log_level) == ("json", True, "debug")
    fails(parse, ["--shared-dir", share, "--fd", "3", "--log-format", "xml"], "'xml' is not one of")


def test_f_is_accepted(parse, share):
    assert ok(parse, ["-f", "--shared-dir", share, "--fd", "3"]).fd == 3


# --- cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["auto", "always", "never", "metadata"])
def test_cache(parse, share, policy):
    assert ok(parse, ["--shared-dir", share, "--fd", "3", "--cache", policy]).cache == policy


# --- filesystem options: wired when PassthroughFs has them, refused otherwise ---------------

#: option argv -> (PassthroughFs parameter, value it gets)
FS_CASES = [
    (["--xattr"], "xattr", True),
    (["--posix-acl"], "posix_acl", True),
    (["--xattrmap", ":map::user.virtiofs.:"], "xattrmap", ":map::user.virtiofs.:"),
    (["--security-label"], "security_label", True),
    (["--killpriv-v2"], "killpriv_v2", True),
    (["--no-killpriv-v2"], "killpriv_v2", False),
    (["--announce-submounts"], "announce_submounts", True),
    (["--no-announce-submounts"], "announce_submounts", False),
    (["--inode-file-handles=prefer"], "inode_file_handles", "prefer"),
    (["--inode-file-handles=mandatory"], "inode_file_handles", "mandatory"),
    (["--inode-file-handles=never"], "inode_file_handles", "never"),
    (["--allow-mmap"], "allow_mmap", True),
    (["--no-readdirplus"], "readdirplus", False),
    (["--writeback"], "writeback", True),
    (["--allow-direct-io"], "allow_direct_io", True),
    (["--preserve-noatime"], "preserve_noatime", True),
    (["--translate-uid", "map:0:1000:1", "--translate-uid", "squash-guest:0:1000:65536"],
     "translate_uid", ["map:0:1000:1", "squash-guest:0:1000:65536"]),
    (["--translate-gid", "host:0:1000:1"], "translate_gid", ["host:0:1000:1"]),
]


@pytest.mark.parametrize("argv,kwarg,value", FS_CASES, ids=[" ".join(c[0]) for c in FS_CASES])
def test_fs_option_wired_when_passthrough_has_it(parse, share, argv, kwarg, value):
    c = ok(parse, ["--shared-dir", share, "--fd", "3", *argv], available={kwarg, "xattr"})
    assert c.fs_options[kwarg] == value


@pytest.mark.parametrize("argv,kwarg,value", FS_CASES, ids=[" ".join(c[0]) for c in FS_CASES])
def test_fs_option_without_passthrough_support(parse, share, argv, kwarg, value):
    code, config, out = parse(["--shared-dir", share, "--fd", "3", *argv], available=frozenset())
    if value == FS_OPTIONS[kwarg].builtin or (kwarg == "inode_file_handles" and value == "never"):
        # Asking for what vhostfs does anyway is honest: accepted, nothing passed.
        assert code == 0 and config.fs_options == {}, out
    else:
        assert code == 2 and config is None
        assert f"{argv[0].split('=')[0]}" in out and "is not supported by vhostfs yet" in out, out


def test_posix_acl_implies_xattr(parse, share):
    c = ok(parse, ["--shared-dir", share, "--fd", "3", "--posix-acl"], available={"posix_acl", "xattr"})
    assert c.fs_options == {"posix_acl": True, "xattr": True}


def test_fs_option_with_real_passthrough_signature(parse, share, monkeypatch):
    """Whatever PassthroughFs has today: each option is either passed or refused by name."""
    monkeypatch.undo()
    real = cli.passthrough_parameters()
    for argv, kwarg, value in FS_CASES:
        code, config, out = parse(["--shared-dir", share, "--fd", "3", *argv], available=real)
        if kwarg in real:
            assert code == 0 and config.fs_options[kwarg] == value, (argv, out)
        elif code == 0:
            assert kwarg not in config.fs_options
        else:
            assert "is not supported by vhostfs yet" in out, (argv, out)


# --- sandbox options -------------------------------------------------------------------------

@pytest.mark.parametrize("argv,field,value", [
    (["--sandbox", "namespace"], "sandbox", "namespace"),
    (["--sandbox", "chroot"], "sandbox", "chroot"),
    (["--sandbox", "none"], "sandbox", "none"),
    (["-o", "sandbox=chroot"], "sandbox", "chroot"),
    (["--seccomp", "kill"], "seccomp", "kill"),
    (["--seccomp", "log"], "seccomp", "log"),
    (["--seccomp", "trap"], "seccomp", "trap"),
    (["--modcaps=+sys_admin:-chown"], "modcaps", "+sys_admin:-chown"),
])
def test_sandbox_options_parsed_with_sandbox(parse, share, argv, field, value):
    assert getattr(ok(parse, ["--shared-dir", share, "--fd", "3", *argv]), field) == value


@pytest.mark.parametrize("argv,message", [
    (["--uid-map", ":0:100000:65536:"], "--uid-map is not supported by vhostfs yet"),
    (["--gid-map", ":0:100000:65536:"], "--gid-map is not supported by vhostfs yet"),
    (["--migration-verify-handles"], "--migration-verify-handles is not supported by vhostfs yet"),
    (["--migration-confirm-paths"], "--migration-confirm-paths is not supported by vhostfs yet"),
])
def test_unsupported_options_fail_by_name(parse, share, argv, message):
    fails(parse, ["--shared-dir", share, "--fd", "3", *argv], message)


def test_migration_options(parse, share):
    base = ["--shared-dir", share, "--fd", "3"]
    cfg = ok(parse, base)
    assert (cfg.migration_mode, cfg.migration_on_error) == ("find-paths", "abort")
    cfg = ok(parse, [*base, "--migration-mode", "file-handles", "--migration-on-error", "guest-error"])
    assert (cfg.migration_mode, cfg.migration_on_error) == ("file-handles", "guest-error")
    fails(parse, [*base, "--migration-mode", "by-magic"], "--migration-mode")


def test_sandbox_and_seccomp_none_accepted(parse, share):
    ok(parse, ["--shared-dir", share, "--fd", "3", "--sandbox", "none", "--seccomp", "none"])


def test_rlimit_nofile_parsed(parse, share):
    assert ok(parse, ["--shared-dir", share, "--fd", "3", "--rlimit-nofile", "0"]).rlimit_nofile == 0
    assert ok(parse, ["--shared-dir", share, "--fd", "3"]).rlimit_nofile is None
    fails(parse, ["--shared-dir", share, "--fd", "3", "--rlimit-nofile", "-5"], "--rlimit-nofile")


def test_unknown_options_fail(parse, share):
    fails(parse, ["--shared-dir", share, "--fd", "3", "--bogus"], "No such option '--bogus'")
    fails(parse, ["--shared-dir", share, "--fd", "3", "--sandbox", "jail"], "'jail' is not one of")
    fails(parse, ["--shared-dir", share, "--fd", "3", "--inode-file-handles=sometimes"],
          "'sometimes' is not one of")


# --- -o compat syntax ----------------------------------------------------------------------

def test_compat_source_cache_loglevel(parse):
    c = ok(parse, ["--fd=3", "-o", "source=/srv,cache=none", "-o", "loglevel=err"])
    assert (c.shared_dir, c.cache, c.log_level) == ("/srv", "never", "error")


@pytest.mark.parametrize("value,policy", [("auto", "auto"), ("always", "always"),
                                          ("none", "never"), ("metadata", "metadata")])
def test_compat_cache_values(value, policy):
    assert parse_compat([f"cache={value}"]) == {"cache": policy}


@pytest.mark.parametrize("value,level", [("debug", "debug"), ("info", "info"), ("warn", "warn"),
                                         ("err", "error")])
def test_compat_loglevel_values(value, level):
    assert parse_compat([f"loglevel={value}"]) == {"log_level": level}


@pytest.mark.parametrize("item,error", [
    ("cache=never", "-o cache: invalid value 'never'"),
    ("loglevel=trace", "-o loglevel: invalid value 'trace'"),
    ("sandbox=none", "-o sandbox: invalid value 'none'"),
    ("log_level=debug", "-o log_level=debug: unknown compat option"),
    ("bogus", "-o bogus: unknown compat option"),
    ("debug", "-o debug: unknown compat option"),
    ("source", "-o source: unknown compat option"),
    ("xattr=1", "-o xattr=1: unknown compat option"),
    ("source=", "-o source: empty value"),
])
def test_compat_errors(item, error):
    """The same items virtiofsd 1.13 refuses (checked against the binary by hand)."""
    with pytest.raises(ConfigError, match=error):
        parse_compat([item])


def test_compat_flags_all_known():
    flags = ["xattr", "no_xattr", "readdirplus", "no_readdirplus", "writeback", "no_writeback",
             "allow_direct_io", "no_allow_direct_io", "announce_submounts", "killpriv_v2",
             "no_killpriv_v2", "posix_acl", "no_posix_acl", "security_label",
             "no_security_label", "posix_lock", "no_posix_lock", "flock", "no_flock"]
    for flag in flags:
        (name, value), = parse_compat([flag]).items()
        assert value is (not flag.startswith("no_")), flag
    assert parse_compat(["xattr,no_xattr"]) == {"xattr": False}       # the last one wins


def test_compat_overrides_long_options(parse, share, tmp_path):
    c = ok(parse, ["--shared-dir", "/elsewhere", "--cache", "always", "--fd", "3",
                   "-o", f"source={share},cache=none"])
    assert (c.shared_dir, c.cache) == (share, "never")


def test_compat_fs_flags_wired(parse, share):
    c = ok(parse, ["--fd=3", "-o", f"source={share},xattr,writeback,no_readdirplus"],
           available={"xattr", "writeback", "readdirplus"})
    assert c.fs_options == {"xattr": True, "writeback": True, "readdirplus": False}


def test_compat_defaults_accepted_without_support(parse, share):
    """Asking for what vhostfs does anyway needs no PassthroughFs parameter."""
    c = ok(parse, ["--fd=3", "-o", f"source={share},no_xattr,readdirplus,flock,posix_lock"])
    assert c.fs_options == {}
    fails(parse, ["--fd=3", "-o", f"source={share},no_flock"], "-o no_flock is not supported")


def test_compat_locks_wired(parse, share):
    """What libvirt sends for <lock posix='on|off' flock='on|off'/>."""
    c = ok(parse, ["--fd=3", "-o", f"source={share},no_xattr,no_flock,posix_lock"],
           available={"xattr", "flock", "posix_lock"})
    assert c.fs_options == {"xattr": False, "flock": False, "posix_lock": True}


def test_compat_unsupported_flag_refused(parse, share):
    fails(parse, ["--fd=3", "-o", f"source={share},writeback"], "--writeback is not supported")
    fails(parse, ["--fd=3", "-o", f"source={share},no_readdirplus"], "--no-readdirplus is not supported")


def test_libvirt_command_line(parse, share):
    """The argv libvirt's qemuVirtioFSBuildCommandLine builds (cache, thread pool, debug)."""
    c = ok(parse, ["--fd=21", "-o", f"source={share},cache=always,no_xattr",
                   "--thread-pool-size=8", "-d"])
    assert (c.fd, c.shared_dir, c.cache, c.thread_pool_size, c.log_level) == \
        (21, share, "always", 8, "debug")


def test_resolve_fs_options_direct():
    assert resolve_fs_options({"writeback": True}, {"writeback"}) == {"writeback": True}
    assert resolve_fs_options({"writeback": False}, set()) == {}
    with pytest.raises(ConfigError, match="--writeback is not supported by vhostfs yet"):
        resolve_fs_options({"writeback": True}, set())
    with pytest.raises(ConfigError, match="--inode-file-handles=mandatory is not supported"):
        resolve_fs_options({"inode_file_handles": "mandatory"}, set())


# --- rlimit --------------------------------------------------------------------------------

def test_apply_rlimit_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        assert cli.apply_rlimit_nofile(0) == (soft, hard)
        now_soft, now_hard = cli.apply_rlimit_nofile(None)
        assert now_hard == hard and now_soft >= soft
        assert now_soft == (min(cli.RLIMIT_NOFILE_TARGET, hard)
                            if hard != resource.RLIM_INFINITY else cli.RLIMIT_NOFILE_TARGET) \
            or now_soft == soft
        if os.geteuid() != 0 and hard != resource.RLIM_INFINITY:
            with pytest.raises(OSError, match="--rlimit-nofile"):
                cli.apply_rlimit_nofile(hard + 1)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_guest_run_still_a_subcommand():
    out = CliRunner().invoke(cli.main, ["guest-run", "--help"]).output
    assert "--share" in out


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="no systemd")
def test_entry_point_module():
    res = subprocess.run([sys.executable, "-m", "vhostfs", "--version"], capture_output=True,
                         text=True, cwd=os.path.dirname(cli.__file__) + "/..")
    assert res.returncode == 0 and "version" in res.stdout


def test_every_fs_option_against_the_real_passthrough(tmp_path):
    """Each option, as the CLI hands it over, is either taken by today's PassthroughFs or
    refused with a message that names the option (never silently ignored)."""
    from vhostfs.fs.passthrough import PassthroughFs
    real = cli.passthrough_parameters()
    for argv, kwarg, value in FS_CASES:
        if kwarg not in real:
            continue
        try:
            fs = PassthroughFs(str(tmp_path), **{kwarg: value})
        except ValueError as exc:
            message = cli._option_names(str(exc))
            assert FS_OPTIONS[kwarg].flag.replace("--no-", "--") in message, (argv, message)
        else:
            fs.destroy()
