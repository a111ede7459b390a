"""Build the guest's initramfs: a cached base archive plus a tiny per-run archive.

The base (static busybox, the virtio-fs module chain, ``/init``) depends only on the
kernel version, the busybox binary and the init script, so it is built once and cached
under ``$XDG_CACHE_HOME/vhostfs`` (or ``~/.cache/vhostfs``).  Each run appends a small
second archive (``/etc/guestrun.conf`` and, for one-shot runs, ``/etc/guestrun.cmd``):
the kernel unpacks concatenated compressed cpio archives in order, so the base never
has to be rebuilt for a new command.

The cpio ``newc`` writer is pure Python, so device nodes (``/dev/console``) can be
created without root.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import pathlib
import shlex
import shutil
import subprocess
import tempfile

# virtio_ring must come before virtio, and so on: loading out of order fails with
# "Unknown symbol" (see /work/shared/design/guest.md).  This is the chain of the Debian 6.1
# kernel; ``modules_for`` drops the ones a kernel has built in (Debian's 6.12 builds all of
# them in) and adds any further dependency its modules.dep names.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "fuse",
    "virtiofs",
)

MARK = "@@VHOSTFS"  # every marker is MARK-<KIND>-<nonce>[ <value>]@@

_INIT_TEMPLATE = r"""#!/bin/sh
# vhostfs guest-run /init: mount the virtio-fs share, run the command(s), power off.
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /tmp /root && mount -t tmpfs tmp /tmp
echo 1 > /proc/sys/kernel/printk   # console: emergencies only
. /etc/guestrun.conf               # GR_NONCE GR_TAG GR_MODE GR_MOUNT_OPTS GR_WORKDIR

mark() { echo "@@VHOSTFS-$1-$GR_NONCE${2:+ $2}@@"; }
halt() { cd /; sync; poweroff -f; sleep 5; echo o > /proc/sysrq-trigger; }
fail() { mark FAIL "$*"; halt; }

for m in @MODULES@; do
    insmod /lib/modules/$m.ko || fail "insmod $m"
done
mkdir -p /mnt
i=0
until mount -t virtiofs ${GR_MOUNT_OPTS:+-o "$GR_MOUNT_OPTS"} "$GR_TAG" /mnt; do
    i=$((i + 1)); [ $i -ge 50 ] && fail "mount -t virtiofs $GR_TAG /mnt"
    sleep 0.1
done
mark MOUNTED
cd "${GR_WORKDIR:-/mnt}" || fail "cd $GR_WORKDIR"

if [ "$GR_MODE" = oneshot ]; then
    mark BEGIN
    sh /etc/guestrun.cmd </dev/null 2>&1
    mark EXIT $?
else
    # Session: the host sends "RUN", base64 lines, "@@END@@"; or "QUIT".
    stty -echo 2>/dev/null
    while :; do
        mark READY
        IFS= read -r line || break
        case "$line" in
        RUN)
            : > /tmp/gr.b64
            while IFS= read -r l && [ "$l" != "@@END@@" ]; do echo "$l" >> /tmp/gr.b64; done
            base64 -d /tmp/gr.b64 > /tmp/gr.sh || { mark EXIT 254; continue; }
            mark BEGIN
            (cd "${GR_WORKDIR:-/mnt}" && sh /tmp/gr.sh </dev/null 2>&1)
            mark EXIT $?
            ;;
        QUIT) break ;;
        esac
    done
