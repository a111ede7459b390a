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

    def validate(self) -> "Config":
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
