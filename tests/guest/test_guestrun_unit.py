"""The guest runner's parts that need no boot: cpio, QEMU argv files, backends, sockets."""
from __future__ import annotations

import gzip
import shutil
import socket
import subprocess

import pytest

from vhostfs.guestrun import initramfs, qemu, runner


def test_cpio_archive_is_read_by_gnu_cpio(tmp_path):
    if not shutil.which("cpio"):
        pytest.skip("cpio not installed")
    w = initramfs.CpioWriter()
    w.directory("etc")
    w.file("etc/conf", b"A=1\n")
    w.file("etc/odd", b"x" * 5, 0o755)
    w.symlink("link", "etc/conf")
    w.chardev("console", 5, 1)
    listing = subprocess.run(["cpio", "-itv"], input=gzip.decompress(w.finish()),
                             capture_output=True, check=True).stdout.decode()
    lines = listing.splitlines()
    assert [l.split()[-1] if "->" not in l else l.split()[-3] for l in lines] == \
        ["etc", "etc/conf", "etc/odd", "link", "console"]
    assert lines[2].startswith("-rwxr-xr-x") and lines[4].startswith("crw-------")
    assert "link -> etc/conf" in lines[3]
    subprocess.run(["cpio", "-id", "--no-absolute-filenames", "--quiet"], cwd=tmp_path,
                   input=gzip.decompress(_files_only()), check=True)
    assert (tmp_path / "etc" / "conf").read_bytes() == b"A=1\n"


def _files_only() -> bytes:
    w = initramfs.CpioWriter()
    w.directory("etc")
    w.file("etc/conf", b"A=1\n")
    return w.finish()


def test_run_archive_quotes_the_configuration():
    data = gzip.decompress(initramfs.run_archive(nonce="n1", tag="my tag", mode="oneshot",
                                                 command="echo 'hi'", mount_opts=""))
    assert b"GR_TAG='my tag'\n" in data and b"GR_NONCE=n1\n" in data
    assert b"echo 'hi'" in data and data.rstrip(b"\0").endswith(b"TRAILER!!!")


def test_qemu_argv_comes_from_the_config_files(monkeypatch):
    monkeypatch.setattr(qemu, "qemu_binary", lambda: "/usr/bin/qemu-system-x86_64")
    argv = qemu.build_argv(kernel="/k", initrd="/i", append="console=ttyS0 quiet",
                           socket="/run/s.sock", tag="t0", memory="512M", smp=1, queue_size=256)
    assert argv[0].endswith("qemu-system-x86_64")
    assert argv[argv.index("-append") + 1] == "console=ttyS0 quiet"
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in argv
    assert "socket,id=vhostfs0,path=/run/s.sock" in argv
    assert "vhost-user-fs-pci,queue-size=256,chardev=vhostfs0,tag=t0" in argv
    assert argv[argv.index("-kernel") + 1] == "/k" and argv[argv.index("-m") + 1] == "512M"
    text = (qemu.CONFIG_DIR / qemu.SHARE).read_text()
    assert "vhost-user-fs-pci" in text and "share=on" in text


def test_qemu_config_with_a_missing_value_is_an_error(tmp_path):
    (tmp_path / "x.args").write_text("# comment\n-foo ${NOPE}\n")
    with pytest.raises(KeyError, match=r"x.args:2: no value for \$\{NOPE\}"):
        qemu.read_args(tmp_path / "x.args", {})


def test_backend_argv():
    kw = dict(socket="/s", shared_dir="/d", tag="t", log_level="debug")
    argv = runner.backend_argv("vhostfs", **kw)
    assert argv[1:] == ["-m", "vhostfs", "--socket-path", "/s", "--shared-dir", "/d", "--tag", "t",
                        "--log-level", "debug"]
    assert runner.backend_argv("virtiofsd", **kw) == [
        "/usr/lib/qemu/virtiofsd", "--socket-path=/s", "-o", "source=/d", "-o", "cache=auto"]
    assert runner.backend_argv("x --sock {socket} --dir '{shared_dir}'", **kw) == \
        ["x", "--sock", "/s", "--dir", "/d"]
    with pytest.raises(ValueError, match="socket"):
        runner.backend_argv("x --dir {shared_dir}", **kw)


def test_listening_socket_is_detected_without_connecting(tmp_path):
    path = str(tmp_path / "s.sock")
    assert not runner.unix_socket_listening(path)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        assert not runner.unix_socket_listening(path)   # bound, not listening yet
        s.listen(1)
        assert runner.unix_socket_listening(path)
        s.settimeout(0.05)
        with pytest.raises(TimeoutError):
            s.accept()                                  # nobody connected


def test_init_script_loads_modules_in_dependency_order():
    line = next(l for l in initramfs.INIT_SCRIPT.splitlines() if l.startswith("for m in"))
    assert line == "for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci fuse virtiofs; do"
    assert "poweroff -f" in initramfs.INIT_SCRIPT and "umount /mnt" in initramfs.INIT_SCRIPT
