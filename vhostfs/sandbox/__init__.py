"""The sandbox: vhostfs as a process a hostile guest cannot use against the host.

``--sandbox`` (virtiofsd's meaning):

namespace
    The daemon forks; the child is PID 1 of a new PID namespace, in new mount and
    network namespaces (no network at all), with the shared directory as its root
    (bind-mounted onto itself, ``pivot_root``, the old root detached).  /proc: a fresh
    procfs is mounted before the pivot and ``/proc/self/fd`` opened; once the old root
    is detached that directory is the process's working directory, and the passthrough
    re-opens inodes through the relative path ``./N`` (``PROC_SELF_FD``), which nothing
    in the share can shadow.  The parent stays outside, forwards SIGTERM/SIGINT, removes
    the socket path at the end and exits with the child's status.
chroot
    No namespaces: ``chroot`` into the shared directory, /proc/self/fd as the working
    directory.  Weaker, for hosts that forbid namespaces: same PID and network view as
    the host, and the working directory lies outside the new root (vhostfs only ever
    opens ``./N`` from it; in namespace mode that procfs is detached, so even ``..``
    from it leads nowhere).
none
    Nothing is changed.

With namespace or chroot the process then drops supplementary groups and every
capability but the passthrough's (``--modcaps``; see caps.py).  ``--seccomp``
(seccomp.py) applies in every mode.  All of it happens after the vhost-user socket
listens and before any thread starts.  Everything Python will import later is
imported first (the host's /usr is not visible inside).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import signal
import time

from vhostfs.errors import ConfigError
from vhostfs.log import get_logger
from vhostfs.sandbox import _libc, caps

log = get_logger("vhostfs.sandbox")

MODES = ("namespace", "chroot", "none")


class SandboxError(OSError):
    """The sandbox could not be set up (the message names the option to change)."""


@dataclasses.dataclass
class Jail:
    mode: str
    shared_dir: str              # the share as the (possibly sandboxed) process sees it
    sees_host: bool = True       # host paths (the socket path) resolve as on the host
    child_pid: int | None = None  # set in the supervising parent (namespace mode)

    @property
    def is_parent(self) -> bool:
        return self.child_pid is not None

    def wait_child(self) -> int:
        """Parent side: forward SIGTERM/SIGINT/SIGHUP (and SIGUSR1, the metrics dump) to
        the sandboxed child until it exits; returns its exit status (128 + signal if it
        was killed)."""
        pid = self.child_pid
        # The forwarding handlers were installed at the fork (_fork_with_forwarding).
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            log.error("sandboxed daemon killed by a signal", signal=signal.Signals(sig).name)
            return 128 + sig
        return os.WEXITSTATUS(status)


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def _fork_with_forwarding() -> int:
    """fork() with no window in which a signal for the daemon is lost.

    The forwarded signals stay blocked across the fork: the parent unblocks them only
    once its handlers forward to the child, and the child once it runs with the
    daemon's own handlers.  Without this, a SIGTERM landing between fork() and the
    parent's handler swap ended the parent alone and left the child serving (and
    holding the parent's stdio open) outside anyone's control.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        raise
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return 0

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return pid


def default_mode() -> str:
    """namespace when running as root, none otherwise (an unprivileged user cannot
    create the mount namespace or chroot)."""
    return "namespace" if os.geteuid() == 0 else "none"


