"""The device side of the vhost-user protocol (qemu docs/interop/vhost-user.rst).

Public API for the runtime::

    sock = transport.listen(path)                 # or transport.listener_from_fd(fd)
    conn, _ = sock.accept()
    device = device.VhostUserDevice(hooks, tag=..., num_request_queues=...)
    transport.serve_connection(conn, device)      # returns on EOF; raises ProtocolError
                                                  # when the connection had to be closed

``hooks`` implements :class:`vhostfs.vhost_user.device.DeviceHooks`.
"""
