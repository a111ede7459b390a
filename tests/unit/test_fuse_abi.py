"""fuse/abi.py against include/uapi/linux/fuse.h (7.38).

Sizes are compiled from /usr/include/linux/fuse.h with the C compiler when both are
available; the hardcoded table (read from the same header) is always checked.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from vhostfs.fuse import abi

HEADER = "/usr/include/linux/fuse.h"

# sizeof(struct ...) from fuse.h 7.38 (x86_64 and every other Linux ABI: no implicit padding)
SIZES = {
    "fuse_in_header": 40, "fuse_out_header": 16, "fuse_attr": 88, "fuse_entry_out": 128,
    "fuse_attr_out": 104, "fuse_forget_in": 8, "fuse_forget_one": 16, "fuse_batch_forget_in": 8,
    "fuse_getattr_in": 16, "fuse_setattr_in": 88, "fuse_mknod_in": 16, "fuse_mkdir_in": 8,
    "fuse_rename_in": 8, "fuse_rename2_in": 16, "fuse_link_in": 8, "fuse_open_in": 8,
    "fuse_create_in": 16, "fuse_open_out": 16, "fuse_release_in": 24, "fuse_flush_in": 24,
    "fuse_read_in": 40, "fuse_write_in": 40, "fuse_write_out": 8, "fuse_kstatfs": 80,
    "fuse_statfs_out": 80, "fuse_fsync_in": 16, "fuse_access_in": 8, "fuse_init_in": 64,
    "fuse_init_out": 64, "fuse_dirent": 24, "fuse_direntplus": 152, "fuse_interrupt_in": 8,
    "fuse_file_lock": 24, "fuse_lk_in": 48, "fuse_lk_out": 24, "fuse_setxattr_in": 16,
    "fuse_getxattr_in": 8, "fuse_getxattr_out": 8, "fuse_fallocate_in": 32, "fuse_lseek_in": 24,
    "fuse_lseek_out": 8, "fuse_copy_file_range_in": 56, "fuse_syncfs_in": 8, "fuse_ioctl_in": 32,
    "fuse_ioctl_out": 16, "fuse_poll_in": 24, "fuse_poll_out": 8, "fuse_bmap_in": 16,
    "fuse_bmap_out": 8,
}

CONSTANTS = [
    "FUSE_KERNEL_VERSION", "FUSE_ROOT_ID",
    "FUSE_ASYNC_READ", "FUSE_POSIX_LOCKS", "FUSE_ATOMIC_O_TRUNC", "FUSE_EXPORT_SUPPORT",
    "FUSE_BIG_WRITES", "FUSE_DONT_MASK", "FUSE_FLOCK_LOCKS", "FUSE_AUTO_INVAL_DATA",
    "FUSE_DO_READDIRPLUS", "FUSE_READDIRPLUS_AUTO", "FUSE_ASYNC_DIO", "FUSE_WRITEBACK_CACHE",
    "FUSE_PARALLEL_DIROPS", "FUSE_MAX_PAGES", "FUSE_CACHE_SYMLINKS", "FUSE_INIT_EXT",
    "FUSE_SECURITY_CTX", "FUSE_HAS_INODE_DAX",
    "FATTR_MODE", "FATTR_UID", "FATTR_GID", "FATTR_SIZE", "FATTR_ATIME", "FATTR_MTIME",
    "FATTR_FH", "FATTR_ATIME_NOW", "FATTR_MTIME_NOW", "FATTR_LOCKOWNER", "FATTR_CTIME",
    "FATTR_KILL_SUIDGID", "FOPEN_DIRECT_IO", "FOPEN_KEEP_CACHE", "FOPEN_CACHE_DIR",
    "FUSE_GETATTR_FH", "FUSE_FSYNC_FDATASYNC", "FUSE_COMPAT_INIT_OUT_SIZE",
    "FUSE_COMPAT_22_INIT_OUT_SIZE", "FUSE_LK_FLOCK", "FUSE_SETXATTR_ACL_KILL_SGID",
    "FUSE_IOCTL_COMPAT", "FUSE_IOCTL_UNRESTRICTED", "FUSE_IOCTL_RETRY", "FUSE_IOCTL_32BIT",
    "FUSE_IOCTL_DIR", "FUSE_POLL_SCHEDULE_NOTIFY", "FUSE_ATTR_SUBMOUNT", "FUSE_ATTR_DAX",
    "FUSE_COMPAT_SETXATTR_IN_SIZE", "FUSE_RELEASE_FLOCK_UNLOCK", "FUSE_HANDLE_KILLPRIV_V2",
    "FUSE_SUBMOUNTS", "FUSE_SETXATTR_EXT", "FUSE_POSIX_ACL", "FUSE_WRITE_KILL_SUIDGID",
    "FUSE_OPEN_KILL_SUIDGID",
]


def _abi_value(name: str) -> int:
    short = {"FUSE_KERNEL_VERSION": "KERNEL_VERSION", "FUSE_KERNEL_MINOR_VERSION": "KERNEL_MINOR_VERSION",
             "FUSE_ROOT_ID": "ROOT_ID"}.get(name, name)
    return getattr(abi, short)


def test_sizes_table():
    for name, size in SIZES.items():
        assert getattr(abi, name).size == size, name


def test_struct_formats_are_little_endian():
    for name in SIZES:
        assert getattr(abi, name).format.startswith("<"), name


def test_opcodes():
    assert abi.Opcode.LOOKUP == 1 and abi.Opcode.INIT == 26 and abi.Opcode.READDIRPLUS == 44
    assert abi.Opcode.RENAME2 == 45 and abi.Opcode.TMPFILE == 51
    assert abi.Opcode.STATX == abi.MAX_OPCODE == 52
    # 7.41: the header here is 7.38; 7.39-7.41 add STATX and opt-in INIT flags only
    assert (abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION) == (7, 41)
    # 7.39 structs (not in the 7.38 header the table above was read from)
    assert (abi.fuse_statx_in.size, abi.fuse_statx.size, abi.fuse_statx_out.size) == (24, 256, 288)


@pytest.mark.skipif(not (os.path.exists(HEADER) and shutil.which("cc")), reason="needs cc and fuse.h")
def test_against_compiled_header(tmp_path):
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <linux/fuse.h>", "int main(void) {"]
    for name in SIZES:
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
    for name in CONSTANTS:
        lines.append(f'printf("{name} %llu\\n", (unsigned long long)({name}));')
    header_ops = [op for op in abi.Opcode if op <= 51]  # the 7.38 header ends at TMPFILE
    for op in header_ops:
        lines.append(f'printf("FUSE_{op.name} %llu\\n", (unsigned long long)(FUSE_{op.name}));')
    lines.append('printf("FUSE_NAME_OFFSET %zu\\n", (size_t)FUSE_NAME_OFFSET);')
    lines.append("return 0; }")
    src = tmp_path / "sizes.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "sizes"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    out = dict(line.split() for line in subprocess.run([str(exe)], check=True, capture_output=True,
                                                         text=True).stdout.splitlines())
    for name, size in SIZES.items():
        assert int(out[name]) == getattr(abi, name).size, name
    for name in CONSTANTS:
        assert int(out[name]) == _abi_value(name), name
    for op in header_ops:
        assert int(out[f"FUSE_{op.name}"]) == op.value, op.name
    assert int(out["FUSE_NAME_OFFSET"]) == abi.FUSE_NAME_OFFSET


def test_header_round_trip():
    raw = abi.fuse_in_header.pack(56, 1, 7, 1, 1000, 100, 42, 0, 0)
    assert raw == bytes.fromhex("38000000 01000000 0700000000000000 0100000000000000"
                                " e8030000 64000000 2a000000 0000 0000".replace(" ", ""))
    assert abi.fuse_in_header.unpack(raw) == (56, 1, 7, 1, 1000, 100, 42, 0, 0)
    assert abi.fuse_out_header.pack(16, -2, 7) == struct.pack("<IiQ", 16, -2, 7)


def test_fs_api_constants_match_abi():
    from vhostfs.fs import api

    for name in ("FATTR_MODE", "FATTR_UID", "FATTR_GID", "FATTR_SIZE", "FATTR_ATIME",
                 "FATTR_MTIME", "FATTR_FH", "FATTR_ATIME_NOW", "FATTR_MTIME_NOW",
                 "FOPEN_DIRECT_IO", "FOPEN_KEEP_CACHE", "FOPEN_CACHE_DIR", "FOPEN_NOFLUSH",
                 "FOPEN_PARALLEL_DIRECT_WRITES", "FATTR_LOCKOWNER", "FATTR_CTIME",
                 "FATTR_KILL_SUIDGID"):
        assert getattr(api, name) == getattr(abi, name), name
    for name in ("RELEASE_FLOCK_UNLOCK", "WRITE_KILL_SUIDGID", "OPEN_KILL_SUIDGID", "ATTR_SUBMOUNT"):
        assert getattr(api, name) == getattr(abi, "FUSE_" + name), name
    for name in ("POSIX_LOCKS", "FLOCK_LOCKS", "DO_READDIRPLUS", "READDIRPLUS_AUTO",
                 "WRITEBACK_CACHE", "HANDLE_KILLPRIV", "POSIX_ACL", "SUBMOUNTS",
                 "HANDLE_KILLPRIV_V2", "SETXATTR_EXT", "SECURITY_CTX"):
        assert getattr(api, "INIT_" + name) == getattr(abi, "FUSE_" + name), name