def preload() -> None:
    """Import what the daemon may import lazily, while /usr is still visible."""
    import vhostfs
    skip = ("vhostfs.guestrun", "vhostfs.cli", "vhostfs.__main__")
    for info in pkgutil.walk_packages(vhostfs.__path__, "vhostfs."):
        if info.name.startswith(skip):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:      # an optional part (e.g. a cffi module not built)
            pass
    for name in ("json", "traceback", "linecache", "encodings.idna", "encodings.ascii",
                 "encodings.latin_1", "logging.handlers", "queue", "concurrent.futures",
                 "concurrent.futures.thread", "selectors", "weakref", "tokenize"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    time.localtime()             # reads /etc/localtime now


def _proc_fd() -> int:
    if not os.path.isdir("/proc/self/fd"):
        raise SandboxError(2, "/proc must be mounted (the passthrough re-opens inodes "
                              "through /proc/self/fd)")
    return os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _use_proc_cwd(proc_fd: int) -> None:
    from vhostfs.fs.passthrough import inodes
    os.fchdir(proc_fd)
    os.close(proc_fd)
    inodes.PROC_SELF_FD = "."


def _forbidden(exc: OSError, what: str) -> SandboxError:
    return SandboxError(exc.errno, f"--sandbox namespace: the host does not allow {what} "
                                   f"({exc.strerror}); run with --sandbox chroot or --sandbox none")


def _enter_namespace(shared: str) -> Jail:
    try:
        _libc.unshare(_libc.CLONE_NEWPID)
    except OSError as exc:
        raise _forbidden(exc, "a new PID namespace") from None
    pid = _fork_with_forwarding()
    if pid:
        return Jail("namespace", shared, sees_host=True, child_pid=pid)
    # -- the child: PID 1 of the new namespace -----------------------------------------
    _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setpgid(0, 0)      # signals reach it through the parent only (no double SIGTERM)
    try:
        _libc.unshare(_libc.CLONE_NEWNS | _libc.CLONE_NEWNET)
    except OSError as exc:
        raise _forbidden(exc, "new mount and network namespaces") from None
    _libc.mount(None, "/", None, _libc.MS_SLAVE | _libc.MS_REC)
    _libc.mount("proc", "/proc", "proc",
                _libc.MS_NODEV | _libc.MS_NOEXEC | _libc.MS_NOSUID | _libc.MS_RELATIME)
    proc_fd = _proc_fd()
    _libc.mount(shared, shared, None, _libc.MS_BIND | _libc.MS_REC)
    os.chdir(shared)
    _libc.pivot_root(".", ".")
    _libc.umount2(".", _libc.MNT_DETACH)
    os.chdir("/")
    _use_proc_cwd(proc_fd)
    return Jail("namespace", "/", sees_host=False)


def _enter_chroot(shared: str) -> Jail:
    proc_fd = _proc_fd()
    try:
        os.chroot(shared)
    except OSError as exc:
        os.close(proc_fd)
        raise SandboxError(exc.errno, f"--sandbox chroot: chroot {shared}: {exc.strerror} "
                                      f"(needs CAP_SYS_CHROOT; run with --sandbox none)") from None
    _use_proc_cwd(proc_fd)
    return Jail("chroot", "/", sees_host=False)


def apply(daemon) -> Jail:
    """The daemon side of :func:`enter`: called by ``Daemon.run`` once the socket
    listens.  Sets the inode bound (``config.max_inodes``); when the process now sees
    the share as "/", serves it from there (the root inode is re-opened: no fd from
    outside the sandbox stays in use) and forgets the socket path (it names nothing inside;
    the parent outside removes it)."""
    config = daemon.config
    jail = enter(config)
    if jail.is_parent:
        return jail
    if jail.shared_dir != config.shared_dir:
        daemon.fs.inodes.reroot(os.open(jail.shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
    max_inodes = getattr(config, "max_inodes", None)
    if max_inodes:
        daemon.fs.inodes.max_inodes = max_inodes
    if not jail.sees_host and config.socket_path:
        daemon.config = dataclasses.replace(config, socket_path=None)
    return jail


def enter(config) -> Jail:
    """Apply ``config.sandbox``, the privilege drop and ``config.seccomp``.

    In namespace mode this forks: the returned Jail has ``is_parent`` in the parent,
    which must only ``wait_child()``.  Call with the listening socket already open and
    no other thread running.
    """
    mode = getattr(config, "sandbox", "none") or "none"
    action = getattr(config, "seccomp", "none") or "none"
    modcaps = getattr(config, "modcaps", None)
    if mode not in MODES:
        raise ConfigError(f"--sandbox: expected one of {', '.join(MODES)}, got {mode!r}")
    keep = caps.parse_modcaps(modcaps)
    shared = os.path.realpath(config.shared_dir)
    if mode != "none" or action != "none":
        preload()
    if action != "none":
        from vhostfs.sandbox import seccomp
        seccomp._lib()           # loaded now: the host's /usr/lib is not visible inside
    if mode == "namespace":
        jail = _enter_namespace(shared)
        if jail.is_parent:
            return jail
    elif mode == "chroot":
        jail = _enter_chroot(shared)
    else:
        jail = Jail("none", config.shared_dir)
    if mode != "none" or modcaps is not None:
        caps.drop_supplementary_groups()
        kept = caps.drop(keep)
        log.info("sandbox entered", mode=mode, pid=os.getpid(),
                 caps=",".join(sorted(n for n, c in caps.CAPS.items() if kept >> c & 1)))
    if action != "none":
        from vhostfs.sandbox import seccomp
        n = seccomp.install(action)
        log.info("seccomp filter installed", action=action, syscalls=n)
    return jail
