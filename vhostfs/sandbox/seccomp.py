"""Seccomp allow-list for the vhostfs process, through libseccomp (ctypes on
libseccomp.so.2: no headers or Python binding needed).

``--seccomp`` action for a syscall outside the list: ``kill`` (the process dies at
once, SIGSYS), ``trap`` (SIGSYS is delivered: the Python stack of every thread is
written to stderr, showing the call, then the process dies of SIGSYS), ``log``
(the call is allowed and the kernel logs it: the way to find a missing syscall),
``none`` (no filter).  The filter is installed with TSYNC (every thread) and
no_new_privs.

The list was built by tracing vhostfs (CPython 3.11, the passthrough, the vhost-user
transport, the queue threads) under the whole booted-guest test suite
(``strace -f``), plus the syscalls of the error paths the unit tests reach; it grows
only with a test that needs it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import faulthandler
import os
import signal
import sys

from vhostfs.log import get_logger

log = get_logger("vhostfs.sandbox")

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_TRAP = 0x00030000
SCMP_ACT_LOG = 0x7FFC0000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_FLTATR_CTL_NNP = 3
SCMP_FLTATR_CTL_TSYNC = 4
_NR_SCMP_ERROR = -1

ACTIONS = {"kill": SCMP_ACT_KILL_PROCESS, "trap": SCMP_ACT_TRAP, "log": SCMP_ACT_LOG}

ALLOWED = (
    # memory, threads, signals, time
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "futex", "futex_waitv",
    "set_robust_list", "get_robust_list", "rseq", "clone", "clone3", "exit", "exit_group",
    "gettid", "getpid", "getppid", "tgkill", "kill", "rt_sigaction", "rt_sigprocmask",
    "rt_sigreturn", "rt_sigtimedwait", "sigaltstack", "restart_syscall",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
    "sched_yield", "sched_getaffinity", "getrandom", "prlimit64", "getrlimit", "membarrier",
    "sysinfo", "uname", "getcwd", "chdir", "fchdir", "set_tid_address", "arch_prctl",
    # credentials (per-request fsuid/fsgid; capget for the logs)
    "getuid", "geteuid", "getgid", "getegid", "getgroups", "getresuid", "getresgid",
    "setfsuid", "setfsgid", "setresuid", "setresgid", "setuid", "setgid", "setgroups",
    "capget", "capset", "prctl", "umask",
    # fds, polling, eventfds, the vhost-user socket
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "preadv2", "pwritev2", "close", "close_range", "dup", "dup2", "dup3", "fcntl", "ioctl",
    "pipe2", "poll", "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl",
    "epoll_wait", "epoll_pwait", "eventfd2", "recvmsg", "sendmsg", "recvfrom", "sendto",
    "accept", "accept4", "shutdown", "getsockopt", "setsockopt", "getsockname",
    "getpeername", "socket", "connect", "bind", "listen", "lseek",
    # guest memory (SET_MEM_TABLE / DAX windows)
    "memfd_create", "msync", "mlock", "munlock", "fallocate", "sendfile", "copy_file_range",
    "splice",
    # the passthrough
    "openat", "openat2", "open", "newfstatat", "fstat", "lstat", "stat", "statx", "statfs",
    "fstatfs", "readlink", "readlinkat", "getdents64", "mkdirat", "mknodat", "symlinkat",
    "linkat", "unlinkat", "renameat", "renameat2", "fchmod", "fchmodat", "fchown",
    "fchownat", "ftruncate", "truncate", "utimensat", "fsync", "fdatasync", "syncfs",
    "flock", "faccessat", "faccessat2", "access", "setxattr", "fsetxattr", "lsetxattr",
    "getxattr", "fgetxattr", "lgetxattr", "listxattr", "flistxattr", "llistxattr",
    "removexattr", "fremovexattr", "lremovexattr", "name_to_handle_at",
    "open_by_handle_at", "fadvise64", "sync_file_range", "unlink", "rmdir", "mkdir",
    "rename", "chmod", "wait4", "getpgrp", "getpgid",
    # the same operations through older or newer entry points (glibc picks one by
    # version; unknown names are skipped at load time)
    "fchmodat2", "chown", "lchown", "link", "symlink", "mknod", "readahead", "getcpu",
)


_LIB = None


def _lib():
    """libseccomp, loaded once (before the sandbox hides the host's libraries)."""
    global _LIB
    if _LIB is not None:
        return _LIB
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise OSError(f"--seccomp: libseccomp is not installed ({exc}); install libseccomp2 "
                      f"or run with --seccomp none") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                     ctypes.c_uint]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    _LIB = lib
    return lib


def install(action: str, extra: tuple[str, ...] = ()) -> int:
    """Load the filter; returns the number of syscalls allowed.  ``action``: kill,
    trap or log.  Raises OSError when libseccomp is missing or the kernel refuses."""
    if action not in ACTIONS:
        raise ValueError(f"seccomp action {action!r}")
    lib = _lib()
    ctx = lib.seccomp_init(ACTIONS[action])
    if not ctx:
        raise OSError("--seccomp: seccomp_init failed")
    try:
        n = 0
        for name in ALLOWED + tuple(extra):
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == _NR_SCMP_ERROR:
                continue            # not a syscall on this architecture
            rc = lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0)
            if rc < 0:
                raise OSError(-rc, f"--seccomp: seccomp_rule_add({name}): {os.strerror(-rc)}")
            n += 1
        for attr in (SCMP_FLTATR_CTL_NNP, SCMP_FLTATR_CTL_TSYNC):
            rc = lib.seccomp_attr_set(ctx, attr, 1)
            if rc < 0:
                raise OSError(-rc, f"--seccomp: seccomp_attr_set: {os.strerror(-rc)}")
        if action == "trap":
            # SIGSYS: every thread's Python stack goes to stderr (where the call came
            # from), then the default action ends the process.  The trapped call must not
            # return: its "result" would be whatever the register held.
            log.info("seccomp trap: a blocked syscall dumps the Python stacks and ends vhostfs")
            faulthandler.register(signal.SIGSYS, file=sys.stderr, all_threads=True, chain=True)
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, f"--seccomp {action}: the kernel refused the filter: "
                          f"{os.strerror(-rc)} (run with --seccomp none)")
        return n
    finally:
        lib.seccomp_release(ctx)
