"""Boot a small QEMU guest on a virtio-fs share served by vhostfs (or another backend).

See ``docs/guest-runner.md``.  Public API: ``GuestRunner``, ``GuestSession``, ``Result``,
``Shutdown``, ``GuestError``.
"""
from vhostfs.guestrun.runner import (GuestError, GuestRunner, GuestSession, GuestTimeout, Result,
                                     Shutdown)

__all__ = ["GuestError", "GuestTimeout", "GuestRunner", "GuestSession", "Result", "Shutdown"]
