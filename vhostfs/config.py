"""Daemon configuration: plain values and their validation, no I/O.

Option names follow virtiofsd (1.13) where the feature is the same; each error names
the option at fault.
"""
from __future__ import annotations

import dataclasses

from vhostfs.errors import ConfigError

CACHE_POLICIES = ("never", "metadata", "auto", "always")
LOG_LEVELS = ("error", "warn", "info", "debug", "trace", "off")
# The virtio-fs config space holds the tag in 36 bytes (virtio 1.2 §5.11.4).
TAG_MAX = 36
# GET_QUEUE_NUM limit we report; each request queue gets its own thread and pool.
MAX_REQUEST_QUEUES = 16


DAX_RANGE = 2 << 20                 # the guest's DAX range size (FUSE_DAX_SZ)
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
    thread_pool_size: int = 4
    cache: str = "auto"
    readonly: bool = False
    num_request_queues: int = 1
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

    def validate(self) -> "Config":
        if self.dax_window:
            if self.dax_window < 0 or self.dax_window % DAX_RANGE:
                raise ConfigError(f"--dax-window: must be a multiple of 2 MiB, got {self.dax_window}")
            if self.readonly:
                raise ConfigError("--dax-window cannot be used with --readonly (QEMU 11.1 does "
                                  "not enforce read-only mappings)")
        if self.dax_shmem_bit not in DAX_SHMEM_BITS:
            raise ConfigError(f"--dax-shmem-bit: expected 21 or 22, got {self.dax_shmem_bit}")
        if self.dax_inode_min_size < 0:
            raise ConfigError(f"--dax-inode-min-size: expected >= 0, got {self.dax_inode_min_size}")
        if (self.socket_path is None) == (self.fd is None):
            raise ConfigError("exactly one of --socket-path or --fd is required")
        if self.tag is not None:
            raw = self.tag.encode()
            if not raw or len(raw) > TAG_MAX or b"\0" in raw:
                raise ConfigError(f"--tag: must be 1..{TAG_MAX} bytes without NUL, got {self.tag!r}")
        if self.cache not in CACHE_POLICIES:
            raise ConfigError(f"--cache: expected one of {', '.join(CACHE_POLICIES)}, got {self.cache!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level: expected one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.thread_pool_size < 0 or self.thread_pool_size > 1024:
            raise ConfigError(f"--thread-pool-size: expected 0..1024, got {self.thread_pool_size}")
        if not 1 <= self.num_request_queues <= MAX_REQUEST_QUEUES:
            raise ConfigError(
                f"--num-request-queues: expected 1..{MAX_REQUEST_QUEUES}, got {self.num_request_queues}"
            )
        return self
