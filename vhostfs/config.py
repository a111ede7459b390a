"""Daemon configuration: plain values and their validation, no I/O.

Option names follow virtiofsd (1.13) where the feature is the same; each error names
the option at fault.  This module also knows virtiofsd's legacy ``-o`` compat syntax
(:func:`parse_compat`) and which virtiofsd filesystem options map to which
``PassthroughFs`` parameter (:data:`FS_OPTIONS`, :func:`resolve_fs_options`).
"""
from __future__ import annotations

import dataclasses

from vhostfs.errors import ConfigError

CACHE_POLICIES = ("never", "metadata", "auto", "always")
LOG_LEVELS = ("error", "warn", "info", "debug", "trace", "off")
LOG_FORMATS = ("console", "json")
SANDBOX_MODES = ("namespace", "chroot", "none")
SECCOMP_ACTIONS = ("none", "kill", "log", "trap")
INODE_FILE_HANDLES = ("never", "prefer", "fallback", "mandatory")
MIGRATION_MODES = ("find-paths", "file-handles")
MIGRATION_ON_ERROR = ("abort", "guest-error")
# The virtio-fs config space holds the tag in 36 bytes (virtio 1.2 §5.11.4).
TAG_MAX = 36
# GET_QUEUE_NUM limit we report; each request queue gets its own thread and pool.
MAX_REQUEST_QUEUES = 16


DAX_RANGE = 2 << 20                 # the guest's DAX range size (FUSE_DAX_SZ)
# QEMU 11.1 turns every mapping into a vhost-user memory region (509 slots); a range takes
# up to two (docs/dax.md "Limits").
DAX_WINDOW_MAX = 500 << 20
DAX_SHMEM_BITS = (21, 22)
_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'64M', '1G', '2097152' (K/M/G/T binary suffixes, optional 'iB'/'B') -> bytes."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, suffix = (raw[:-1], raw[-1]) if raw and raw[-1] in _SIZE_SUFFIXES else (raw, "")
    if not number.isdigit():
        raise ConfigError(f"not a size: {text!r} (e.g. 64M, 1G)")
    return int(number) * _SIZE_SUFFIXES[suffix]


