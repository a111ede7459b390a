"""Command line: click options -> Config -> Daemon.

`vhostfs --socket-path PATH --shared-dir DIR [options]` serves a directory to one
vhost-user frontend (QEMU); `vhostfs guest-run ...` boots a throw-away guest on a share.

Every option of virtiofsd 1.13 is accepted under its own name (plus its legacy ``-o``
forms), so libvirt and scripts can use vhostfs in its place.  An option whose feature
vhostfs does not have fails, naming it ("--foo is not supported by vhostfs yet"); it is
never accepted and ignored.  Filesystem options are handed to ``PassthroughFs`` when it
has a parameter of that name (config.FS_OPTIONS).
"""
from __future__ import annotations

import grp
import inspect
import json
import os
import re
import resource
import signal
import sys

import click

from vhostfs import __version__
from vhostfs.config import (CACHE_POLICIES, FS_OPTIONS, INODE_FILE_HANDLES, LOG_FORMATS,
                            LOG_LEVELS, MAX_REQUEST_QUEUES, MIGRATION_MODES,
                            MIGRATION_ON_ERROR, SANDBOX_MODES, SECCOMP_ACTIONS, Config,
                            parse_size,
                            parse_compat, resolve_fs_options)
from vhostfs.errors import ConfigError
from vhostfs.guestrun.cli import guest_run

#: What ``--print-capabilities`` prints: the vhost-user.json "fs" backend capabilities
#: libvirt reads.  "separate-options": the long options (--shared-dir, --cache, ...) work.
#: "migrate-precopy": live migration through vhost-user DEVICE_STATE (vhostfs/migration).
CAPABILITIES = {"type": "fs", "features": ["migrate-precopy", "separate-options"]}

SECTIONS = ("Share and socket", "Filesystem", "Performance", "Logging and observability",
            "Sandbox and process", "Migration", "Legacy virtiofsd syntax", "Information")

#: Default soft RLIMIT_NOFILE target (virtiofsd's): each inode the guest knows holds an fd.
RLIMIT_NOFILE_TARGET = 1_000_000


