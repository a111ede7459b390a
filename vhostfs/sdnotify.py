"""systemd's two process protocols, without libsystemd.

* readiness: :func:`notify` sends ``READY=1`` etc. to ``$NOTIFY_SOCKET`` (sd_notify(3));
  a no-op when the variable is unset (not started by systemd with ``Type=notify``).
* socket activation: :func:`listen_fds` returns the fds systemd (or
  ``systemd-socket-activate``) passed as ``LISTEN_FDS``/``LISTEN_PID`` (sd_listen_fds(3)),
  starting at fd 3.
"""
from __future__ import annotations

import os
import socket

from vhostfs.log import get_logger

log = get_logger("vhostfs.sdnotify")

SD_LISTEN_FDS_START = 3


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. ``"READY=1"``, ``"STATUS=..."``) as one datagram.

    Returns False when there is no ``$NOTIFY_SOCKET``.  A failure to send is logged, not
    raised: readiness reporting must never stop the daemon from serving.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":                 # abstract namespace
        address = "\0" + address[1:]
    elif address[0] != "/":
        log.warning("NOTIFY_SOCKET is neither a path nor abstract; not notifying",
                    notify_socket=address)
        return False
    payload = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(payload)
    except OSError as exc:
        log.warning("cannot notify systemd", notify_socket=os.environ["NOTIFY_SOCKET"],
                    error=exc.strerror or str(exc))
        return False
    return True


def listen_fds(*, unset_environment: bool = True) -> list[int]:
    """The fds passed by socket activation (empty when none were passed to *this* pid).

    Like sd_listen_fds(3): ``LISTEN_PID`` must be our pid; the fds get FD_CLOEXEC; with
    ``unset_environment`` the variables are removed so children do not inherit them.
    """
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    finally:
        if unset_environment:
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(name, None)
    if pid != os.getpid() or count <= 0:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass    # not open: adopting it fails later with a message naming the fd
    return fds
