"""One started virtqueue: its thread, its worker pool, its dedicated workers, its lock.

The queue thread waits on the kick eventfd and a stop eventfd, pops every available
chain and routes it:

* a request the server says may block (``may_block(reader)`` returns a key, see
  ``fuse/blocking.py``) gets a dedicated thread of its own and a cancel token
  registered under that key, so a waiter never occupies a pool thread that the request
  releasing it needs (N+2 SETLKW waiters with a pool of N still let the unlock through);
* a request the server marks ``BULK`` (bounded, but its host work grows with the data or
  the directory: SETATTR, FALLOCATE, READDIRPLUS...) goes to the queue's bulk lane, one
  thread (their work is mostly Python: in parallel they only fight over the GIL);
* a chain carrying more than ``INLINE_MAX_BYTES`` (a 1 MiB READ/WRITE: its copy releases
  the GIL, so the pool runs several in parallel) goes to the queue's worker pool --
  except a large chain that is alone (the pool idle, nothing else in the ring: depth 1),
  served inline;
* every other request (quick: a syscall or two) is served inline on the queue thread,
  which then pops the next one.  This saves the pool handoff: two futex wake-ups and
  context switches, 12-21 µs of CPU per request, and GIL hand-overs between the queue
  thread and the workers that cost more than the request itself at depth 32 (measured
  in docs/performance.md §3 and §9).  The price is that a quick request that turns out
  slow on the host (an NFS-backed share) holds up the quick ones behind it on the same
  queue, as in virtiofsd's default (``--thread-pool-size 0``, everything on the queue
  thread); large, bulk and blocking requests never do.  The classification is made on
  the header copy the handler then serves (``FuseServer.may_block``), so a guest cannot
  rewrite a quick request into a waiting one in between.  With a pool size of 0 every
  non-blocking request is served inline.

Replies complete in any order.  ``add_used``, the notification decision (EVENT_IDX or
NO_INTERRUPT) and the call eventfd write all run under the queue lock, so the used ring
has one writer at a time (virtio 1.2 §2.7.8: the used idx is a single producer index),
and every popped chain is returned exactly once (``_finish``), on every path: handler
error, guest-memory error, thread start failure.  A reply served inline is notification-
checked at once when nothing else waits in the ring, else once per ``NOTIFY_BATCH``
inline replies (and when the ring runs empty or the queue stops): one wake-up of the
driver per batch instead of per reply at depth (§2.7.7.2 says when a notification may
be suppressed, not how soon it must follow).

Stopping (GET_VRING_BASE, reset, exit): the queue thread stops popping; blocking
requests are cancelled (their wait fails with EINTR: Linux turns that into
ERESTARTSYS for SETLKW, so the guest's syscall restarts); then ``stop`` waits until
every popped chain is in the used ring, and only then reports ``last_avail_idx``
(vhost-user.rst, "Starting and stopping rings").

Guest memory: a chain's buffers are memoryviews that keep their mmap alive, so a
memory-table change (``attach_memory``, under the queue lock) never unmaps memory a
worker is still using; the old snapshot goes when its last request finishes.
"""
from __future__ import annotations

import inspect
import os
import queue as _queue
import select
import threading
from typing import Callable

from vhostfs.errors import ChainError, GuestMemoryError, QueueBroken, VhostfsError, VirtqueueError
from vhostfs.fuse.blocking import BULK
from vhostfs.log import get_logger
from vhostfs.runtime.cancel import CancelToken, InterruptRegistry
from vhostfs.virtqueue import iov
from vhostfs.virtqueue.iov import Reader, Writer

log = get_logger("vhostfs.queue")

# handle(reader, writer[, cancel=token]) -> bytes written into the device-writable part
Handler = Callable[..., int]
# may_block(reader) -> key (an int >= 0: serve on a dedicated thread), BULK (serve on
# the pool) or None (quick: may be served inline)
MayBlock = Callable[[Reader], "int | None"]
# fast(chain) -> bytes written, or None: not served (FuseServer.serve_fast); tried first
# for every chain that may be served inline, while no dirty log is active (it writes
# guest memory without the Writer's page marking)
FastPath = Callable[[object], "int | None"]

#: Blocking requests in flight per queue before new ones are served on the pool with
#: an already-cancelled token (they then fail with EINTR instead of waiting).
MAX_DEDICATED = 1024

#: Largest chain (readable + writable bytes) served inline on the queue thread.
INLINE_MAX_BYTES = 128 * 1024

#: Inline completions published in the used ring before the notification decision is
#: made for them together (sooner when the ring runs empty).
NOTIFY_BATCH = 8


