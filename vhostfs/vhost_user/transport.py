"""The only socket code of the vhost-user side: listen, receive with fds, send.

QEMU sends each message with one ``sendmsg`` and attaches its fds to it, so the fds
arrive with the header (architecture.md, "Python idioms").  A frontend that sends
header and payload separately may attach them to the payload instead: we collect fds
from every read of a message.  Every fd received is handed to the :class:`Message`,
which the device closes on every path; fds received for a message that never
completes are closed here.
"""
from __future__ import annotations

import array
import os
import socket
import stat

from vhostfs.log import get_logger
from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user import protocol
from vhostfs.vhost_user.protocol import FatalProtocolError, Message

log = get_logger("vhostfs.vhost_user")

_FD_SIZE = array.array("i").itemsize
_ANCILLARY_SPACE = socket.CMSG_SPACE(m.MAX_FDS * _FD_SIZE)


def _path_error(what: str, path: str, exc: OSError) -> OSError:
    reason = exc.strerror or str(exc)
    if exc.errno is None:
        return OSError(f"{what} {path}: {reason}")
    return OSError(exc.errno, f"{what} {path}: {reason}")


def listen(path: str) -> socket.socket:
    """A listening unix socket at ``path``; a stale socket file there is replaced.

    Raises OSError naming the path.  Anything at ``path`` that is not a socket is left
    alone (we never delete a user's file).
    """
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _path_error("cannot replace stale socket", path, exc) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise _path_error("cannot listen on vhost-user socket", path, exc) from None
    return sock


def listener_from_fd(fd: int) -> socket.socket:
    """Adopt an already listening unix stream socket passed as ``--fd``."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise OSError(exc.errno, f"--fd {fd}: not a usable socket: {exc.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or \
            not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise OSError(f"--fd {fd}: not a listening unix stream socket")
    return sock


class Connection:
    """One frontend connection: reads whole messages, writes replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def _recv_exact(self, size: int, fds: list[int]) -> tuple[bytes, bool]:
        """Read exactly ``size`` bytes, appending received fds; (data, truncated).

        Returns fewer bytes only at EOF.
        """
        chunks, got, truncated = [], 0, False
        while got < size:
            data, ancdata, flags, _ = self.sock.recvmsg(size - got, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(cdata) - len(cdata) % _FD_SIZE
                    fds.extend(array.array("i", cdata[:usable]))
            truncated |= bool(flags & socket.MSG_CTRUNC)
            if not data:
                break
            chunks.append(data)
            got += len(data)
        return b"".join(chunks), truncated

    def receive(self) -> Message | None:
        """The next message, or None on a clean EOF between messages.

        Raises FatalProtocolError on EOF inside a message or a header that cannot be
        framed; fds received with such a message are closed first.
        """
        fds: list[int] = []
        try:
            header, trunc_h = self._recv_exact(m.HEADER.size, fds)
            if not header:
                return None
            if len(header) < m.HEADER.size:
                raise FatalProtocolError(f"connection closed inside a message header ({len(header)} bytes)")
            request, flags, size = protocol.decode_header(header)
            payload, trunc_p = self._recv_exact(size, fds)
            if len(payload) < size:
                raise FatalProtocolError(f"{m.request_name(request)}: connection closed after "
                                         f"{len(payload)} of {size} payload bytes")
        except BaseException:
            Message(0, 0, b"", fds).close_fds()
            raise
        return Message(request, flags, payload, fds, trunc_h or trunc_p)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def serve_connection(sock, device) -> None:
    """Serve one frontend until it disconnects.

    Returns on EOF (or a reset connection); raises ProtocolError when the stream had to
    be abandoned.  Either way the device is shut down (its rings stopped through the
    hooks, its fds closed) and the socket closed before returning.
    """
    conn = sock if isinstance(sock, Connection) else Connection(sock)
    try:
        while True:
            try:
                msg = conn.receive()
            except ConnectionError as exc:
                log.info("vhost-user connection reset", error=str(exc))
                return
            except OSError as exc:
                log.error("vhost-user socket error; closing the connection", error=str(exc))
                return
            if msg is None:
                return
            reply = device.handle(msg)
            if reply is not None:
                try:
                    conn.send(reply)
                except OSError as exc:
                    log.error("vhost-user reply could not be sent; closing the connection",
                              request=msg.name, error=str(exc))
                    return
    finally:
        device.shutdown()
        conn.close()