@dataclasses.dataclass(frozen=True)
class Config:
    shared_dir: str
    socket_path: str | None = None
    fd: int | None = None
    tag: str | None = None
    log_level: str = "info"
    log_format: str = "console"
    syslog: bool = False
    thread_pool_size: int = 4
    cache: str = "auto"
    readonly: bool = False
    num_request_queues: int = 1
    socket_group: str | None = None
    rlimit_nofile: int | None = None   # None: raise the soft limit to the hard one; 0: leave
    # Extra PassthroughFs keyword arguments (virtiofsd filesystem options that vhostfs
    # implements: the CLI fills it only with parameters PassthroughFs really has).
    fs_options: dict = dataclasses.field(default_factory=dict)
    # DAX cache window (docs/dax.md): 0 = none; else a multiple of 2 MiB, announced as
    # shared memory region 0 with the SHMEM protocol feature bit ``dax_shmem_bit``
    # (22: QEMU 11.1, crosvm; 21: rust-vmm vhost 0.16, alioth).  In -o dax=inode mounts,
    # regular files of at least ``dax_inode_min_size`` bytes get FUSE_ATTR_DAX.
    dax_window: int = 0
    dax_shmem_bit: int = 22
    dax_inode_min_size: int = 0
    # Sandbox, privileges and limits (vhostfs/sandbox, docs/hostile-inputs.md).  The
    # CLI defaults --sandbox to namespace when run as root; "none" here (library use).
    sandbox: str = "none"
    seccomp: str = "none"
    modcaps: str | None = None
    keep_listening: bool = False
    max_inodes: int = 1 << 20
    # Live migration (vhostfs/migration, virtiofsd's --migration-mode/--migration-on-error):
    # how the destination finds each inode again, and what a lost one does.
    migration_mode: str = "find-paths"
    migration_on_error: str = "abort"

    def validate(self) -> "Config":
        if self.dax_window:
            if self.dax_window < 0 or self.dax_window % DAX_RANGE:
                raise ConfigError(f"--dax-window: must be a multiple of 2 MiB, got {self.dax_window}")
            if self.dax_window > DAX_WINDOW_MAX:
                raise ConfigError(f"--dax-window: at most {DAX_WINDOW_MAX >> 20} MiB (each mapping is a "
                                  f"vhost-user memory slot in QEMU 11.1), got {self.dax_window}")
            if self.readonly:
                raise ConfigError("--dax-window cannot be used with --readonly (QEMU 11.1 does "
                                  "not enforce read-only mappings)")
            if self.tag is None:
                raise ConfigError("--dax-window needs --tag: the only QEMU device with a DAX window "
                                  "(vhost-user-test-device-pci) reads the tag from GET_CONFIG")
        if self.dax_shmem_bit not in DAX_SHMEM_BITS:
            raise ConfigError(f"--dax-shmem-bit: expected 21 or 22, got {self.dax_shmem_bit}")
        if self.dax_inode_min_size < 0:
            raise ConfigError(f"--dax-inode-min-size: expected >= 0, got {self.dax_inode_min_size}")
        if self.migration_mode not in MIGRATION_MODES:
            raise ConfigError(f"--migration-mode: expected one of {MIGRATION_MODES}, got {self.migration_mode!r}")
        if self.migration_on_error not in MIGRATION_ON_ERROR:
            raise ConfigError(f"--migration-on-error: expected one of {MIGRATION_ON_ERROR}, "
                              f"got {self.migration_on_error!r}")
        if (self.socket_path is None) == (self.fd is None):
            raise ConfigError("exactly one of --socket-path, --fd or socket activation "
                              "(LISTEN_FDS) is required")
        if self.socket_path is not None and not self.socket_path:
            raise ConfigError("--socket-path: empty path")
        if self.fd is not None and self.fd < 0:
            raise ConfigError(f"--fd: expected a file descriptor number >= 0, got {self.fd}")
        if self.socket_group is not None and self.fd is not None:
            raise ConfigError("--socket-group applies to --socket-path only (with --fd the "
                              "socket's creator sets its owner)")
        if self.tag is not None:
            raw = self.tag.encode()
            if not raw or len(raw) > TAG_MAX or b"\0" in raw:
                raise ConfigError(f"--tag: must be 1..{TAG_MAX} bytes without NUL, got {self.tag!r}")
        if self.cache not in CACHE_POLICIES:
            raise ConfigError(f"--cache: expected one of {', '.join(CACHE_POLICIES)}, got {self.cache!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level: expected one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format: expected one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if self.thread_pool_size < 0 or self.thread_pool_size > 1024:
            raise ConfigError(f"--thread-pool-size: expected 0..1024, got {self.thread_pool_size}")
        if not 1 <= self.num_request_queues <= MAX_REQUEST_QUEUES:
            raise ConfigError(
                f"--num-request-queues: expected 1..{MAX_REQUEST_QUEUES}, got {self.num_request_queues}"
            )
        if self.rlimit_nofile is not None and self.rlimit_nofile < 0:
            raise ConfigError(f"--rlimit-nofile: expected >= 0, got {self.rlimit_nofile}")
        if self.sandbox not in SANDBOX_MODES:
            raise ConfigError(f"--sandbox: expected one of {', '.join(SANDBOX_MODES)}, got {self.sandbox!r}")
        if self.seccomp not in SECCOMP_ACTIONS:
            raise ConfigError(f"--seccomp: expected one of {', '.join(SECCOMP_ACTIONS)}, got {self.seccomp!r}")
        if self.modcaps is not None:
            from vhostfs.sandbox.caps import parse_modcaps
            parse_modcaps(self.modcaps)
        if self.max_inodes < 2:
            raise ConfigError(f"--max-inodes: expected >= 2, got {self.max_inodes}")
        return self


# --- virtiofsd's legacy "-o a,b=c" options ---------------------------------------------

#: ``-o KEY=VALUE``: KEY -> (option name in :func:`parse_compat`'s result, allowed values
#: mapped to the long option's value; None = any value).  As virtiofsd 1.13 reads them.
_COMPAT_TUPLES: dict[str, tuple[str, dict[str, str] | None]] = {
    "source": ("shared_dir", None),
    "cache": ("cache", {"auto": "auto", "always": "always", "none": "never",
                        "metadata": "metadata"}),
    "loglevel": ("log_level", {"debug": "debug", "info": "info", "warn": "warn",
                               "err": "error"}),
    "sandbox": ("sandbox", {"namespace": "namespace", "chroot": "chroot"}),
    "xattrmap": ("xattrmap", None),
    "modcaps": ("modcaps", None),
}
#: ``-o FLAG``: FLAG -> (option name, value).
_COMPAT_FLAGS: dict[str, tuple[str, object]] = {
    "xattr": ("xattr", True), "no_xattr": ("xattr", False),
    "readdirplus": ("readdirplus", True), "no_readdirplus": ("readdirplus", False),
    "writeback": ("writeback", True), "no_writeback": ("writeback", False),
    "allow_direct_io": ("allow_direct_io", True), "no_allow_direct_io": ("allow_direct_io", False),
    "announce_submounts": ("announce_submounts", True),
    "killpriv_v2": ("killpriv_v2", True), "no_killpriv_v2": ("killpriv_v2", False),
    "posix_acl": ("posix_acl", True), "no_posix_acl": ("posix_acl", False),
    "security_label": ("security_label", True), "no_security_label": ("security_label", False),
    # virtiofsd 1.13 has no locks and accepts only the "no_" forms; libvirt sends both
    # forms (<lock posix= flock=>), and vhostfs has the locks: both are wired.
    "posix_lock": ("posix_lock", True), "no_posix_lock": ("posix_lock", False),
    "flock": ("flock", True), "no_flock": ("flock", False),
}


def parse_compat(values: list[str] | tuple[str, ...]) -> dict[str, object]:
    """``-o`` arguments (each a comma-separated list) -> {option name: value}.

    Later items win, as in virtiofsd.  Unknown items and values fail naming the item.
    """
    out: dict[str, object] = {}
    for line in values:
        for item in line.split(","):
            if "=" in item:
                key, _, value = item.partition("=")
                if key not in _COMPAT_TUPLES:
                    raise ConfigError(f"-o {item}: unknown compat option")
                name, allowed = _COMPAT_TUPLES[key]
                if allowed is not None:
                    if value not in allowed:
                        raise ConfigError(f"-o {key}: invalid value {value!r} (expected one of "
                                          f"{', '.join(allowed)})")
                    value = allowed[value]
                elif not value:
                    raise ConfigError(f"-o {key}: empty value")
                out[name] = value
            else:
                if item not in _COMPAT_FLAGS:
                    raise ConfigError(f"-o {item}: unknown compat option")
                name, flag = _COMPAT_FLAGS[item]
                out[name] = flag
    return out


# --- virtiofsd filesystem options -> PassthroughFs parameters ---------------------------

@dataclasses.dataclass(frozen=True)
class FsOption:
    """A virtiofsd option that configures the filesystem.

    ``kwarg`` is the ``PassthroughFs`` parameter that implements it.  ``builtin`` is what
    vhostfs does when PassthroughFs has no such parameter: asking for exactly that is
    honest and accepted; asking for anything else fails as not supported yet.
    """
    flag: str
    kwarg: str
    builtin: object


FS_OPTIONS: dict[str, FsOption] = {o.kwarg: o for o in (
    FsOption("--xattr", "xattr", False),
    FsOption("--posix-acl", "posix_acl", False),
    FsOption("--xattrmap", "xattrmap", None),
    FsOption("--security-label", "security_label", False),
    FsOption("--killpriv-v2", "killpriv_v2", False),
    FsOption("--announce-submounts", "announce_submounts", True),
    FsOption("--inode-file-handles", "inode_file_handles", "never"),
    FsOption("--allow-mmap", "allow_mmap", False),
    FsOption("--no-readdirplus", "readdirplus", True),
    FsOption("--writeback", "writeback", False),
    FsOption("--allow-direct-io", "allow_direct_io", False),
    FsOption("--preserve-noatime", "preserve_noatime", False),
    FsOption("--translate-uid", "translate_uid", ()),
    FsOption("--translate-gid", "translate_gid", ()),
    FsOption("-o posix_lock", "posix_lock", True),
    FsOption("-o flock", "flock", True),
)}


def resolve_fs_options(requested: dict[str, object], available: set[str] | frozenset[str],
                       builtin: dict[str, object] | None = None) -> dict[str, object]:
    """{PassthroughFs parameter: requested value} -> the keyword arguments to pass.

    ``available``: the parameters PassthroughFs really has.  ``builtin`` overrides
    :data:`FS_OPTIONS` builtins (tests).  A request PassthroughFs cannot honour raises
    ``ConfigError("--foo is not supported by vhostfs yet")``.
    """
    kwargs: dict[str, object] = {}
    for kwarg, value in requested.items():
        opt = FS_OPTIONS[kwarg]
        if kwarg in available:
            kwargs[kwarg] = value
            continue
        default = (builtin or {}).get(kwarg, opt.builtin)
        if _normal(value) != _normal(default):
            raise ConfigError(f"{_spelled(opt, value)} is not supported by vhostfs yet")
    return kwargs


def _normal(value: object) -> object:
    if value == "fallback":
        return "prefer"
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _spelled(opt: FsOption, value: object) -> str:
    if isinstance(value, bool):
        if opt.flag.startswith("-o "):
            return opt.flag if value else "-o no_" + opt.flag[3:]
        if opt.flag.startswith("--no-"):
            return opt.flag if value is False else "--" + opt.flag[5:]
        return opt.flag if value else "--no-" + opt.flag[2:]
    if isinstance(value, (list, tuple)):
        return opt.flag
    return f"{opt.flag}={value}"
