"""Boot a QEMU guest on a virtio-fs share served by a vhost-user backend.

Two ways to use it:

* ``GuestRunner(share).run(script)``: one boot, one command (the command travels in
  the per-run initramfs archive), the guest powers off after it;
* ``with GuestRunner(share).session() as g: g.run(a); g.run(b)``: one boot, many
  commands, sent over the serial console (base64, framed by markers), so a test suite
  pays for one ~5-10 s TCG boot only.

Everything started here (backend, QEMU) runs in its own process group, dies with us
(``PR_SET_PDEATHSIG``) and is killed on every error, timeout and signal path.
"""
from __future__ import annotations

import atexit
import base64
import ctypes
import dataclasses
import os
import pathlib
import queue
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import Callable

from vhostfs.guestrun import initramfs, kernel as kernel_mod, qemu

C_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
BACKEND_ALIASES = {
    "virtiofsd": C_VIRTIOFSD + " --socket-path={socket} -o source={shared_dir} -o cache=auto",
}
# Kernel noise is silenced at its source: console loglevel 1 from the command line and
# /init, and nothing before the BEGIN marker is streamed.  Lines are not filtered by
# their look: `dmesg` output in a command must reach the caller intact.
APPEND = "console=ttyS0 panic=-1 quiet loglevel=1 printk.devkmsg=off"


class GuestError(RuntimeError):
    """The guest could not be booted, did not answer in time, or broke the protocol."""


class GuestTimeout(GuestError):
    """The guest did not finish booting or the command did not finish in time."""


@dataclasses.dataclass
class Result:
    status: int                       # the command's exit status in the guest
    output: str                       # its stdout+stderr (console lines between the markers)
    backend_log: pathlib.Path | None  # the backend's stdout+stderr log file
    duration: float                   # seconds, command only (session) or whole run (one-shot)
    shutdown: "Shutdown | None" = None  # one-shot runs: how the guest and backend ended


@dataclasses.dataclass
class Shutdown:
    umount_status: int | None         # status of `umount /mnt` in the guest (None: not seen)
    qemu_status: int | None
    backend_status: int | None        # None: the backend did not exit by itself (killed)


def backend_argv(backend: str | list[str], *, socket: str, shared_dir: str, tag: str,
                 log_level: str) -> list[str]:
    """``vhostfs`` (default), ``virtiofsd`` (QEMU's C reference) or a command template
    with ``{socket}``, ``{shared_dir}``, ``{tag}``, ``{log_level}`` placeholders."""
    if backend == "vhostfs":
        return [sys.executable, "-m", "vhostfs", "--socket-path", socket, "--shared-dir",
                shared_dir, "--tag", tag, "--log-level", log_level]
    template = BACKEND_ALIASES.get(backend, backend) if isinstance(backend, str) else backend
    words = shlex.split(template) if isinstance(template, str) else list(template)
    if not any("{socket}" in w for w in words):
        raise ValueError(f"backend command {words!r} has no {{socket}} placeholder")
    values = dict(socket=socket, shared_dir=shared_dir, tag=tag, log_level=log_level)
    return [w.format(**values) for w in words]


def _die_with_parent(sig: int) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def pre_exec() -> None:
        libc.prctl(1, sig)  # PR_SET_PDEATHSIG

    return pre_exec


def unix_socket_listening(path: str) -> bool:
    """True if some process listens on the unix socket ``path`` (without connecting:
    a vhost-user backend serves exactly one connection)."""
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
                    return True
    except OSError:
        pass
    return False


_LIVE: "weakref.WeakSet[GuestSession]" = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for sess in list(_LIVE):
        sess.kill()


class GuestRunner:
    def __init__(self, share: str | os.PathLike, *, tag: str = "vhostfs",
                 kernel: str | None = None, kernel_root: str | os.PathLike | None = None,
                 backend: str | list[str] = "vhostfs",
                 memory: str = "1G", smp: int = 2, queue_size: int = 1024,
                 timeout: float = 600.0, boot_timeout: float = 120.0,
                 log_level: str = "info", pvh: bool = True, mount_opts: str = "",
                 keep: bool = False, echo: Callable[[str], None] | None = None,
                 extra_qemu: list[str] | None = None) -> None:
        self.share = pathlib.Path(share).resolve()
        if not self.share.is_dir():
            raise FileNotFoundError(f"share {self.share} is not a directory")
        self.tag, self.backend, self.memory, self.smp = tag, backend, memory, smp
        self.queue_size, self.timeout, self.boot_timeout = queue_size, timeout, boot_timeout
        self.log_level, self.pvh, self.mount_opts, self.keep = log_level, pvh, mount_opts, keep
        self.echo, self.extra_qemu = echo, list(extra_qemu or [])
        # kernel_root: an extracted kernel package (boot/vmlinuz-*, lib/modules/<version>),
        # e.g. the Debian backports kernel of scripts/fetch-kernel-backports.sh.
        self.kernel = kernel_mod.find_kernel(kernel, root=kernel_root)

    def session(self) -> "GuestSession":
        return GuestSession(self, mode="session")

    def run(self, script: str) -> Result:
        """One boot running ``script`` (sh) in the share; the guest then powers off."""
        start = time.monotonic()
        sess = GuestSession(self, mode="oneshot", command=script)
        try:
            sess.start(deadline=start + self.timeout)
            status, output = sess.collect(deadline=start + self.timeout)
            sess.keep_rundir = status != 0   # keep the backend log of a failed command
            shutdown = sess.close(deadline=time.monotonic() + 60)
            if shutdown.umount_status != 0 or shutdown.backend_status != 0:
                sess.keep_rundir = True
                sess._cleanup()
        except BaseException:
            sess.kill()
            raise
        return Result(status, output, sess.backend_log, time.monotonic() - start, sess.shutdown)


