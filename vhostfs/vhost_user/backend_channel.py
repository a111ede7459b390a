"""The backend channel: requests from us to the front end (SHMEM_MAP / SHMEM_UNMAP).

The front end hands the socket over with SET_BACKEND_REQ_FD.  We send
``VHOST_USER_BACKEND_SHMEM_MAP`` (9, the fd in SCM_RIGHTS) and ``SHMEM_UNMAP`` (10), both with
NEED_REPLY, and wait for the u64 result (vhost-user.rst, REPLY_ACK).

Threading (dax.md §2.4 "Ordering"):

* Requests come from FUSE worker threads, one at a time (``_io`` lock), never from the
  thread that reads the main socket.  QEMU 11.1 replies to SHMEM_MAP and then sends
  ADD_MEM_REG / SET_MEM_TABLE on the main socket and waits for *that* ack: the main-socket
  thread is free to serve it while the worker waits here, so nothing stalls.
* QEMU does not read this channel while it waits for a reply on the main socket (e.g. to
  GET_VRING_BASE).  So before the device stops a ring - which drains the workers - it
  calls :meth:`close_gate`: a worker waiting for a reply gives up at once (the request
  fails with ENOTCONN; the late reply, if any, is skipped later), and no new request is
  sent.  The gate stays shut until a ring runs again (:meth:`open_gate`): QEMU 11.1
  segfaults on SHMEM_* after the rings were stopped or the device reset.
* The gate check and the ``sendmsg`` happen under one lock, so once ``close_gate``
  returned no request can leave any more.  A request already sent cannot be recalled:
  QEMU may still process it after our GET_VRING_BASE reply (documented in docs/dax.md).
"""
from __future__ import annotations

import errno
import os
import select
import socket
import threading

from vhostfs.dax.manager import FrontendRefused
from vhostfs.log import get_logger
from vhostfs.vhost_user import messages as m

log = get_logger("vhostfs.vhost_user")

BR = m.BackendRequest
REPLY_TIMEOUT = 30.0


class ChannelClosed(OSError):
    """No answer can be had: the gate is shut, the socket failed, or the reply timed out."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOTCONN, message)


class BackendChannel:
    """One backend-channel socket (it takes ownership of ``fd``)."""

    def __init__(self, fd: int, *, shmid: int = 0, reply_timeout: float = REPLY_TIMEOUT) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        self.shmid = shmid
        self.reply_timeout = reply_timeout
        self._io = threading.Lock()          # one request in flight
        self._state = threading.Lock()       # gate + send
        self._open = False
        self._why_closed = "no ring is running"
        self._broken: str | None = None
        self._stale = 0                      # replies still owed to requests we gave up on
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.sent = {BR.SHMEM_MAP: 0, BR.SHMEM_UNMAP: 0}

    # -- gate -------------------------------------------------------------------------------
    def open_gate(self) -> None:
        with self._state:
            if self._broken or self.sock.fileno() < 0:
                return
            self._open = True
            try:
                while os.read(self._wake_r, 64):
                    pass
            except BlockingIOError:
                pass

    def close_gate(self, why: str) -> None:
        """No request leaves after this returns; a waiting request is released now."""
        with self._state:
            if self._open:
                log.debug("backend channel gate closed", reason=why)
            self._open = False
            self._why_closed = why
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass

    @property
    def is_open(self) -> bool:
        return self._open

    def close(self) -> None:
        self.close_gate("disconnected")
        with self._io:            # the waiter (if any) has been released by the gate
            self.sock.close()
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._wake_r = self._wake_w = -1

    # -- MapChannel ---------------------------------------------------------------------------
    def map(self, shm_offset: int, length: int, fd: int, fd_offset: int, writable: bool) -> None:
        flags = m.SHMEM_MAP_READ_WRITE if writable else m.SHMEM_MAP_READ_ONLY
        self._request(BR.SHMEM_MAP, m.SHMEM_MMAP.pack(self.shmid, fd_offset, shm_offset, length, flags),
                      [fd], f"map 0x{length:x} at 0x{shm_offset:x} from file offset 0x{fd_offset:x}")

    def unmap(self, shm_offset: int, length: int) -> None:
        self._request(BR.SHMEM_UNMAP, m.SHMEM_MMAP.pack(self.shmid, 0, shm_offset, length, 0), [],
                      f"unmap 0x{length:x} at 0x{shm_offset:x}")

    # -- one request --------------------------------------------------------------------------
    def _request(self, request: int, payload: bytes, fds: list[int], what: str) -> None:
        header = m.HEADER.pack(request, m.VERSION | m.FLAG_NEED_REPLY, len(payload))
        with self._io:
            with self._state:
                if self._broken:
                    raise ChannelClosed(f"backend channel unusable ({self._broken}): {what}")
                if not self._open:
                    raise ChannelClosed(f"backend channel closed ({self._why_closed}): {what}")
                try:
                    if fds:
                        self.sock.sendmsg([header + payload],
                                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(_fd_array(fds)))])
                    else:
                        self.sock.sendall(header + payload)
                except OSError as exc:
                    self._broken = f"send failed: {exc}"
                    raise ChannelClosed(f"backend channel send failed: {exc}") from None
                self.sent[request] += 1
            result = self._await_reply(request, what)
        if result != 0:
            raise FrontendRefused(f"front end refused to {what} (result {result})")

    def _await_reply(self, request: int, what: str) -> int:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            events = dict(poller.poll(self.reply_timeout * 1000))
            if not events:
                self._broken = f"no reply to {m.BackendRequest(request).name} in {self.reply_timeout:.0f} s"
                raise ChannelClosed(f"backend channel: {self._broken}")
            if self._wake_r in events and not self._open:
                self._stale += 1
                raise ChannelClosed(f"backend channel closed ({self._why_closed}) while waiting "
                                    f"for the reply to {what}")
            if self.sock.fileno() in events:
                reply_request, value = self._read_reply()
                if self._stale:
                    self._stale -= 1
                    log.debug("late backend reply skipped", request=reply_request, result=value)
                    continue
                if reply_request != request:
                    self._broken = f"reply to request {reply_request} while waiting for {request}"
                    raise ChannelClosed(f"backend channel out of step: {self._broken}")
                return value
            if self._wake_r in events:      # a wake-up from a gate that opened again
                try:
                    os.read(self._wake_r, 64)
                except BlockingIOError:
                    pass

    def _recv_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                self._broken = "front end closed the backend channel"
                raise ChannelClosed(self._broken)
            data += chunk
        return data

    def _read_reply(self) -> tuple[int, int]:
        self.sock.settimeout(self.reply_timeout)
        try:
            request, flags, size = m.HEADER.unpack(self._recv_exact(m.HEADER.size))
            if flags & m.VERSION_MASK != m.VERSION or not flags & m.FLAG_REPLY or size != m.U64.size:
                self._broken = f"malformed reply header (request {request}, flags 0x{flags:x}, size {size})"
                raise ChannelClosed(f"backend channel: {self._broken}")
            (value,) = m.U64.unpack(self._recv_exact(size))
        except socket.timeout:
            self._broken = "reply cut short"
            raise ChannelClosed(f"backend channel: {self._broken}") from None
        except OSError as exc:
            if not isinstance(exc, ChannelClosed):
                self._broken = f"receive failed: {exc}"
                raise ChannelClosed(f"backend channel: {self._broken}") from None
            raise
        finally:
            self.sock.settimeout(None)
        return request, value


def _fd_array(fds: list[int]):
    import array
    return array.array("i", fds)