fi
cd /
sync
umount /mnt
mark UMOUNT $?
halt
"""


def init_script(modules: tuple[str, ...] | list[str]) -> str:
    """/init loading ``modules`` (in this order) before it mounts the share."""
    return _INIT_TEMPLATE.replace("@MODULES@", " ".join(modules))


INIT_SCRIPT = init_script(MODULES)


def cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/vhostfs`` or ``~/.cache/vhostfs``; a private temp dir if unwritable."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = pathlib.Path(base) / "vhostfs"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK | os.X_OK):
            return path
    except OSError:
        pass
    path = pathlib.Path(tempfile.gettempdir()) / f"vhostfs-cache-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


class CpioWriter:
    """A minimal cpio ``newc`` (SVR4, no CRC) writer: what the kernel's initramfs reads."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        raw = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        self._ino += 1
        self._buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, 0o040000 | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive (with its trailer), gzip-compressed as the kernel accepts it."""
        self._ino = 0
        self._entry("TRAILER!!!", 0)
        return gzip.compress(self._buf.getvalue(), compresslevel=6, mtime=0)


def find_busybox() -> pathlib.Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        path = pathlib.Path(cand)
        if path.is_file():
            out = subprocess.run(["file", "-L", str(path)], capture_output=True, text=True).stdout \
                if shutil.which("file") else "statically linked"
            if "statically linked" in out or "static-pie" in out:
                return path
    raise FileNotFoundError("no static busybox found (install the busybox-static package)")


def _modules_root(kernel_version: str, modules_dir: pathlib.Path | None) -> pathlib.Path:
    return pathlib.Path(modules_dir) if modules_dir is not None \
        else pathlib.Path("/lib/modules") / kernel_version


def _name(path: str) -> str:
    """``kernel/fs/fuse/virtiofs.ko.xz`` -> ``virtiofs`` (module names use ``_``)."""
    base = path.rsplit("/", 1)[-1]
    return base[:base.index(".ko")].replace("-", "_") if ".ko" in base else base


def module_path(kernel_version: str, name: str,
                modules_dir: pathlib.Path | None = None) -> pathlib.Path:
    root = _modules_root(kernel_version, modules_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist: no modules for kernel {kernel_version}")
    # module names use "_" where some file names have "-"
    for stem in dict.fromkeys((name, name.replace("_", "-"))):
        for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
            hits = sorted(root.rglob(stem + suffix))
            if hits:
                return hits[0]
    raise FileNotFoundError(f"module {name} not found under {root}")


def modules_for(kernel_version: str, modules_dir: pathlib.Path | None = None) -> tuple[str, ...]:
    """The modules /init must load for the virtio-fs mount, in load order: MODULES minus
    those built into the kernel (``modules.builtin``), each preceded by the dependencies
    ``modules.dep`` names for it (for the Debian 6.1 kernel: exactly MODULES)."""
    root = _modules_root(kernel_version, modules_dir)
    builtin: set[str] = set()
    deps: dict[str, list[str]] = {}
    try:
        lines = (root / "modules.builtin").read_text().splitlines()
        builtin = {_name(line.strip()) for line in lines if line.strip()}
    except OSError:
        pass
    try:
        for line in (root / "modules.dep").read_text().splitlines():
            mod, sep, rest = line.partition(":")
            if sep:
                deps[_name(mod)] = [_name(d) for d in rest.split()]
    except OSError:
        pass
    order: list[str] = []

    def add(name: str, depth: int = 0) -> None:
        if name in order or name in builtin or depth > 32:
            return
        for dep in reversed(deps.get(name, [])):   # modprobe loads the last one first
            add(dep, depth + 1)
        order.append(name)

    for name in MODULES:
        add(name)
    return tuple(order)


def read_module(path: pathlib.Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    return data


def base_key(kernel_version: str, busybox: pathlib.Path,
             modules_dir: pathlib.Path | None = None) -> str:
    modules = modules_for(kernel_version, modules_dir)
    h = hashlib.sha256()
    h.update(kernel_version.encode() + b"\0")
    if modules_dir is not None:    # (the system's /lib/modules keeps its old keys)
        h.update(str(modules_dir).encode() + b"\0")
    h.update(hashlib.sha256(busybox.read_bytes()).digest())
    h.update(init_script(modules).encode())
    h.update(" ".join(modules).encode())
    for name in modules:
        st = module_path(kernel_version, name, modules_dir).stat()
        h.update(b"%d:%d" % (st.st_size, st.st_mtime_ns))
    return h.hexdigest()[:16]


def build_base(kernel_version: str, busybox: pathlib.Path | None = None,
               modules_dir: pathlib.Path | None = None) -> bytes:
    busybox = busybox or find_busybox()
    modules = modules_for(kernel_version, modules_dir)
    cpio = CpioWriter()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "mnt", "proc", "root", "sys", "tmp"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    for name in modules:
        cpio.file(f"lib/modules/{name}.ko",
                  read_module(module_path(kernel_version, name, modules_dir)))
    cpio.file("init", init_script(modules).encode(), 0o755)
    return cpio.finish()


def base_initramfs(kernel_version: str, modules_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Path of the cached base initramfs for this kernel (built on first use); the name
    carries the kernel version, so several kernels' archives live side by side."""
    busybox = find_busybox()
    key = base_key(kernel_version, busybox, modules_dir)
    path = cache_dir() / f"initramfs-{kernel_version}-{key}.cpio.gz"
    if not path.exists():
        data = build_base(kernel_version, busybox, modules_dir)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".initramfs-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path


def run_archive(*, nonce: str, tag: str, mode: str, command: str | None = None,
                mount_opts: str = "", workdir: str = "/mnt") -> bytes:
    """The per-run archive: configuration for /init and, in one-shot mode, the command."""
    conf = "".join(
        f"{k}={shlex.quote(v)}\n"
        for k, v in (("GR_NONCE", nonce), ("GR_TAG", tag), ("GR_MODE", mode),
                     ("GR_MOUNT_OPTS", mount_opts), ("GR_WORKDIR", workdir))
    )
    cpio = CpioWriter()
    cpio.directory("etc")
    cpio.file("etc/guestrun.conf", conf.encode())
    if command is not None:
        cpio.file("etc/guestrun.cmd", command.encode(), 0o755)
    return cpio.finish()


def write_initrd(dest: pathlib.Path, base: pathlib.Path, extra: bytes) -> pathlib.Path:
    """Concatenate the cached base and the per-run archive into ``dest``."""
    with open(dest, "wb") as out, open(base, "rb") as src:
        shutil.copyfileobj(src, out)
        out.write(extra)
    return dest
