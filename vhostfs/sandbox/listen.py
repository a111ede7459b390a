"""``--keep-listening``: serve one frontend after another on the same socket.

A guest reboot (QEMU reconnects) or a VMM restart then needs no new vhostfs.  Each
connection gets a fresh vhost-user device; between connections the queue threads are
stopped and the FUSE session is ended as a guest DESTROY would (every inode and handle
the old guest held is released), so the next guest's INIT starts from scratch.
"""
from __future__ import annotations

from vhostfs.errors import ProtocolError
from vhostfs.log import get_logger
from vhostfs.vhost_user import transport

log = get_logger("vhostfs.daemon")


def end_session(server) -> None:
    """What FUSE_DESTROY does, for a guest that vanished without sending it."""
    if getattr(server, "initialized", False):
        server._destroy(None, 0, b"", None, None)


def serve_forever(daemon, listener) -> None:
    """Accept and serve frontends until a signal (Terminate) ends the daemon."""
    n = 0
    while True:
        sock, _ = listener.accept()
        n += 1
        log.info("frontend connected", connection=n)
        try:
            transport.serve_connection(sock, daemon.make_device())
        except ProtocolError as exc:
            log.error("vhost-user connection closed on a protocol error", error=str(exc))
        daemon.stop_all()
        end_session(daemon.server)
        log.info("frontend disconnected; waiting for the next one (--keep-listening)",
                 connection=n)