def _accepts_cancel(handler) -> bool:
    try:
        params = inspect.signature(handler).parameters
    except (TypeError, ValueError):
        return False
    return "cancel" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class WorkerPool:
    """``size`` threads serving ``fn(item)`` from one FIFO; a worker never dies."""

    def __init__(self, size: int, name: str, fn: Callable[[object], None]) -> None:
        self._fn = fn
        self._q: _queue.SimpleQueue = _queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(size)]
        for t in self._threads:
            t.start()

    def submit(self, item) -> None:
        self._q.put(item)

    def _run(self) -> None:
        fn, get = self._fn, self._q.get
        while True:
            item = get()
            if item is None:
                return
            try:
                fn(item)
            except BaseException:   # fn completes its chain itself; this is a last resort
                log.exception("worker error")

    def shutdown(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:
                t.join()


class QueueRunner:
    """Serves one virtqueue until stopped."""

    def __init__(self, index: int, queue, kick_fd: int, call_fd: int | None,
                 handler: Handler, pool_size: int, *, may_block: MayBlock | None = None,
                 interrupts: InterruptRegistry | None = None,
                 max_dedicated: int = MAX_DEDICATED, fast: FastPath | None = None) -> None:
        self.index = index
        self.queue = queue
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.handler = handler
        self.may_block = may_block
        self.fast = fast
        self.interrupts = interrupts
        self.max_dedicated = max_dedicated
        self._cancellable = _accepts_cancel(handler)
        self.lock = threading.Lock()
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.pool = WorkerPool(pool_size, f"vq{index}-worker", self._pooled) if pool_size > 0 else None
        # BULK requests are mostly Python (READDIRPLUS: a lookup per entry), so several of
        # them in parallel only fight over the GIL: 4 pool threads served READDIRPLUS
        # at 1,200 µs of CPU per request, one thread at 470 (docs/performance.md §9).
        # They get one thread of their own, and the pool keeps the large copies.
        self.lane = WorkerPool(1, f"vq{index}-bulk", self._pooled) if pool_size > 0 else None
        self.broken = False
        self.stopping = False
        self._inflight = 0
        self.served_inline = 0    # requests served inline on the queue thread (a statistic)
        self._call_owed = False   # a notification was due while call_fd was None
        self._unsignalled = 0     # inline completions used but not yet notification-checked
        self._pool_busy = 0       # items handed to the pool or the lane and not done yet
        self._dedicated: set[CancelToken] = set()
        self._idle = threading.Condition(self.lock)
        self.thread = threading.Thread(target=self._run, name=f"vq{index}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def inflight(self) -> int:
        with self.lock:
            return self._inflight

    @property
    def blocking_inflight(self) -> int:
        with self.lock:
            return len(self._dedicated)

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
                if self.broken:
                    return
                try:
                    self.queue.disable_notification()
                except (QueueBroken, GuestMemoryError) as exc:
                    self._break_locked("cannot disable notifications", exc)
                    return
            while self._pop_one():
                pass
            with self.lock:
                if self.broken:
                    return
                try:
                    self.queue.enable_notification()
                except (QueueBroken, GuestMemoryError) as exc:
                    self._break_locked("cannot enable notifications", exc)
                    return
            if not self._pop_one():
                return

    def _pop_one(self) -> bool:
        with self.lock:
            if self.broken or self.stopping:
                return False
            try:
                chain = self.queue.pop()
            except ChainError as exc:
                head = getattr(exc, "head", None)
                log.warning("malformed descriptor chain dropped", queue=self.index,
                            head=head, error=str(exc))
                if head is not None:
                    self._complete_locked(head, 0)
                return True
            except (QueueBroken, GuestMemoryError) as exc:
                self._break_locked("virtqueue broken; no more requests served on it", exc)
                return False
            if chain is None:
                if self._unsignalled:
                    self._notify_locked()
                return False
            self._inflight += 1
        self._dispatch(chain)
        return True

    def _dispatch(self, chain) -> None:
        small = chain.readable_len + chain.writable_len <= INLINE_MAX_BYTES
        if not small and self.pool is not None and self._alone():
            small = True   # nothing to pop behind it and an idle pool: skip the handoff
        if self.fast is not None and iov.dirty_log is None:
            if small or self.pool is None:
                if self._try_fast(chain, True):
                    return
            else:
                # A large READ/WRITE: its copy runs on a pool thread, which offers it to
                # the fast path first (a guest's 1 MiB chain of 257 page buffers: 176 ->
                # 86 µs of CPU, docs/performance.md §9) and routes it if declined.
                self._submit((chain, None, None, None), self.pool)
                return
        self._route(chain, small, False)

    def _alone(self) -> bool:
        """Whether a large chain may be served inline after all: the pool and the bulk
        lane are idle and no other chain waits in the ring, so its copy holds up nobody
        (at depth 1 the handoff is 12-21 µs of a 1 MiB request's ~200)."""
        if self._pool_busy:
            return False
        with self.lock:
            return not self._available_locked() and not self.broken

    def _submit(self, item, pool: WorkerPool) -> None:
        with self.lock:
            self._pool_busy += 1
        pool.submit(item)

    def _try_fast(self, chain, inline: bool) -> bool:
        """Offer ``chain`` to the fast path; True if it was served (and completed)."""
        try:
            written = self.fast(chain)
        except Exception:   # the general path meets the same problem and answers it
            log.exception("fast path failed; request served by the general path",
                          queue=self.index, head=chain.head)
            written = None
        if written is None:
            return False
        if inline and self.pool is not None:
            self.served_inline += 1
        self._finish(chain.head, written, None, inline)
        return True

    def _route(self, chain, small: bool, on_worker: bool) -> None:
        """The general path: classify (may_block) and serve ``chain`` on a dedicated
        thread, inline, or on the pool (``on_worker``: this is a pool thread already)."""
        # One Reader per request, over the views the walk already checked and summed;
        # may_block may keep what it decoded in reader.decoded for the handler (the
        # FUSE server keeps the in-header: decoded once, served from the same copy).
        reader = Reader(chain.readable, chain.readable_len)
        key = None
        if self.may_block is not None:
            try:
                key = self.may_block(reader)
            except Exception:   # the handler will meet the same problem and answer it
                key = None
            reader.rewind()
        if key is not None and key != BULK:
            self._start_dedicated(chain, reader, key)
        elif on_worker:
            self._serve((chain, reader, None, None))
        elif self.pool is None:
            self._serve((chain, reader, None, None), True)
        elif key is None and small:
            self.served_inline += 1
            self._serve((chain, reader, None, None), True)
        elif key == BULK:
            self._submit((chain, reader, None, None), self.lane)
        else:
            self._submit((chain, reader, None, None), self.pool)

    def _pooled(self, item) -> None:
        """A pool or bulk-lane thread's work: a routed request, or (reader None) a large
        chain to offer to the fast path first."""
        chain, reader = item[0], item[1]
        try:
            if reader is not None:
                self._serve(item)
            elif iov.dirty_log is not None or not self._try_fast(chain, False):
                self._route(chain, False, True)
        finally:
            with self.lock:
                self._pool_busy -= 1

    def _start_dedicated(self, chain, reader, key: int) -> None:
        token = CancelToken()
        with self.lock:
            over = len(self._dedicated) >= self.max_dedicated
            self._dedicated.add(token)
        if self.interrupts is not None:
            self.interrupts.register(key, token)
        if over:
            log.warning("too many blocking requests in flight; this one may not wait",
                        queue=self.index, limit=self.max_dedicated)
            token.set()
        elif self.stopping:
            token.set()
        try:
            threading.Thread(target=self._serve, args=((chain, reader, token, key),),
                             name=f"vq{self.index}-blocking", daemon=True).start()
            return
        except RuntimeError as exc:   # no thread left: answer now, without waiting
            log.error("cannot start a thread for a blocking request; it is not allowed to wait",
                      queue=self.index, error=str(exc))
        token.set()
        self._serve((chain, reader, token, key))

    # -- workers ------------------------------------------------------------------------

    def _serve(self, item, inline: bool = False) -> None:
        chain, reader, token, key = item
        written = 0
        try:
            writer = Writer(chain.writable, chain.writable_len)
            if token is not None and self._cancellable:
                written = self.handler(reader, writer, cancel=token)
            else:
                written = self.handler(reader, writer)
        except VhostfsError as exc:
            log.warning("request dropped", queue=self.index, head=chain.head, error=str(exc))
            written = 0
        except BaseException:  # a worker never dies (architecture.md, "two error channels")
            log.exception("unexpected error serving a request", queue=self.index, head=chain.head)
            written = 0
        finally:
            if token is not None:
                if self.interrupts is not None:
                    self.interrupts.unregister(key, token)
            self._finish(chain.head, written, token, inline)

    def _finish(self, head: int, written: int, token: CancelToken | None,
                inline: bool = False) -> None:
        if token is not None:
            # Closed before the request counts as finished: once stop() returns, no fd
            # of this queue's requests is still open (or about to be closed).
            token.close()
        with self.lock:
            if inline:
                # Served on the queue thread, which pops the next request at once: the
                # reply is in the used ring now; while more requests wait in the ring,
                # the notification decision waits for up to NOTIFY_BATCH completions,
                # so a driver busy refilling the ring is woken once per batch, not per
                # reply.  A lone request (depth 1) is notified at once.  virtio 1.2 §2.7.7.2 bounds when a notification may be sent,
                # not how soon; one check over the batch notifies if used_event lies
                # anywhere in it (vring_need_event over [old, new)).
                self._used_locked(head, written)
                self._unsignalled += 1
                if self._unsignalled >= NOTIFY_BATCH or not self._available_locked():
                    self._notify_locked()
            else:
                self._complete_locked(head, written)
            self._inflight -= 1
            if token is not None:
                self._dedicated.discard(token)
            if self._inflight == 0 and self.stopping:
                self._idle.notify_all()

    def _available_locked(self) -> bool:
        """Whether another chain waits in the ring (False when that cannot be told:
        then the notification is not held back)."""
        try:
            return self.queue.has_available()
        except (QueueBroken, GuestMemoryError):
            return False

    def _used_locked(self, head: int, written: int) -> None:
        if self.broken:
            return
        try:
            self.queue.add_used(head, written)
        except (QueueBroken, GuestMemoryError, ValueError) as exc:
            self._break_locked("virtqueue broken while completing", exc)

    def _complete_locked(self, head: int, written: int) -> None:
        self._used_locked(head, written)
        self._notify_locked()

    def _notify_locked(self) -> None:
        """Send the used-buffer notification if the driver asked for one over the
        completions since the last check (EVENT_IDX or NO_INTERRUPT, §2.7.7.2)."""
        self._unsignalled = 0
        if self.broken:
            return
        try:
            if self.queue.needs_notification():
                if self.call_fd is not None:
                    os.eventfd_write(self.call_fd, 1)
                else:
                    # No call fd yet (a ring may start on SET_VRING_ENABLE before its
                    # SET_VRING_CALL, or run with the fd cleared): the driver is owed
                    # this interrupt, and set_call_fd delivers it.  Dropping it would
                    # leave a driver that re-enabled callbacks asleep on a completion
                    # already in the used ring (virtio 1.2 §2.7.7.2).
                    self._call_owed = True
        except (QueueBroken, GuestMemoryError) as exc:
            self._break_locked("virtqueue broken while notifying", exc)

    def _break_locked(self, what: str, exc: Exception) -> None:
        self.broken = True
        log.error(what, queue=self.index, error=str(exc))

    # -- control from the vhost-user thread ----------------------------------------------

    def set_call_fd(self, call_fd: int | None) -> None:
        """Switch the call eventfd of the running ring (SET_VRING_CALL).

        A notification owed while there was no call fd is sent on the new one at once.
        A notification written to the old fd stays there: QEMU reads the fd it masked
        when it unmasks (vhost_virtqueue_mask / guest_notifier_pending).
        """
        with self.lock:
            self.call_fd = call_fd
            if call_fd is not None and self._call_owed:
                self._call_owed = False
                try:
                    os.eventfd_write(call_fd, 1)
                except OSError as exc:
                    log.warning("cannot signal the new call fd", queue=self.index, error=str(exc))

    def attach_memory(self, memory) -> None:
        """Re-resolve the ring addresses in a new memory table snapshot."""
        with self.lock:
            try:
                self.queue.attach(memory)
            except (GuestMemoryError, VirtqueueError) as exc:
                self._break_locked("ring no longer inside guest memory", exc)

    def stop(self) -> int:
        """Stop the thread, cancel blocking waits, let every popped request complete,
        return last_avail_idx.

        vhost-user.rst "Starting and stopping rings": GET_VRING_BASE must return the
        index of the next descriptor to process, after every popped one has been used.
        """
        with self.lock:
            self.stopping = True
        os.eventfd_write(self.stop_fd, 1)
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join()
        with self.lock:
            blocked = list(self._dedicated)
        for token in blocked:
            token.set()
        if blocked:
            log.info("ring stop cancelled blocking requests", queue=self.index, count=len(blocked))
        with self.lock:
            while self._inflight:
                self._idle.wait()
            if self._unsignalled:
                self._notify_locked()
        if self.pool is not None:
            self.pool.shutdown()
            self.lane.shutdown()
        os.close(self.stop_fd)
        return self.queue.last_avail_idx
