"""Cancel tokens for blocking requests, and the registry FUSE_INTERRUPT goes through.

Every request the server says may block (``FuseServer.may_block``) runs on a dedicated
thread with a :class:`CancelToken` (the ``fs.api.Cancel`` protocol: ``fileno()`` is an
eventfd that becomes readable, ``is_set()``).  The token is registered under the key
``may_block`` returned (the FUSE unique) in the device-wide :class:`InterruptRegistry`,
because INTERRUPT arrives on the hiprio queue while its request sits on a request queue.
An INTERRUPT may also overtake its request (two queues, two threads): an unmatched key
is remembered (a bounded number of them) and cancels the request when it registers.
"""
from __future__ import annotations

import collections
import os
import threading

from vhostfs.log import get_logger

log = get_logger("vhostfs.cancel")

PENDING_MAX = 1024


class CancelToken:
    """Set once, from any thread; the eventfd stays open until ``close()``."""

    __slots__ = ("_fd", "_set", "_lock")

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._set = False
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._fd

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set = True
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class InterruptRegistry:
    """Blocking requests in flight, by the key INTERRUPT names (the FUSE unique)."""

    def __init__(self, pending_max: int = PENDING_MAX) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[int, list[CancelToken]] = {}
        self._pending: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._pending_max = pending_max

    def __len__(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._tokens.values())

    def register(self, key: int, token: CancelToken) -> None:
        with self._lock:
            self._tokens.setdefault(key, []).append(token)
            early = key in self._pending
            if early:
                del self._pending[key]
        if early:
            log.debug("request interrupted before it was served", unique=key)
            token.set()

    def unregister(self, key: int, token: CancelToken) -> None:
        with self._lock:
            tokens = self._tokens.get(key)
            if tokens is None:
                return
            try:
                tokens.remove(token)
            except ValueError:
                pass
            if not tokens:
                del self._tokens[key]

    def interrupt(self, key: int) -> bool:
        """Cancel the request(s) registered under ``key``; True if there was one.
        Otherwise remember ``key`` for a request that has not been popped yet."""
        with self._lock:
            tokens = list(self._tokens.get(key, ()))
            if not tokens:
                self._pending[key] = None
                self._pending.move_to_end(key)
                while len(self._pending) > self._pending_max:
                    self._pending.popitem(last=False)
        for token in tokens:
            token.set()
        log.debug("interrupt", unique=key, found=bool(tokens))
        return bool(tokens)
