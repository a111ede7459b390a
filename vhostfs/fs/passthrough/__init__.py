"""Passthrough filesystem: serve a host directory with real syscalls."""
from vhostfs.fs.passthrough.filesystem import CachePolicy, PassthroughFs

__all__ = ["PassthroughFs", "CachePolicy"]
