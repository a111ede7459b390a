"""Fixtures shared by the unit tests that serve a directory (a file may still define its
own ``share`` when it needs a prepared tree)."""
from __future__ import annotations

import os

import pytest

from vhostfs.fs.passthrough import PassthroughFs


@pytest.fixture
def share(tmp_path):
    """An empty shared directory."""
    d = tmp_path / "share"
    d.mkdir()
    return d


@pytest.fixture
def fs(share):
    return PassthroughFs(str(share))


@pytest.fixture
def fds():
    """A queue runner's kick and call eventfds."""
    kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    yield kick_fd, call_fd
    os.close(kick_fd)
    os.close(call_fd)
