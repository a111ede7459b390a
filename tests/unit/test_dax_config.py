"""DAX options: Config validation, sizes, and the daemon's wiring (manager -> fs + device)."""
from __future__ import annotations

import pytest

from vhostfs.config import Config, parse_size
from vhostfs.errors import ConfigError

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _collect_now():
    """Filesystems and servers here live in reference cycles: free their fds now, not
    during a later test that counts its open fds."""
    yield
    import gc
    gc.collect()


@pytest.mark.parametrize("text,value", [("64M", 64 * MiB), ("64MiB", 64 * MiB), ("1g", 1 << 30),
                                        ("2097152", 2 * MiB), ("512K", 512 << 10), ("0", 0)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "12X", "-2M", "1.5G"])
def test_parse_size_refuses(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def _config(tmp_path, **kw):
    kw.setdefault("tag", "t")
    return Config(shared_dir=str(tmp_path), socket_path=str(tmp_path / "s"), **kw)


@pytest.mark.parametrize("kw,needle", [
    ({"dax_window": 3 * MiB}, "multiple of 2 MiB"),
    ({"dax_window": 502 * MiB}, "at most 500 MiB"),
    ({"dax_window": 64 * MiB, "readonly": True}, "--readonly"),
    ({"dax_shmem_bit": 20}, "--dax-shmem-bit"),
    ({"dax_inode_min_size": -1}, "--dax-inode-min-size"),
    ({"dax_window": 64 * MiB, "tag": None}, "needs --tag"),
])
def test_config_refuses(tmp_path, kw, needle):
    with pytest.raises(ConfigError, match=needle):
        _config(tmp_path, **kw).validate()


def test_daemon_wires_the_manager_into_fs_and_device(tmp_path):
    from vhostfs.fs.passthrough.dax import DaxPassthroughFs
    from vhostfs.runtime.daemon import Daemon
    daemon = Daemon(_config(tmp_path, dax_window=64 * MiB, dax_shmem_bit=21,
                            dax_inode_min_size=MiB).validate())
    assert isinstance(daemon.fs, DaxPassthroughFs) and daemon.fs.dax is daemon.dax
    assert daemon.fs.dax_inode_min_size == MiB and daemon.dax.size == 64 * MiB
    device = daemon.make_device()
    assert device.dax is daemon.dax and device.protocol_features & (1 << 21)
    assert not device.protocol_features & (1 << 22)


def test_daemon_without_dax_is_unchanged(tmp_path):
    from vhostfs.fs.passthrough.dax import DaxPassthroughFs
    from vhostfs.runtime.daemon import Daemon
    daemon = Daemon(_config(tmp_path).validate())
    assert daemon.dax is None and not isinstance(daemon.fs, DaxPassthroughFs)
    assert not daemon.make_device().protocol_features & (3 << 21)
