"""Daemon assembly: socket, vhost-user device, FUSE server, queue threads.

The only module that knows the socket, the threads and the filesystem together.  The
vhost-user device calls back into ``Daemon`` through the ``DeviceHooks`` methods
(start_queue, stop_queue, memory_changed, reset).
"""
from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Callable

from vhostfs.config import Config
from vhostfs.errors import ProtocolError
from vhostfs.fs.passthrough import PassthroughFs
from vhostfs.fuse.server import FuseServer
from vhostfs.log import get_logger
from vhostfs.runtime.cancel import InterruptRegistry
from vhostfs.runtime.queue import QueueRunner
from vhostfs import sandbox
from vhostfs.sandbox import listen
from vhostfs.vhost_user import transport
from vhostfs.vhost_user.device import VhostUserDevice

log = get_logger("vhostfs.daemon")


class Terminate(Exception):
    """Raised in the main thread by SIGTERM/SIGINT to end the connection loop."""


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.dax = None
        if getattr(config, "dax_window", 0):
            from vhostfs.dax import DaxManager
            from vhostfs.fs.passthrough.dax import DaxPassthroughFs
            self.dax = DaxManager(config.dax_window)
            self.fs = DaxPassthroughFs(config.shared_dir, dax=self.dax,
                                       dax_inode_min_size=config.dax_inode_min_size,
                                       readonly=config.readonly, cache=config.cache,
                                       **config.fs_options)
        else:
            self.fs = PassthroughFs(config.shared_dir, readonly=config.readonly, cache=config.cache,
                                    **config.fs_options)
        self.server = FuseServer(self.fs)
        # FUSE_INTERRUPT (hiprio queue) cancels a blocking request on any request queue.
        self.interrupts = InterruptRegistry()
        self.server.interrupt_hook = self.interrupts.interrupt
        # Called once the vhost-user socket listens (the CLI sends sd_notify READY=1 and
        # applies --socket-group there).
        self.on_listening: Callable[[socket.socket], None] | None = None
        self.runners: dict[int, QueueRunner] = {}
        self.lock = threading.Lock()

    # -- DeviceHooks ------------------------------------------------------------------

    def start_queue(self, index: int, queue, kick_fd: int, call_fd: int | None) -> None:
        # Queue 0 is hiprio (virtio 1.2 §5.11.2): FORGET/INTERRUPT are cheap and must not
        # wait behind request-queue work, so it is served inline on its own thread.  Each
        # request queue (multiqueue: 1..num_request_queues) has its own thread and pool;
        # requests that may block get a dedicated thread on any queue (runtime/queue.py).
        pool = 0 if index == 0 else self.config.thread_pool_size
        runner = QueueRunner(index, queue, kick_fd, call_fd, self.server.handle, pool,
                             may_block=getattr(self.server, "may_block", None),
                             fast=getattr(self.server, "serve_fast", None),
                             interrupts=self.interrupts)
        with self.lock:
            old = self.runners.pop(index, None)
        if old is not None:
            old.stop()
        with self.lock:
            self.runners[index] = runner
        runner.start()
        log.debug("queue started", queue=index, size=queue.size, pool=pool)

    def stop_queue(self, index: int) -> int | None:
        with self.lock:
            runner = self.runners.pop(index, None)
        if runner is None:
            return None
        last = runner.stop()
        log.debug("queue stopped", queue=index, last_avail_idx=last)
        return last

    def set_call_fd(self, index: int, call_fd: int | None) -> None:
        with self.lock:
            runner = self.runners.get(index)
        if runner is not None:
            runner.set_call_fd(call_fd)

    def memory_changed(self, memory) -> None:
        with self.lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.attach_memory(memory)

    def reset(self) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        with self.lock:
            indices = list(self.runners)
        for index in indices:
            self.stop_queue(index)

    # -- main loop -----------------------------------------------------------------------

    def make_device(self) -> VhostUserDevice:
        """The vhost-user device for one frontend connection, with this daemon as its
        hooks.  GET_QUEUE_NUM reports 1 + ``num_request_queues``: the most request
        queues a frontend may start, each then gets its own thread and pool."""
        from vhostfs.migration import MigrationBackend
        migration = MigrationBackend(
            self.server, self.fs, mode=getattr(self.config, "migration_mode", "find-paths"),
            on_error=getattr(self.config, "migration_on_error", "abort"))
        return VhostUserDevice(self, tag=self.config.tag,
                               num_request_queues=self.config.num_request_queues,
                               dax=self.dax, shmem_bit=getattr(self.config, "dax_shmem_bit", 22),
                               migration=migration)

    def _listener(self) -> socket.socket:
        if self.config.fd is not None:
            return transport.listener_from_fd(self.config.fd)
        return transport.listen(self.config.socket_path)

    def run(self) -> int:
        def terminate(signum, _frame):
            raise Terminate(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, terminate)
        signal.signal(signal.SIGINT, terminate)
        listener = self._listener()
        try:
            where = self.config.socket_path or f"fd {self.config.fd}"
            log.info("waiting for vhost-user frontend", socket=where,
                     shared_dir=self.config.shared_dir)
            # Inside the try: a SIGTERM right after readiness still ends cleanly.
            if self.on_listening is not None:
                self.on_listening(listener)
            # vhostfs/sandbox: --sandbox/--modcaps/--seccomp/--max-inodes (namespace mode
            # forks: the parent only waits), then --keep-listening serves one frontend
            # after another.
            jail = sandbox.apply(self)
            if jail.is_parent:
                return jail.wait_child()
            if getattr(self.config, "keep_listening", False):
                return listen.serve_forever(self, listener) or 0
            sock, _ = listener.accept()
            listener.close()
            if self.config.socket_path:
                # One frontend per daemon: the path is unlinked so that a second QEMU
                # cannot connect to a socket nobody will accept on.
                _unlink_quietly(self.config.socket_path)
            log.info("frontend connected")
            device = self.make_device()
            try:
                transport.serve_connection(sock, device)
            except ProtocolError as exc:
                log.error("vhost-user connection closed on a protocol error", error=str(exc))
            log.info("frontend disconnected; exiting")
        except Terminate as why:
            log.info("terminating on signal; finishing in-flight requests", signal=str(why))
        finally:
            self.stop_all()
            self.server.destroy() if hasattr(self.server, "destroy") else None
            if self.config.socket_path:
                _unlink_quietly(self.config.socket_path)
        return 0


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
