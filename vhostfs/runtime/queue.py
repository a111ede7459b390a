"""One started virtqueue: its thread, its worker pool, its lock.

The queue thread waits on the kick eventfd (and a stop eventfd), pops every available
chain and hands each to the queue's worker pool (or serves it inline when the pool
size is 0).  Replies complete in any order; ``add_used`` and the notification decision
run under the queue lock so the used ring is written by one thread at a time
(virtio 1.2 §2.7.8: the used idx is a single producer index).
"""
from __future__ import annotations

import os
import select
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from vhostfs.errors import ChainError, GuestMemoryError, QueueBroken, VhostfsError, VirtqueueError
from vhostfs.log import get_logger
from vhostfs.virtqueue.iov import Reader, Writer

log = get_logger("vhostfs.queue")

# handle(reader, writer) -> bytes written into the device-writable part
Handler = Callable[[Reader, Writer], int]


class QueueRunner:
    """Serves one virtqueue until stopped."""

    def __init__(self, index: int, queue, kick_fd: int, call_fd: int | None,
                 handler: Handler, pool_size: int) -> None:
        self.index = index
        self.queue = queue
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.handler = handler
        self.lock = threading.Lock()
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.pool = ThreadPoolExecutor(pool_size, f"vq{index}-worker") if pool_size > 0 else None
        self.broken = False
        self._inflight = 0
        self._idle = threading.Condition(self.lock)
        self.thread = threading.Thread(target=self._run, name=f"vq{index}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # -- the queue thread -------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.kick_fd, select.POLLIN)
        poller.register(self.stop_fd, select.POLLIN)
        # Buffers made available before the kick fd was handed over are served at once
        # (vhost-user.rst "Starting and stopping rings": the back end must process the
        # ring from the base index once started).
        self._drain()
        while True:
            events = poller.poll()
            if any(fd == self.stop_fd for fd, _ in events):
                return
            for fd, ev in events:
                if fd == self.kick_fd:
                    if ev & (select.POLLERR | select.POLLNVAL | select.POLLHUP):
                        log.warning("kick fd failed; queue stops", queue=self.index)
                        return
                    try:
                        os.eventfd_read(self.kick_fd)
                    except BlockingIOError:
                        pass
            if not self.broken:
                self._drain()

    def _drain(self) -> None:
        """Pop until the ring is empty, with notifications re-enabled race-free.

        virtio 1.2 §2.7.10: re-enable notifications, then re-check the avail idx, so a
        buffer added between the last pop and the re-enable is not missed.
        """
        while True:
            with self.lock:
                self.queue.disable_notification()
            while self._pop_one():
                pass
            with self.lock:
                self.queue.enable_notification()
            if not self._pop_one():
                return

    def _pop_one(self) -> bool:
        with self.lock:
            if self.broken:
                return False
            try:
                chain = self.queue.pop()
            except ChainError as exc:
                log.warning("malformed descriptor chain dropped", queue=self.index,
                            head=exc.head if hasattr(exc, "head") else None, error=str(exc))
                head = getattr(exc, "head", None)
                if head is not None:
                    self._complete_locked(head, 0)
                return True
            except (QueueBroken, GuestMemoryError) as exc:
                self.broken = True
                log.error("virtqueue broken; no more requests served on it",
                          queue=self.index, error=str(exc))
                return False
            if chain is None:
                return False
            self._inflight += 1
        if self.pool is None:
            self._serve(chain)
        else:
            self.pool.submit(self._serve, chain)
        return True

    # -- workers ------------------------------------------------------------------------

    def _serve(self, chain) -> None:
        written = 0
        try:
            written = self.handler(Reader(chain.readable), Writer(chain.writable))
        except VhostfsError as exc:
            log.warning("request dropped", queue=self.index, head=chain.head, error=str(exc))
        except Exception:  # a worker never dies (architecture.md, "two error channels")
            log.exception("unexpected error serving a request", queue=self.index, head=chain.head)
        with self.lock:
            self._inflight -= 1
            self._complete_locked(chain.head, written)
            if self._inflight == 0:
                self._idle.notify_all()

    def _complete_locked(self, head: int, written: int) -> None:
        try:
            self.queue.add_used(head, written)
            if self.call_fd is not None and self.queue.needs_notification():
                os.eventfd_write(self.call_fd, 1)
        except (QueueBroken, GuestMemoryError) as exc:
            self.broken = True
            log.error("virtqueue broken while completing", queue=self.index, error=str(exc))

    # -- control from the vhost-user thread ----------------------------------------------

    def set_call_fd(self, call_fd: int | None) -> None:
        with self.lock:
            self.call_fd = call_fd

    def attach_memory(self, memory) -> None:
        """Re-resolve the ring addresses in a new memory table snapshot."""
        with self.lock:
            try:
                self.queue.attach(memory)
            except (GuestMemoryError, VirtqueueError) as exc:
                self.broken = True
                log.error("ring no longer inside guest memory", queue=self.index, error=str(exc))

    def stop(self) -> int:
        """Stop the thread, let in-flight requests complete, return last_avail_idx.

        vhost-user.rst "Starting and stopping rings": GET_VRING_BASE must return the
        index of the next descriptor to process, after every popped one has been used.
        """
        os.eventfd_write(self.stop_fd, 1)
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join()
        with self.lock:
            while self._inflight:
                self._idle.wait()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        os.close(self.stop_fd)
        return self.queue.last_avail_idx
