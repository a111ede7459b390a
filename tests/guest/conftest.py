"""Fixtures for the booted-guest tests: ONE QEMU guest for the whole session.

The backend is ``vhostfs`` unless ``VHOSTFS_GUEST_BACKEND`` says otherwise
(``virtiofsd`` = QEMU's C reference daemon, or a command template with ``{socket}``
``{shared_dir}`` placeholders; see docs/guest-runner.md).  Without QEMU or a kernel
the tests are skipped, except under ``CI=true`` where that is an error.
"""
from __future__ import annotations

import os
import pathlib
import shutil

import pytest

from vhostfs.guestrun import GuestRunner, Result

BACKEND = os.environ.get("VHOSTFS_GUEST_BACKEND", "vhostfs")


def _missing() -> str | None:
    from vhostfs.guestrun import initramfs, kernel, qemu
    try:
        qemu.qemu_binary()
        k = kernel.find_kernel(os.environ.get("VHOSTFS_GUEST_KERNEL"))
        initramfs.find_busybox()
        # (a kernel with the chain built in, e.g. the backports 6.12, needs no module file)
        for name in initramfs.modules_for(k.version, k.modules_dir):
            initramfs.module_path(k.version, name, k.modules_dir)
    except FileNotFoundError as exc:
        return str(exc)
    if BACKEND == "virtiofsd" and not os.access("/usr/lib/qemu/virtiofsd", os.X_OK):
        return "/usr/lib/qemu/virtiofsd not found"
    return None


def pytest_collection_modifyitems(config, items):
    guest_items = [i for i in items if i.get_closest_marker("guest")]
    if not guest_items:
        return
    why = _missing()
    if why is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        raise pytest.UsageError(f"CI=true but the guest tests cannot run: {why} "
                                f"(run scripts/install-deps.sh)")
    for item in guest_items:
        item.add_marker(pytest.mark.skip(reason=f"guest tests need QEMU and a kernel: {why}"))


def make_runner(share: pathlib.Path, **kw) -> GuestRunner:
    return GuestRunner(share, backend=BACKEND, kernel=os.environ.get("VHOSTFS_GUEST_KERNEL"),
                       log_level=os.environ.get("VHOSTFS_GUEST_LOG_LEVEL", "info"),
                       boot_timeout=180, timeout=600, **kw)


class Guest:
    """The booted guest as the tests see it: ``sh`` runs a script and insists on status 0."""

    def __init__(self, session, share: pathlib.Path) -> None:
        self.session, self.share = session, share

    def run(self, script: str, timeout: float = 180) -> Result:
        return self.session.run(script, timeout=timeout)

    def sh(self, script: str, timeout: float = 180) -> str:
        res = self.run("set -e\n" + script, timeout=timeout)
        assert res.status == 0, (f"guest script failed with {res.status}:\n{script}\n--- output:\n"
                                 f"{res.output}--- guest dmesg (tail):\n{self.dmesg()}")
        return res.output

    def dmesg(self, lines: int = 25) -> str:
        """The guest kernel's last messages (the console only shows emergencies)."""
        try:
            return self.session.run(f"dmesg | tail -n {lines}", timeout=30).output
        except Exception as exc:  # the guest may be gone: say so instead of hiding the failure
            return f"(no dmesg: {exc.__class__.__name__})"

    def workdir(self, name: str) -> pathlib.Path:
        """A fresh directory on the share (host path); the guest sees it as /mnt/NAME."""
        path = self.share / name
        if path.exists():
            shutil.rmtree(path)
        return path


@pytest.fixture(scope="session")
def guest_backend() -> str:
    """The backend under test (``VHOSTFS_GUEST_BACKEND``, default ``vhostfs``)."""
    return BACKEND


@pytest.fixture(scope="session")
def runner_factory():
    """``runner_factory(share, **kw)`` -> a GuestRunner for the backend under test."""
    return make_runner


@pytest.fixture(scope="session")
def guest_share(tmp_path_factory) -> pathlib.Path:
    share = tmp_path_factory.mktemp("share")
    os.chmod(share, 0o755)
    return share


@pytest.fixture(scope="session")
def guest(guest_share):
    """One booted guest with ``guest_share`` mounted at /mnt, shared by every test."""
    session = make_runner(guest_share).session()
    with session:
        yield Guest(session, guest_share)
    # A clean shutdown is part of the contract: umount succeeded, QEMU powered off,
    # the backend exited by itself with status 0.
    assert session.shutdown is not None
    assert session.shutdown.umount_status == 0, session.shutdown
    assert session.shutdown.qemu_status == 0, session.shutdown
    assert session.shutdown.backend_status == 0, session.shutdown
