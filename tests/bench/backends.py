"""The backends under test: how to start each one, and what it costs (/proc).

A :class:`BackendSpec` turns (socket path, shared dir, request queues) into an argv;
:class:`BackendProcess` runs it in its own session with its stderr in a log file, and
reads the CPU time (utime + stime) and peak RSS (VmHWM) of its whole process tree from
/proc (QEMU's C virtiofsd forks into a sandbox child; the Rust wrapper execs).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
REFERENCE_TOOL = Path("/work/shared/tools/reference-virtiofsd")
QEMU_VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BackendUnavailable(Exception):
    """The backend cannot be started on this machine (reason in the message)."""


@dataclass
class BackendSpec:
    name: str
    argv: Callable[[str, str, int], list[str]]     # (socket, shared_dir, request_queues)
    version: str = ""
    notes: list[str] = field(default_factory=list)
    is_reference: bool = False
    #: options that make the backend reference inodes by file handle instead of one
    #: O_PATH fd each (the RSS item: 100,000 inodes do not fit a 20,000-fd limit)
    file_handle_args: list[str] = field(default_factory=list)


def _vhostfs_spec() -> BackendSpec:
    py = sys.executable
    try:
        help_text = subprocess.run([py, "-m", "vhostfs", "--help"], cwd=REPO, capture_output=True,
                                   text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendUnavailable(f"vhostfs --help failed: {exc}") from None
    if "--socket-path" not in help_text:
        raise BackendUnavailable("`python3 -m vhostfs --help` shows no --socket-path")
    has_queues = "--num-request-queues" in help_text
    # Same isolation as the Rust reference (--sandbox none): one process, so its CPU and RSS
    # are the file server's, not a waiting sandbox parent's.
    has_sandbox = "--sandbox" in help_text

    def argv(sock: str, shared: str, queues: int) -> list[str]:
        cmd = [py, "-m", "vhostfs", "--socket-path", sock, "--shared-dir", shared, "--log-level", "error"]
        if has_queues:
            cmd += ["--num-request-queues", str(queues)]
        if has_sandbox:
            cmd += ["--sandbox", "none"]
        return cmd

    notes = ["--sandbox none"] if has_sandbox else []
    if not has_queues:
        notes.append("CLI has no --num-request-queues: default queue count")
    fh_args = ["--inode-file-handles=prefer"] if "--inode-file-handles" in help_text else []
    return BackendSpec("vhostfs", argv, _git_version(), notes, file_handle_args=fh_args)


def _git_version() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return f"git {out}" if out else ""
    except OSError:
        return ""


def _rust_spec() -> BackendSpec:
    if not REFERENCE_TOOL.exists():
        raise BackendUnavailable(f"{REFERENCE_TOOL} not found")
    proc = subprocess.run(["sh", str(REFERENCE_TOOL)], capture_output=True, text=True, timeout=900)
    path = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode or not path or not os.access(path, os.X_OK):
        raise BackendUnavailable(f"reference-virtiofsd failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()

    def argv(sock: str, shared: str, queues: int) -> list[str]:
        return [path, "--socket-path", sock, "--shared-dir", shared, "--sandbox", "none"]

    # 1.13 has --inode-file-handles; mandatory, so a refusal is an error, not a silent
    # fallback to fds (it runs as root here: open_by_handle_at needs CAP_DAC_READ_SEARCH)
    return BackendSpec("virtiofsd-rust", argv, version, ["--sandbox none, default thread pool"],
                       is_reference=True, file_handle_args=["--inode-file-handles=mandatory"])


def _c_spec(probe_dir: str) -> BackendSpec:
    if not os.access(QEMU_VIRTIOFSD, os.X_OK):
        raise BackendUnavailable(f"{QEMU_VIRTIOFSD} not installed (Debian package qemu-system-common)")
    version = subprocess.run([str(QEMU_VIRTIOFSD), "--version"], capture_output=True, text=True,
                             timeout=30).stdout.strip().splitlines()
    # namespace is the default sandbox; containers often refuse it (unshare/pivot_root), then
    # chroot is what the help text recommends.
    for sandbox in ("namespace", "chroot"):
        def argv(sock: str, shared: str, queues: int, sandbox=sandbox) -> list[str]:
            return [str(QEMU_VIRTIOFSD), f"--socket-path={sock}", "-o", f"source={shared}",
                    "-o", "cache=auto", "-o", f"sandbox={sandbox}"]
        spec = BackendSpec("virtiofsd-c", argv, version[0] if version else "",
                           [f"-o cache=auto -o sandbox={sandbox}"], is_reference=True)
        if _probe(spec, probe_dir):
            return spec
    raise BackendUnavailable("QEMU's C virtiofsd served no INIT with sandbox=namespace nor chroot")


def _probe(spec: BackendSpec, probe_dir: str) -> bool:
    """Start the backend and complete one FUSE INIT through the simulated frontend."""
    from tests.support.fuse_client import VirtioFsConnection

    sock = os.path.join(probe_dir, f"probe-{spec.name}.sock")
    shared = os.path.join(probe_dir, "probe-share")
    os.makedirs(shared, exist_ok=True)
    proc = BackendProcess(spec, sock, shared, 1, os.path.join(probe_dir, f"probe-{spec.name}.log"))
    try:
        proc.start()
        conn = VirtioFsConnection.connect(sock, request_queues=1, depth=1, data_size=4096,
                                          connect_timeout=5)
        try:
            conn.init()
        finally:
            conn.close()
        return True
    except Exception:
        return False
    finally:
        proc.stop()


def discover(names: list[str], probe_dir: str) -> tuple[list[BackendSpec], dict[str, str]]:
    """Specs of the backends that can run here, and why the others cannot."""
    makers = {"vhostfs": _vhostfs_spec, "virtiofsd-rust": _rust_spec,
              "virtiofsd-c": lambda: _c_spec(probe_dir)}
    specs, skipped = [], {}
    for name in names:
        if name not in makers:
            raise SystemExit(f"unknown backend {name!r} (known: {', '.join(makers)})")
        try:
            specs.append(makers[name]())
        except (BackendUnavailable, OSError, subprocess.SubprocessError) as exc:
            skipped[name] = str(exc)
    return specs, skipped


# -- one running backend ---------------------------------------------------------------------
class BackendProcess:
    def __init__(self, spec: BackendSpec, sock: str, shared: str, queues: int, log_path: str) -> None:
        self.spec = spec
        self.sock = sock
        self.shared = shared
        self.queues = queues
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        argv = self.spec.argv(self.sock, self.shared, self.queues)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=REPO, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tree(self) -> list[int]:
        """This backend's pid and all its descendants' (by scanning /proc for ppids)."""
        parents: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(parents.get(pid, ()))
        return out

    def cpu_seconds(self) -> float:
        """utime + stime of the process tree (all threads; reaped children via cutime/cstime)."""
        total = 0
        for pid in self.tree():
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            # fields[0] is state (field 3): utime=14, stime=15, cutime=16, cstime=17
            total += sum(int(x) for x in fields[11:15])
        return total / CLK_TCK

    def _status_kib(self, key: str) -> int:
        """Sum of one /proc/PID/status field (in kB) over the process tree."""
        total = 0
        for pid in self.tree():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith(key):
                            total += int(line.split()[1])
                            break
            except OSError:
                continue
        return total

    def peak_rss_kib(self) -> int:
        """VmHWM: peak resident set, including the guest RAM pages the backend touched."""
        return self._status_kib("VmHWM:")

    def rss_kib(self) -> int:
        return self._status_kib("VmRSS:")

    def anon_rss_kib(self) -> int:
        """RssAnon: the backend's private memory now (guest RAM is shared memfd: not in it)."""
        return self._status_kib("RssAnon:")

    def stop(self, timeout: float = 5.0) -> int | None:
        """Wait for the exit a closed connection causes; SIGTERM, then SIGKILL, our own child."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)     # its own session: only what we started
            except ProcessLookupError:
                break
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.poll()

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