class SectionOption(click.Option):
    """A click option that belongs to a section of ``--help``."""

    def __init__(self, *args, section: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.section = section


class SectionGroup(click.Group):
    """Help grouped by section, then the subcommands."""

    def format_options(self, ctx, formatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        missing = _unwired_options()
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None and param.name in missing:
                record = (record[0], record[1] + " [not supported by vhostfs yet]")
            if record is not None:
                groups.setdefault(getattr(param, "section", "Information"), []).append(record)
        for name in SECTIONS:
            if name in groups:
                with formatter.section(name):
                    formatter.write_dl(groups[name])
        self.format_commands(ctx, formatter)


def _opt(*decls, section: str, **kw):
    return click.option(*decls, cls=SectionOption, section=section, **kw)


def passthrough_parameters() -> frozenset[str]:
    """The keyword parameters ``PassthroughFs`` has (what filesystem options can reach)."""
    from vhostfs.fs.passthrough import PassthroughFs
    return frozenset(inspect.signature(PassthroughFs.__init__).parameters) - {"self", "shared_dir"}


def _unwired_options() -> set[str]:
    """Names of the filesystem options that PassthroughFs cannot honour yet (for --help)."""
    try:
        available = passthrough_parameters()
    except Exception:  # --help must work even if the filesystem cannot be imported
        return set()
    out = set()
    for name, kwarg in list(_FS_FLAGS.items()) + [("no_readdirplus", "readdirplus")]:
        opt = FS_OPTIONS[kwarg]
        asked = {"readdirplus": False, "inode_file_handles": "prefer"}.get(kwarg, True)
        if kwarg not in available and (opt.builtin != asked or isinstance(opt.builtin, tuple)):
            out.add(name)
    return out


def _print_capabilities(ctx, _param, value) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(json.dumps(CAPABILITIES, indent=2))
    ctx.exit(0)


S, F, P, L, X, M, C, I = SECTIONS  # noqa: E741 - short section names for the table below


@click.group(cls=SectionGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
# -- share and socket ----------------------------------------------------------------------
@_opt("--shared-dir", section=S, metavar="DIR", type=click.Path(file_okay=False),
      help="Host directory to share with the guest.")
@_opt("--tag", section=S, help="virtio-fs tag the guest mounts; answers GET_CONFIG (generic "
      "vhost-user devices need it; QEMU's vhost-user-fs-pci sets its own tag=).")
@_opt("--socket-path", section=S, metavar="PATH", type=click.Path(dir_okay=False),
      help="vhost-user socket to create and listen on (removed when the frontend connects).")
@_opt("--fd", section=S, type=int, metavar="FD",
      help="File descriptor of an already listening vhost-user socket (libvirt). Without "
      "--socket-path/--fd, a socket passed by systemd socket activation (LISTEN_FDS) is used.")
@_opt("--socket-group", section=S, metavar="GROUP",
      help="Group owning the --socket-path socket; the group may connect (mode g+rw).")
@_opt("--readonly", section=S, is_flag=True,
      help="Refuse every request that would modify the shared directory (EROFS).")
@_opt("--num-request-queues", section=S, type=click.IntRange(1, MAX_REQUEST_QUEUES), default=1,
      show_default=True, help="Request queues offered to the frontend (vhostfs option; QEMU's "
      "num-request-queues= must not exceed it).")
# -- filesystem ----------------------------------------------------------------------------
@_opt("--cache", section=F, type=click.Choice(CACHE_POLICIES), default="auto", show_default=True,
      help="Guest caching of metadata and data: never (no caching, direct I/O), metadata "
      "(attributes only), auto (1 s timeouts), always (long timeouts, keep page cache).")
@_opt("--xattr", section=F, is_flag=True, default=None, help="Enable extended attributes.")
@_opt("--posix-acl", section=F, is_flag=True, default=None,
      help="Enable POSIX ACLs (implies --xattr).")
@_opt("--xattrmap", section=F, metavar="RULES",
      help="Rules translating xattr names between guest and host (e.g. ':map::user.virtiofs.:').")
@_opt("--security-label", section=F, is_flag=True, default=None,
      help="Store the security label sent by the guest at file creation (implies --xattr).")
@_opt("--dax-window", section=F, metavar="SIZE", default=None,
      help="DAX cache window size (e.g. 64M; a multiple of 2 MiB): shared memory region 0 "
      "for guests mounting with -o dax (needs QEMU 11.1's vhost-user-test-device-pci).")
@_opt("--dax-shmem-bit", section=F, type=click.Choice(["21", "22"]), default="22", show_default=True,
      help="SHMEM protocol feature bit: 22 (QEMU 11.1, crosvm) or 21 (rust-vmm 0.16, alioth).")
@_opt("--dax-inode-min-size", section=F, metavar="SIZE", default="0", show_default=True,
      help="With -o dax=inode: files of at least SIZE bytes use DAX (FUSE_ATTR_DAX).")
@_opt("--killpriv-v2/--no-killpriv-v2", section=F, default=None,
      help="FUSE_HANDLE_KILLPRIV_V2: the host clears setuid bits and caps on write/chown "
      "[default: off].")
@_opt("--announce-submounts/--no-announce-submounts", section=F, default=None,
      help="Tell the guest which directories are mount points.")
@_opt("--inode-file-handles", section=F, type=click.Choice(INODE_FILE_HANDLES), metavar="MODE",
      help="Reference inodes by file handles instead of O_PATH fds: never, prefer, mandatory.")
@_opt("--allow-mmap", section=F, is_flag=True, default=None,
      help="With --cache never/metadata, still allow shared mmap in the guest.")
@_opt("--no-readdirplus", section=F, is_flag=True, default=None,
      help="Disable READDIRPLUS (readdir returns no attributes).")
@_opt("--writeback", section=F, is_flag=True, default=None, help="Enable the writeback cache.")
@_opt("--allow-direct-io", section=F, is_flag=True, default=None,
      help="Honour O_DIRECT from guest applications on the host.")
@_opt("--preserve-noatime", section=F, is_flag=True, default=None,
      help="Keep O_NOATIME from the guest (by default it is dropped: the host would refuse it "
      "with EPERM on files the daemon does not own).")
@_opt("--translate-uid", section=F, multiple=True, metavar="TYPE:SRC:DST:COUNT",
      help="Translate UIDs between guest and host (guest, host, squash-guest, squash-host, "
      "forbid-guest, map); repeatable.")
@_opt("--translate-gid", section=F, multiple=True, metavar="TYPE:SRC:DST:COUNT",
      help="Same as --translate-uid, for GIDs.")
# -- performance ---------------------------------------------------------------------------
@_opt("--thread-pool-size", section=P, type=int, default=4, show_default=True,
      help="Worker threads per request queue, for bulk (SETATTR, FALLOCATE, READDIR...) and "
           "large (> 128 KiB) requests; quick ones are served on the queue's own thread "
           "(0 = everything there).")
# -- logging -------------------------------------------------------------------------------
@_opt("--log-level", section=L, type=click.Choice(LOG_LEVELS), default="info", show_default=True,
      help="debug and trace add one line per vhost-user message and per FUSE request.")
@_opt("--log-format", section=L, type=click.Choice(LOG_FORMATS), default="console",
      show_default=True, help="console: human lines; json: one JSON object per line.")
@_opt("--syslog", section=L, is_flag=True, help="Log to syslog (facility daemon) instead of stderr.")
@_opt("-d", "debug", section=L, is_flag=True, help="Same as --log-level debug [deprecated].")
# -- sandbox and process -------------------------------------------------------------------
@_opt("--sandbox", section=X, type=click.Choice(SANDBOX_MODES), default=None,
      help="Isolation: namespace (new mount/pid/net namespaces, the share as root; the default "
      "as root), chroot (into the share), none (the default otherwise).")
@_opt("--seccomp", section=X, type=click.Choice(SECCOMP_ACTIONS), default="none",
      show_default=True, help="Action for a syscall outside the allow-list: kill, trap (the "
      "Python stacks on stderr, then SIGSYS), log (allowed, logged by the kernel), none.")
@_opt("--modcaps", section=X, metavar="CAPS",
      help="Adjust the kept capabilities, e.g. +sys_admin:-mknod (with --sandbox "
      "namespace|chroot, or alone).")
@_opt("--keep-listening", section=X, is_flag=True,
      help="After a frontend disconnects, wait for the next one (guest reboot, VMM restart).")
@_opt("--max-inodes", section=X, type=click.IntRange(2, None), default=1 << 20,
      show_default=True, help="Most inodes the guest may hold at once; beyond, new ones fail "
      "with ENFILE until it forgets some.")
@_opt("--uid-map", section=X, multiple=True, metavar=":NS:HOST:COUNT:",
      help="User namespace UID map for --sandbox namespace (not supported yet).")
@_opt("--gid-map", section=X, multiple=True, metavar=":NS:HOST:COUNT:",
      help="User namespace GID map for --sandbox namespace (not supported yet).")
@_opt("--rlimit-nofile", section=X, type=int, metavar="N",
      help="Set RLIMIT_NOFILE to N (0: leave it). Default: raise the soft limit to "
      "min(1000000, hard limit).")
# -- migration -----------------------------------------------------------------------------
@_opt("--migration-mode", section=M, type=click.Choice(MIGRATION_MODES), default=None,
      help="How the migration destination finds the guest's inodes again: find-paths (by "
      "path relative to the share; the default) or file-handles (by file handle: same "
      "filesystem, needs CAP_DAC_READ_SEARCH).")
@_opt("--migration-on-error", section=M, type=click.Choice(MIGRATION_ON_ERROR), default=None,
      help="When the destination cannot find an inode or handle again: abort (fail the "
      "migration, the source keeps running; the default) or guest-error (migrate, the guest "
      "gets errors on the lost objects).")
@_opt("--migration-verify-handles", section=M, is_flag=True, default=None,
      help="Live migration check (not supported yet).")
@_opt("--migration-confirm-paths", section=M, is_flag=True, default=None,
      help="Live migration check (not supported yet).")
# -- legacy syntax -------------------------------------------------------------------------
@_opt("-o", "compat_options", section=C, multiple=True, metavar="OPT[,OPT...]",
      help="virtiofsd's legacy options: source=DIR, cache=auto|always|none|metadata, "
      "loglevel=debug|info|warn|err, sandbox=, xattrmap=, modcaps=, [no_]xattr, "
      "[no_]readdirplus, [no_]writeback, [no_]allow_direct_io, announce_submounts, "
      "[no_]killpriv_v2, [no_]posix_acl, [no_]security_label, [no_]posix_lock, [no_]flock. "
      "They override the long options.")
@_opt("--socket", "socket_alias", section=C, metavar="PATH", type=click.Path(dir_okay=False),
      help="Same as --socket-path [deprecated].")
@_opt("-f", "foreground", section=C, is_flag=True,
      help="No effect: vhostfs always runs in the foreground [deprecated].")
# -- information ---------------------------------------------------------------------------
@_opt("--print-capabilities", section=I, is_flag=True, expose_value=False, is_eager=True,
      callback=_print_capabilities,
      help="Print the vhost-user.json backend capabilities (JSON, for libvirt) and exit.")
@click.version_option(__version__, "-V", "--version")
@click.pass_context
def main(ctx, **opts):
    """Serve a host directory to a QEMU guest as a virtio-fs device (vhost-user backend).

    Typical use: vhostfs --socket-path /run/vhostfs/share.sock --shared-dir /srv/share
    """
    if ctx.invoked_subcommand is not None:
        return
    try:
        config = build_config(opts)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(serve(config))


main.add_command(guest_run, "guest-run")


# -- options -> Config ----------------------------------------------------------------------

#: Options with no feature behind them yet: (flag, test on the parsed value).
_UNSUPPORTED = (
    ("--uid-map", bool),
    ("--gid-map", bool),
    ("--migration-verify-handles", bool),
    ("--migration-confirm-paths", bool),
)

#: long option name -> PassthroughFs parameter, for the filesystem options.
_FS_FLAGS = {
    "xattr": "xattr", "posix_acl": "posix_acl", "xattrmap": "xattrmap",
    "security_label": "security_label", "killpriv_v2": "killpriv_v2",
    "announce_submounts": "announce_submounts", "inode_file_handles": "inode_file_handles",
    "allow_mmap": "allow_mmap", "writeback": "writeback", "allow_direct_io": "allow_direct_io",
    "preserve_noatime": "preserve_noatime", "translate_uid": "translate_uid",
    "translate_gid": "translate_gid",
}


def build_config(opts: dict, *, available: frozenset[str] | None = None,
                 listen_fds=None) -> Config:
    """Parsed click options -> a validated Config (raises ConfigError naming the option).

    ``available``: PassthroughFs's parameters (default: introspected).  ``listen_fds``:
    callable returning the socket-activation fds (default: sdnotify.listen_fds).
    """
    o = dict(opts)
    compat = parse_compat(o.pop("compat_options", ()) or ())
    for name, value in compat.items():
        if name == "readdirplus":
            o["no_readdirplus"] = not value
        else:
            o[name] = value
    if o.pop("debug", False):
        o["log_level"] = "debug"
    o.pop("foreground", None)
    alias = o.pop("socket_alias", None)
    if alias is not None:
        if o.get("socket_path") not in (None, alias):
            raise ConfigError("--socket and --socket-path name different paths")
        o["socket_path"] = alias

    for flag, bad in _UNSUPPORTED:
        value = o.get(flag[2:].replace("-", "_"))
        if bad(value):
            shown = f"{flag} {value}" if flag in ("--sandbox", "--seccomp") else flag
            hint = {"--sandbox": " (vhostfs has no sandbox: --sandbox none)",
                    "--seccomp": " (vhostfs has no seccomp filter: --seccomp none)"}.get(flag, "")
            raise ConfigError(f"{shown} is not supported by vhostfs yet{hint}")

    if o.get("inode_file_handles") == "fallback":   # virtiofsd's deprecated alias
        o["inode_file_handles"] = "prefer"
    requested: dict[str, object] = {}
    for name, kwarg in _FS_FLAGS.items():
        value = o.get(name)
        if value is not None and value != ():
            requested[kwarg] = list(value) if isinstance(value, tuple) else value
    if o.get("posix_acl") or o.get("security_label"):
        requested.setdefault("xattr", True)          # "implies --xattr", as in virtiofsd
    if o.get("no_readdirplus") is not None:
        requested["readdirplus"] = not o["no_readdirplus"]
    for name in ("posix_lock", "flock"):             # only from -o [no_]posix_lock / [no_]flock
        if name in o:
            requested[name] = o[name]
    fs_options = resolve_fs_options(
        requested, passthrough_parameters() if available is None else available)

    shared_dir = o.get("shared_dir")
    if not shared_dir:
        raise ConfigError("--shared-dir (or -o source=DIR) is required")
    socket_path, fd = o.get("socket_path"), o.get("fd")
    fds = (listen_fds or _sd_listen_fds)()
    if socket_path is None and fd is None and fds:
        if len(fds) != 1:
            raise ConfigError(f"socket activation passed {len(fds)} sockets; vhostfs serves "
                              f"exactly one (one ListenStream= per .socket unit)")
        fd = fds[0]
    if o.get("socket_group") is not None:
        _group_id(o["socket_group"])                 # fail before listening
    return Config(
        shared_dir=os.path.abspath(shared_dir), socket_path=socket_path, fd=fd,
        tag=o.get("tag"), log_level=o.get("log_level", "info"),
        log_format=o.get("log_format", "console"), syslog=bool(o.get("syslog")),
        thread_pool_size=o.get("thread_pool_size", 4), cache=o.get("cache", "auto"),
        readonly=bool(o.get("readonly")), num_request_queues=o.get("num_request_queues", 1),
        socket_group=o.get("socket_group"), rlimit_nofile=o.get("rlimit_nofile"),
        fs_options=fs_options,
        sandbox=o.get("sandbox") or _default_sandbox(), seccomp=o.get("seccomp") or "none",
        modcaps=o.get("modcaps"), keep_listening=bool(o.get("keep_listening")),
        max_inodes=o.get("max_inodes") or (1 << 20),
        dax_window=parse_size(o["dax_window"]) if o.get("dax_window") else 0,
        dax_shmem_bit=int(o.get("dax_shmem_bit") or 22),
        dax_inode_min_size=parse_size(o.get("dax_inode_min_size") or "0"),
        migration_mode=o.get("migration_mode") or "find-paths",
        migration_on_error=o.get("migration_on_error") or "abort",
    ).validate()


def _default_sandbox() -> str:
    from vhostfs.sandbox import default_mode
    return default_mode()


def _sd_listen_fds() -> list[int]:
    from vhostfs import sdnotify
    return sdnotify.listen_fds()


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ConfigError(f"--socket-group: no group named {name!r}") from None


# -- running --------------------------------------------------------------------------------

def apply_rlimit_nofile(limit: int | None) -> tuple[int, int]:
    """Set RLIMIT_NOFILE as --rlimit-nofile says; returns the (soft, hard) now in force.

    None: raise the soft limit towards min(1000000, hard) (no privilege needed);
    0: leave it; N: soft = hard = N (raising the hard limit needs CAP_SYS_RESOURCE).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limit == 0:
        return soft, hard
    if limit is None:
        target = RLIMIT_NOFILE_TARGET if hard == resource.RLIM_INFINITY else min(RLIMIT_NOFILE_TARGET, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    else:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        except (ValueError, OSError) as exc:
            raise OSError(f"--rlimit-nofile {limit}: cannot set the limit (hard limit {hard}): "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _option_names(message: str) -> str:
    """A PassthroughFs message with its parameter names spelled as the options."""
    for kwarg, opt in FS_OPTIONS.items():
        if not opt.flag.startswith("-o "):
            message = re.sub(rf"\b{kwarg}\b", opt.flag.replace("--no-", "--"), message)
    return message


def serve(config: Config) -> int:
    """Run the daemon for ``config``: logging, limits, metrics, readiness; exit status."""
    from vhostfs import log, sdnotify
    from vhostfs.metrics import Metrics
    from vhostfs.runtime.daemon import Daemon

    level = config.log_level if config.log_level != "trace" else "debug"
    log.configure(level, config.log_format, syslog=config.syslog)
    logger = log.get_logger("vhostfs")
    if not os.path.isdir(config.shared_dir):
        click.echo(f"vhostfs: --shared-dir {config.shared_dir}: not a directory", err=True)
        return 1
    metrics = Metrics(trace=config.log_level in ("debug", "trace"))
    try:
        soft, hard = apply_rlimit_nofile(config.rlimit_nofile)
        logger.debug("file descriptor limit", soft=soft, hard=hard)
        daemon = Daemon(config)
    except OSError as exc:
        click.echo(f"vhostfs: {exc}", err=True)
        return 1
    except ValueError as exc:
        # PassthroughFs refuses a combination or value of its options it cannot honour.
        click.echo(f"vhostfs: {_option_names(str(exc))}", err=True)
        return 2
    daemon.server.observer = metrics.record

    def on_listening(listener) -> None:
        if config.socket_group is not None and config.socket_path:
            gid = _group_id(config.socket_group)
            os.chown(config.socket_path, -1, gid)
            os.chmod(config.socket_path, (os.stat(config.socket_path).st_mode & 0o777) | 0o060)
        where = config.socket_path or f"fd {config.fd}"
        sdnotify.notify("READY=1", f"STATUS=waiting for a vhost-user frontend on {where}")

    daemon.on_listening = on_listening
    previous = signal.signal(signal.SIGUSR1, lambda *_: metrics.dump("SIGUSR1"))
    try:
        status = daemon.run()
    except OSError as exc:
        # Set-up failures (socket path, shared dir, --fd) name the file at fault.
        click.echo(f"vhostfs: {exc}", err=True)
        status = 1
    finally:
        signal.signal(signal.SIGUSR1, previous)
        sdnotify.notify("STOPPING=1")
        metrics.dump("exit", skip_empty=True)
    return status
