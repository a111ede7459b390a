"""The guest runner's parts that need no boot: cpio, QEMU argv files, backends, sockets."""
from __future__ import annotations

import gzip
import shutil
import socket
import subprocess

import pytest

from vhostfs.guestrun import initramfs, kernel, qemu, runner


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


def _kernel_tree(root, version: str, builtin: list[str], dep: list[str]):
    """An extracted kernel package: boot/vmlinuz-V (not a real bzImage: the version then
    comes from the name), lib/modules/V/{modules.builtin,modules.dep} and the .ko files."""
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{version}").write_bytes(b"\0" * 1024)
    mods = root / "lib" / "modules" / version
    mods.mkdir(parents=True)
    (mods / "modules.builtin").write_text("".join(p + "\n" for p in builtin))
    (mods / "modules.dep").write_text("".join(line + "\n" for line in dep))
    for line in dep:
        ko = mods / line.split(":")[0]
        ko.parent.mkdir(parents=True, exist_ok=True)
        ko.write_bytes(b"\x7fELF")
    return mods


def test_modules_of_a_kernel_with_the_chain_built_in(tmp_path):
    """Debian's 6.12: virtio, virtio_pci, fuse and virtiofs are all built in: nothing to load."""
    builtin = [f"kernel/drivers/virtio/{m}.ko" for m in
               ("virtio", "virtio_ring", "virtio_pci", "virtio_pci_modern_dev", "virtio_pci_legacy_dev")]
    builtin += ["kernel/fs/fuse/fuse.ko", "kernel/fs/fuse/virtiofs.ko"]
    mods = _kernel_tree(tmp_path, "6.12.9-amd64", builtin, ["kernel/fs/fuse/cuse.ko.xz:"])
    k = kernel.find_kernel(root=tmp_path)
    assert (k.version, k.modules_dir, k.image.name) == ("6.12.9-amd64", mods, "vmlinuz-6.12.9-amd64")
    assert initramfs.modules_for(k.version, k.modules_dir) == ()
    assert "for m in ; do" in initramfs.init_script(())
    # the bzImage given alone (no /lib/modules/<version> on the system): its tree's modules
    assert kernel.find_kernel(k.image) == k


def test_modules_follow_modules_dep_and_skip_built_ins(tmp_path):
    """A chain partly built in, with an extra dependency: dependencies come first."""
    builtin = ["kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko"]
    dep = ["kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:",
           "kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz:",
           "kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz"
           " kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz",
           "kernel/fs/netfs/extra-dep.ko.zst:",
           "kernel/fs/fuse/fuse.ko.zst: kernel/fs/netfs/extra-dep.ko.zst",
           "kernel/fs/fuse/virtiofs.ko.zst: kernel/fs/fuse/fuse.ko.zst"]
    mods = _kernel_tree(tmp_path, "6.99.0-test", builtin, dep)
    assert initramfs.modules_for("6.99.0-test", mods) == (
        "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "extra_dep", "fuse", "virtiofs")
    assert initramfs.module_path("6.99.0-test", "extra_dep", mods).name == "extra-dep.ko.zst"


def test_system_kernel_keeps_its_module_chain_and_cache_key():
    """The default (Debian 6.1) kernel: the same modules, /init and cache key as before."""
    try:
        k = kernel.find_kernel()
        initramfs.module_path(k.version, "virtiofs")
        busybox = initramfs.find_busybox()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert k.modules_dir is None
    mods = initramfs.modules_for(k.version)
    if mods != initramfs.MODULES:
        pytest.skip(f"the system kernel {k.version} has another module chain: {mods}")
    assert initramfs.init_script(mods) == initramfs.INIT_SCRIPT
    assert initramfs.base_key(k.version, busybox) == initramfs.base_key(k.version, busybox, None)
