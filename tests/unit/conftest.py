"""Fixtures shared by the unit tests that serve a directory (a file may still define its
own ``share`` when it needs a prepared tree)."""
from __future__ import annotations

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