class GuestSession:
    def __init__(self, runner: GuestRunner, *, mode: str, command: str | None = None) -> None:
        self.r, self.mode, self.command = runner, mode, command
        self.nonce = secrets.token_hex(8)
        self.marker = re.compile(r"@@VHOSTFS-([A-Z]+)-" + self.nonce + r"(?: ([^@]*))?@@")
        self.rundir = pathlib.Path(tempfile.mkdtemp(prefix="vhostfs-guest-"))
        self.socket = str(self.rundir / "vhost-user-fs.sock")
        self.backend_log = self.rundir / "backend.log"
        self.qemu_log = self.rundir / "qemu.log"
        self.console: list[str] = []            # everything the guest printed
        self.backend: subprocess.Popen | None = None
        self.qemu: subprocess.Popen | None = None
        self.shutdown: Shutdown | None = None
        self.boot_seconds: float | None = None
        self._lines: "queue.Queue[str | None]" = queue.Queue()
        self._ready = False
        self._failed = False
        self.keep_rundir = False
        self._killed = False

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> "GuestSession":
        try:
            self.start(deadline=time.monotonic() + self.r.boot_timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close(deadline=time.monotonic() + 60)
                return
            except BaseException:
                self.kill()
                raise
        self.kill()

    def start(self, deadline: float) -> None:
        _LIVE.add(self)
        t0 = time.monotonic()
        argv = backend_argv(self.r.backend, socket=self.socket, shared_dir=str(self.r.share),
                            tag=self.r.tag, log_level=self.r.log_level)
        with open(self.backend_log, "wb") as log:
            self.backend = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True,
                                            preexec_fn=_die_with_parent(signal.SIGTERM))
        while not unix_socket_listening(self.socket):
            if self.backend.poll() is not None:
                self._fail(f"backend exited with status {self.backend.returncode} before listening"
                           f" on {self.socket}: {shlex.join(argv)}")
            if time.monotonic() > deadline:
                self._fail(f"backend did not listen on {self.socket} in time")
            time.sleep(0.02)

        kern = str(kernel_mod.cached_vmlinux(self.r.kernel)) if self.r.pvh else str(self.r.kernel.image)
        initrd = initramfs.write_initrd(
            self.rundir / "initrd.cpio.gz",
            initramfs.base_initramfs(self.r.kernel.version, self.r.kernel.modules_dir),
            initramfs.run_archive(nonce=self.nonce, tag=self.r.tag, mode=self.mode,
                                  command=self.command, mount_opts=self.r.mount_opts))
        argv = qemu.build_argv(kernel=kern, initrd=str(initrd), append=APPEND, socket=self.socket,
                               tag=self.r.tag, memory=self.r.memory, smp=self.r.smp,
                               queue_size=self.r.queue_size, extra=self.r.extra_qemu)
        (self.rundir / "qemu.argv").write_text(shlex.join(argv) + "\n")
        with open(self.qemu_log, "wb") as log:
            self.qemu = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, start_new_session=True,
                                         preexec_fn=_die_with_parent(signal.SIGKILL))
        threading.Thread(target=self._reader, name="guest-console", daemon=True).start()
        self._expect("MOUNTED", deadline)
        self.boot_seconds = time.monotonic() - t0

    def _reader(self) -> None:
        assert self.qemu and self.qemu.stdout
        for raw in self.qemu.stdout:
            self._lines.put(raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", ""))
        self._lines.put(None)

    # -- console protocol ------------------------------------------------------------
    def _next(self, deadline: float) -> str | None:
        """The next console line; None when QEMU closed its output."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail("timed out waiting for the guest", GuestTimeout)
            try:
                line = self._lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is not None:
                self.console.append(line)
            return line

    def _expect(self, kind: str, deadline: float) -> str:
        """Skip lines until marker ``kind``; return its value."""
        while True:
            line = self._next(deadline)
            if line is None:
                self._fail(f"QEMU exited while waiting for {kind}")
            m = self.marker.search(line)
            if m and m.group(1) == "FAIL":
                self._fail(f"guest init failed: {m.group(2)}")
            if m and m.group(1) == kind:
                return m.group(2) or ""

    def collect(self, deadline: float) -> tuple[int, str]:
        """Lines between BEGIN and EXIT: (status, output)."""
        self._expect("BEGIN", deadline)
        out: list[str] = []
        while True:
            line = self._next(deadline)
            if line is None:
                self._fail("QEMU exited while the command was running")
            m = self.marker.search(line)
            if m and m.group(1) in ("EXIT", "FAIL"):
                if m.group(1) == "FAIL":
                    self._fail(f"guest init failed: {m.group(2)}")
                if line[:m.start()]:
                    out.append(line[:m.start()])
                    self._emit(line[:m.start()])
                return int(m.group(2)), "".join(s + "\n" for s in out)
            out.append(line)
            self._emit(line)

    def _emit(self, line: str) -> None:
        if self.r.echo:
            self.r.echo(line)

    def _send(self, data: str) -> None:
        assert self.qemu and self.qemu.stdin
        try:
            self.qemu.stdin.write(data.encode())
            self.qemu.stdin.flush()
        except OSError as exc:
            self._fail(f"cannot write to the guest console: {exc}")

    def run(self, script: str, timeout: float | None = None) -> Result:
        """Run ``script`` with busybox sh in the share (cwd /mnt); wait for its status."""
        if self.mode != "session":
            raise GuestError("run() needs a session (GuestRunner.session())")
        start = time.monotonic()
        deadline = start + (timeout or self.r.timeout)
        try:
            if not self._ready:
                self._expect("READY", deadline)
            self._ready = False
            encoded = base64.encodebytes(script.encode()).decode()
            self._send("RUN\n" + encoded + "@@END@@\n")
            status, output = self.collect(deadline)
        except BaseException:
            self.kill()
            raise
        return Result(status, output, self.backend_log, time.monotonic() - start)

    # -- shutdown --------------------------------------------------------------------
    def close(self, deadline: float) -> Shutdown:
        """Clean shutdown: umount in the guest, power off, wait for QEMU and the backend."""
        if self.shutdown:
            return self.shutdown
        if self._killed:   # kill_qemu()/kill() came first: nothing left to shut down cleanly
            self.kill()
            self.shutdown = Shutdown(None, self.qemu.returncode if self.qemu else None,
                                     self.backend.returncode if self.backend else None)
            return self.shutdown
        if self.mode == "session":
            if not self._ready:
                self._expect("READY", deadline)
            self._send("QUIT\n")
        umount = int(self._expect("UMOUNT", deadline))
        while self._next(deadline) is not None:
            pass
        assert self.qemu
        qemu_rc = self.qemu.wait(max(1.0, deadline - time.monotonic()))
        backend_rc = self.wait_backend(15.0)
        self.shutdown = Shutdown(umount, qemu_rc, backend_rc)
        self._cleanup()
        return self.shutdown

    def wait_backend(self, timeout: float) -> int | None:
        """The backend's exit status, or None if it did not exit within ``timeout``."""
        assert self.backend
        try:
            return self.backend.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_qemu(self) -> None:
        """Kill QEMU abruptly (SIGKILL), as a crashed frontend would disappear."""
        self._killed = True
        if self.qemu and self.qemu.poll() is None:
            _killpg(self.qemu, signal.SIGKILL)
            self.qemu.wait()

    def kill(self) -> None:
        """Stop everything started by this session, now. Idempotent."""
        self._killed = True
        for proc, sig in ((self.qemu, signal.SIGKILL), (self.backend, signal.SIGTERM)):
            if proc and proc.poll() is None:
                _killpg(proc, sig)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    _killpg(proc, signal.SIGKILL)
                    proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        _LIVE.discard(self)
        if self.qemu and self.qemu.stdin and not self.qemu.stdin.closed:
            try:
                self.qemu.stdin.close()
            except OSError:
                pass
        if not (self.r.keep or self._failed or self.keep_rundir) and self.rundir.exists():
            shutil.rmtree(self.rundir, ignore_errors=True)

    def _fail(self, why: str, cls: type[GuestError] = GuestError) -> None:
        self._failed = True
        self.kill()
        tail = "\n".join("  | " + s for s in self.console[-30:])
        qlog = self.qemu_log.read_text(errors="replace").strip() if self.qemu_log.exists() else ""
        raise cls(
            f"{why}\n  backend log: {self.backend_log}\n  qemu log: {self.qemu_log}"
            + (f"\n  qemu stderr: {qlog[-2000:]}" if qlog else "")
            + (f"\n  last console lines:\n{tail}" if tail else ""))


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
