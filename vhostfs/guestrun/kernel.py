"""Find the guest kernel and, for a faster TCG boot, its uncompressed vmlinux.

The kernel is the newest ``/boot/vmlinuz-*`` with ``/lib/modules/<version>`` (the
system's), or one from an extracted kernel package (``root``: a folder holding
``boot/vmlinuz-<version>`` and ``lib/modules/<version>``, e.g. the Debian backports
kernel fetched by scripts/fetch-kernel-backports.sh).

QEMU boots an uncompressed ELF ``vmlinux`` directly through its PVH ELF note
(``CONFIG_PVH=y``), skipping the real-mode setup and the in-guest decompression: under
TCG that saves several seconds per boot.  The vmlinux is extracted once from the
bzImage payload and cached next to the initramfs.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import lzma
import os
import pathlib
import re
import subprocess
import tempfile
import zlib

from vhostfs.guestrun.initramfs import cache_dir


@dataclasses.dataclass(frozen=True)
class Kernel:
    image: pathlib.Path      # the bzImage (/boot/vmlinuz-<version>)
    version: str             # matches /lib/modules/<version>
    #: the kernel's modules folder; None: the system's /lib/modules/<version>
    modules_dir: pathlib.Path | None = None


def bzimage_version(image: pathlib.Path) -> str:
    """The version string from the bzImage setup header (``kernel_version`` field)."""
    data = image.read_bytes()[:0x10000]
    if data[0x202:0x206] != b"HdrS":
        raise ValueError(f"{image} is not a bzImage (no HdrS signature)")
    ptr = int.from_bytes(data[0x20E:0x210], "little") + 0x200
    return data[ptr:data.index(b"\0", ptr)].decode().split()[0]


def find_kernel(image: str | os.PathLike | None = None,
                root: str | os.PathLike | None = None) -> Kernel:
    """The guest kernel: ``image`` (a bzImage), else the newest ``vmlinuz-*`` in
    ``root``/boot (``root`` given) or /boot.  Its modules are ``root``/lib/modules/<version>
    when ``root`` is given; for an ``image`` inside an extracted package tree
    (``.../boot/vmlinuz-*`` with ``.../lib/modules/<version>`` beside it and no
    /lib/modules/<version> on the system), that tree's; otherwise /lib/modules/<version>."""
    base = pathlib.Path(root) if root is not None else None
    if base is not None and not (base / "boot").is_dir():
        raise FileNotFoundError(f"kernel root {base} has no boot/ folder "
                                "(run scripts/fetch-kernel-backports.sh)")
    if image is None:
        boot = base / "boot" if base is not None else pathlib.Path("/boot")
        cands = sorted(boot.glob("vmlinuz-*"), key=_version_key)
        if not cands:
            raise FileNotFoundError(f"no {boot}/vmlinuz-* (install the linux-image-amd64 package)")
        path = cands[-1]
    else:
        path = pathlib.Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"kernel {path} does not exist")
    try:
        version = bzimage_version(path)
    except (ValueError, IndexError):
        version = path.name.removeprefix("vmlinuz-")
    modules_dir = None
    if base is not None:
        modules_dir = _modules_in(base, version)
        if modules_dir is None:
            raise FileNotFoundError(f"no {base}/lib/modules/{version} for kernel {path}")
    elif not (pathlib.Path("/lib/modules") / version).is_dir() and path.parent.name == "boot":
        modules_dir = _modules_in(path.parent.parent, version)
    return Kernel(path, version, modules_dir)


def _modules_in(base: pathlib.Path, version: str) -> pathlib.Path | None:
    for sub in ("lib/modules", "usr/lib/modules"):
        if (base / sub / version).is_dir():
            return base / sub / version
    return None


def _version_key(path: pathlib.Path) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", path.name)]


_MAGICS = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x1f\x8b\x08", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


def _try_decompress(blob: bytes, kind: str) -> bytes | None:
    try:
        if kind == "xz":
            return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(blob)
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob)
        if kind == "zstd":
            proc = subprocess.run(["zstd", "-dc"], input=blob, capture_output=True)
            return proc.stdout or None
    except (lzma.LZMAError, zlib.error, gzip.BadGzipFile, OSError):
        return None
    return None


def extract_vmlinux(image: pathlib.Path) -> bytes:
    """Decompress the bzImage payload into the ELF vmlinux (like scripts/extract-vmlinux)."""
    data = image.read_bytes()
    for magic, kind in _MAGICS:
        start = 0
        while (pos := data.find(magic, start)) >= 0:
            out = _try_decompress(data[pos:], kind)
            if out and out[:4] == b"\x7fELF":
                return out
            start = pos + 1
    raise ValueError(f"could not extract an ELF vmlinux from {image}")


def cached_vmlinux(kernel: Kernel) -> pathlib.Path:
    st = kernel.image.stat()
    key = hashlib.sha256(f"{kernel.image}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    path = cache_dir() / f"vmlinux-{kernel.version}-{key}"
    if not path.exists():
        data = extract_vmlinux(kernel.image)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".vmlinux-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path
