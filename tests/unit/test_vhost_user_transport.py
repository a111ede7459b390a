"""The vhost-user transport over real unix sockets: framing, fds, EOF, listen."""
from __future__ import annotations

import array
import os
import socket
import stat
import threading

import pytest

from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user import protocol as p
from vhostfs.vhost_user import transport
from vhostfs.vhost_user.protocol import FatalProtocolError

R = m.Request


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield transport.Connection(a), b
    a.close()
    b.close()


def sendfds(sock, data, fds):
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def closed(fd):
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_message_with_fds_on_the_header(pair):
    conn, peer = pair
    efd = os.eventfd(0)
    sendfds(peer, p.encode_request(R.SET_VRING_KICK, m.U64.pack(1), need_reply=True), [efd])
    os.close(efd)
    msg = conn.receive()
    assert (msg.request, msg.need_reply, msg.payload) == (R.SET_VRING_KICK, True, m.U64.pack(1))
    assert len(msg.fds) == 1 and not msg.fds_truncated
    assert os.get_inheritable(msg.fds[0]) is False           # MSG_CMSG_CLOEXEC
    msg.close_fds()


def test_header_and_body_sent_separately_with_fds_on_body(pair):
    conn, peer = pair
    raw = p.encode_request(R.SET_VRING_CALL, m.U64.pack(0))
    peer.sendall(raw[:5])
    peer.sendall(raw[5:12])
    efd = os.eventfd(0)
    sendfds(peer, raw[12:], [efd])
    os.close(efd)
    msg = conn.receive()
    assert msg.request == R.SET_VRING_CALL and len(msg.fds) == 1
    msg.close_fds()


def test_two_messages_keep_their_own_fds(pair):
    conn, peer = pair
    fds = [os.eventfd(0) for _ in range(3)]
    sendfds(peer, p.encode_request(R.SET_VRING_KICK, m.U64.pack(0)), fds[:1])
    sendfds(peer, p.encode_request(R.SET_VRING_CALL, m.U64.pack(0)), fds[1:])
    first, second = conn.receive(), conn.receive()
    assert (len(first.fds), len(second.fds)) == (1, 2)
    first.close_fds()
    second.close_fds()
    for fd in fds:
        os.close(fd)


def test_too_many_fds_are_flagged_and_none_leak(pair):
    conn, peer = pair
    before = len(os.listdir("/proc/self/fd"))
    fds = [os.eventfd(0) for _ in range(m.MAX_FDS + 4)]
    sendfds(peer, p.encode_request(R.SET_OWNER), fds)
    for fd in fds:
        os.close(fd)
    msg = conn.receive()
    assert msg.fds_truncated
    msg.close_fds()
    assert len(os.listdir("/proc/self/fd")) == before


def test_clean_eof_between_messages(pair):
    conn, peer = pair
    peer.shutdown(socket.SHUT_WR)
    assert conn.receive() is None


@pytest.mark.parametrize("data", [
    b"\x01\x00\x00",                                         # EOF inside the header
    p.encode_request(R.SET_FEATURES, bytes(8))[:-3],         # EOF inside the payload
    m.HEADER.pack(R.SET_FEATURES, 1, 1 << 20),               # absurd size
    m.HEADER.pack(R.SET_FEATURES, 2, 8) + bytes(8),          # wrong version
])
def test_unframeable_streams_are_fatal_and_fds_closed(pair, data):
    conn, peer = pair
    efd = os.eventfd(0)
    sendfds(peer, data, [efd])
    os.close(efd)
    peer.shutdown(socket.SHUT_WR)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(FatalProtocolError):
        conn.receive()
    assert len(os.listdir("/proc/self/fd")) <= before


class EchoDevice:
    def __init__(self):
        self.seen = []
        self.shut = False

    def handle(self, msg):
        self.seen.append(msg.request)
        msg.close_fds()
        return p.encode_u64_reply(msg.request, 7) if msg.request == R.GET_FEATURES else None

    def shutdown(self):
        self.shut = True


def test_serve_connection_until_eof():
    a, b = socket.socketpair()
    dev = EchoDevice()
    t = threading.Thread(target=transport.serve_connection, args=(a, dev))
    t.start()
    b.sendall(p.encode_request(R.SET_OWNER) + p.encode_request(R.GET_FEATURES))
    assert b.recv(20) == p.encode_u64_reply(R.GET_FEATURES, 7)
    b.close()
    t.join(5)
    assert not t.is_alive() and dev.shut and dev.seen == [R.SET_OWNER, R.GET_FEATURES]
    assert a.fileno() == -1


def test_serve_connection_raises_on_fatal_and_shuts_down():
    a, b = socket.socketpair()
    dev = EchoDevice()
    b.sendall(m.HEADER.pack(R.SET_OWNER, 0x1 | m.FLAG_REPLY, 0))
    with pytest.raises(FatalProtocolError):
        transport.serve_connection(a, dev)
    assert dev.shut
    b.close()


def test_listen_replaces_stale_socket(tmp_path):
    path = str(tmp_path / "vhost.sock")
    first = transport.listen(path)
    first.close()                          # leaves a stale socket file
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    second = transport.listen(path)
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    conn, _ = second.accept()
    conn.close()
    client.close()
    second.close()


def test_listen_refuses_to_delete_a_regular_file(tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(OSError, match=str(path)):
        transport.listen(str(path))
    assert path.read_text() == "precious"


def test_listen_error_names_the_path(tmp_path):
    path = str(tmp_path / "missing-dir" / "sock")
    with pytest.raises(OSError, match="missing-dir"):
        transport.listen(path)


def test_listen_path_too_long_names_the_path(tmp_path):
    path = str(tmp_path / ("x" * 200))
    with pytest.raises(OSError, match="cannot listen on vhost-user socket .*xxxx: AF_UNIX path too long") as info:
        transport.listen(path)
    assert "None" not in str(info.value)


def test_listener_from_fd(tmp_path):
    sock = transport.listen(str(tmp_path / "s"))
    adopted = transport.listener_from_fd(os.dup(sock.fileno()))
    assert adopted.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    adopted.close()
    sock.close()
    plain = socket.socket(socket.AF_UNIX)
    with pytest.raises(OSError, match="not a listening"):
        transport.listener_from_fd(plain.fileno())
    plain.close()
