"""Find the guest kernel and, for a faster TCG boot, its uncompressed vmlinux.

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


def bzimage_version(image: pathlib.Path) -> str:
    """The version string from the bzImage setup header (``kernel_version`` field)."""
    data = image.read_bytes()[:0x10000]
    if data[0x202:0x206] != b"HdrS":
        raise ValueError(f"{image} is not a bzImage (no HdrS signature)")
    ptr = int.from_bytes(data[0x20E:0x210], "little") + 0x200
    return data[ptr:data.index(b"\0", ptr)].decode().split()[0]


def find_kernel(image: str | os.PathLike | None = None) -> Kernel:
    if image is None:
        cands = sorted(pathlib.Path("/boot").glob("vmlinuz-*"), key=_version_key)
        if not cands:
            raise FileNotFoundError("no /boot/vmlinuz-* (install the linux-image-amd64 package)")
        path = cands[-1]
    else:
        path = pathlib.Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"kernel {path} does not exist")
    try:
        version = bzimage_version(path)
    except (ValueError, IndexError):
        version = path.name.removeprefix("vmlinuz-")
    return Kernel(path, version)


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
