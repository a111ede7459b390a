"""Typed wrappers over the compiled helper ``vhostfs._hostsys``.

This is the only module that imports the cffi extension.  Ring atomics live here
because pure Python cannot express acquire/release ordering (virtio 1.2 §2.7.13).
Syscalls that Python's ``os`` lacks are wrapped below, each raising ``OSError``
with the errno the kernel gave.
"""
from __future__ import annotations

from vhostfs._hostsys import ffi, lib

load_acquire_u16 = lib.vhs_load_acquire_u16
store_release_u16 = lib.vhs_store_release_u16
fence_seq_cst = lib.vhs_fence_seq_cst


def buffer_address(buf) -> int:
    """Host virtual address of a writable buffer (an ``mmap``); caller keeps it alive."""
    return int(lib.vhs_buffer_address(ffi.from_buffer(buf, require_writable=True)))


def _raise_errno(what: str, *args) -> None:
    err = ffi.errno
    import os

    raise OSError(err, f"{what}: {os.strerror(err)}", *args)
