"""Live migration of a booted guest between two QEMU 10.0 instances, each with its own
vhostfs on the same shared directory (docs: vhostfs/migration).

QEMU 10.0 is Debian bookworm-backports' qemu-system-x86 (the first Debian QEMU whose
vhost-user-fs migrates through DEVICE_STATE), fetched privately by
scripts/fetch-qemu-backports.sh.

The guest (256 MiB, TCG) runs tests/guest/mighelper.c: it holds a cwd, an open file and
a MAP_SHARED mapping inside the share and keeps writing through both while re-reading a
source file (read replies written by vhostfs into guest memory) and listing its cwd.
Once it says "ready", source QEMU A is migrated to QEMU B (-incoming, -S) under that
load over QMP.  Then:

* dirty logging: vhostfs A remembers every guest page it marked in the dirty log while
  logging was on (VHOSTFS_DIRTY_WITNESS) and writes the list when its state is saved.
  With A stopped (post-migrate) and B not yet started (-S), the test reads both guests'
  RAM from their backing files and compares exactly those pages (and, as a second
  check, all of RAM).  A page vhostfs wrote after QEMU had copied it, and did not mark,
  would be stale on B: the checksums would differ.  The set is non-empty by assertion
  and includes read replies written while QEMU was copying RAM.
* after ``cont`` on B the guest's helper keeps going on vhostfs B through the same
  descriptors, cwd and mapping; when the host creates "stop" it re-reads everything
  through the same fd, and the host checks data.bin and mapped.bin byte for byte
  against what the guest wrote and the helper's hash of src.bin.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from vhostfs.guestrun import initramfs, kernel as kernel_mod, qemu

pytestmark = pytest.mark.guest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MEMORY = "256M"
MEM_BYTES = 256 << 20
PAGE = 4096
BLK = 4096
MAPPAGES = 16
TAG = "vhostfs"


def fnv1a(data: bytes) -> int:
    h = 1469598103934665603
    for b in data:
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def pattern(i: int, kind: int) -> bytes:
    import struct
    words = [((i << 32) ^ (kind << 63) ^ (j * 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF
             for j in range(BLK // 8)]
    return struct.pack(f"<{len(words)}Q", *words)


@pytest.fixture(scope="module")
def qemu10() -> str:
    try:
        out = subprocess.run([str(ROOT / "scripts" / "fetch-qemu-backports.sh")], check=True,
                             capture_output=True, text=True, timeout=600).stdout.strip()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        msg = f"QEMU 10.0 not available: {exc} {getattr(exc, 'stderr', '')}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return out


@pytest.fixture(scope="module")
def helper(tmp_path_factory) -> pathlib.Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("gcc is needed to build tests/guest/mighelper.c")
        pytest.skip("gcc is needed to build tests/guest/mighelper.c")
    out = tmp_path_factory.mktemp("mighelper") / "mighelper"
    subprocess.run([gcc, "-static", "-O2", "-Wall", "-Werror", "-o", str(out),
                    str(HERE / "mighelper.c")], check=True)
    return out


class Qmp:
    def __init__(self, path: str, deadline: float) -> None:
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        self._read()                                   # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name: str, **args) -> object:
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self._read()
            if "event" in msg:
                continue
            if "error" in msg:
                raise RuntimeError(f"QMP {name}: {msg['error']}")
            return msg["return"]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Side:
    """One QEMU + its vhostfs."""

    def __init__(self, name: str, run: pathlib.Path) -> None:
        self.name, self.run = name, run
        self.socket = str(run / f"vhostfs-{name}.sock")
        self.qmp_path = str(run / f"qmp-{name}.sock")
        self.ram = pathlib.Path(f"/dev/shm/vhostfs-mig-{name}-{secrets.token_hex(4)}")
        self.backend_log = run / f"vhostfs-{name}.log"
        self.console = run / f"console-{name}.log"
        self.qemu_log = run / f"qemu-{name}.log"
        self.backend = self.qemu = None
        self.qmp: Qmp | None = None

    def start_backend(self, share: pathlib.Path, env: dict, extra: list[str]) -> None:
        argv = [sys.executable, "-m", "vhostfs", "--socket-path", self.socket, "--shared-dir",
                str(share), "--tag", TAG, "--log-level", "info", *extra]
        with open(self.backend_log, "wb") as log:
            self.backend = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            env={**os.environ, **env}, start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            assert self.backend.poll() is None, self.backend_log.read_text()
            assert time.monotonic() < deadline, "vhostfs did not listen"
            time.sleep(0.02)

    def start_qemu(self, binary: str, kernel: str, initrd: str, extra: list[str]) -> None:
        values = {"KERNEL": kernel, "INITRD": initrd, "APPEND": "console=ttyS0 panic=-1 quiet "
                  "loglevel=1 printk.devkmsg=off", "SOCKET": self.socket, "TAG": TAG,
                  "MEMORY": MEMORY, "SMP": "1", "QUEUE_SIZE": "1024"}
        argv = [binary, *qemu.read_args(qemu.CONFIG_DIR / qemu.MACHINE, values),
                "-object", f"memory-backend-file,id=mem,size={MEMORY},mem-path={self.ram},share=on",
                "-numa", "node,memdev=mem",
                "-chardev", f"socket,id=vhostfs0,path={self.socket}",
                "-device", f"vhost-user-fs-pci,queue-size=1024,chardev=vhostfs0,tag={TAG}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *extra]
        (self.run / f"qemu-{self.name}.argv").write_text(" ".join(argv) + "\n")
        with open(self.console, "wb") as out, open(self.qemu_log, "wb") as err:
            self.qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         start_new_session=True)
        self.qmp = Qmp(self.qmp_path, time.monotonic() + 60)

    def kill(self) -> None:
        if self.qmp:
            self.qmp.close()
        for proc in (self.qemu, self.backend):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        try:
            self.ram.unlink()
        except FileNotFoundError:
            pass


def wait_for(cond, timeout: float, what: str, sides=()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for s in sides:
            if s.qemu is not None and s.qemu.poll() is not None:
                pytest.fail(f"QEMU {s.name} exited ({s.qemu.returncode}) while waiting for {what}: "
                            f"{s.qemu_log.read_text()[-2000:]}\n{_tails(sides)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{_tails(sides)}")
        time.sleep(0.1)


def _tails(sides) -> str:
    out = []
    for s in sides:
        for what, path in (("console", s.console), ("vhostfs", s.backend_log)):
            if path.exists():
                out.append(f"--- {what} {s.name}:\n{path.read_text(errors='replace')[-1500:]}")
    return "\n".join(out)


def page_hash(ram: pathlib.Path, pages: list[int]) -> str:
    h = hashlib.sha256()
    with open(ram, "rb") as f:
        for p in pages:
            f.seek(p * PAGE)
            h.update(f.read(PAGE))
    return h.hexdigest()


def differing_pages(a: pathlib.Path, b: pathlib.Path) -> list[int]:
    out = []
    chunk = 1 << 20
    with open(a, "rb") as fa, open(b, "rb") as fb:
        base = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if not x and not y:
                break
            if x != y:
                for k in range(0, max(len(x), len(y)), PAGE):
                    if x[k:k + PAGE] != y[k:k + PAGE]:
                        out.append((base + k) // PAGE)
            base += chunk
    return out


@pytest.mark.parametrize("mode", ["find-paths", "file-handles"])
def test_live_migration_under_load(tmp_path, qemu10, helper, mode):
    t0 = time.monotonic()
    share = tmp_path / "share"
    work = share / "work"
    work.mkdir(parents=True)
    src = os.urandom(4 << 20)
    (work / "src.bin").write_bytes(src)
    (share / ".mig").mkdir()
    shutil.copy(helper, share / ".mig" / "mighelper")
    run = tmp_path / "run"
    run.mkdir()
    witness = run / "witness.txt"

    kern = kernel_mod.find_kernel(os.environ.get("VHOSTFS_GUEST_KERNEL"))
    nonce = secrets.token_hex(8)
    script = ("cp /mnt/.mig/mighelper /tmp/mighelper && chmod 755 /tmp/mighelper && "
              "/tmp/mighelper /mnt/work")
    initrd = initramfs.write_initrd(run / "initrd.cpio.gz", initramfs.base_initramfs(kern.version),
                                    initramfs.run_archive(nonce=nonce, tag=TAG, mode="oneshot",
                                                          command=script))
    vmlinux = str(kernel_mod.cached_vmlinux(kern))
    a, b = Side("A", run), Side("B", run)
    try:
        # A writes the witness file to a host path: no namespace sandbox for it.  B runs
        # in the default (namespace) sandbox, so the paths are found again inside it.
        # file-handles: open_by_handle_at needs CAP_DAC_READ_SEARCH, which the sandbox
        # drops unless asked (virtiofsd: --modcaps=+dac_read_search).
        a.start_backend(share, {"VHOSTFS_DIRTY_WITNESS": str(witness)},
                        ["--sandbox", "none", "--migration-mode", mode])
        b.start_backend(share, {}, ["--migration-mode", mode]
                        + (["--modcaps", "+dac_read_search"] if mode == "file-handles" else []))
        a.start_qemu(qemu10, vmlinux, str(initrd), [])
        migsock = str(run / "migrate.sock")
        b.start_qemu(qemu10, vmlinux, str(initrd), ["-incoming", f"unix:{migsock}", "-S"])

        wait_for(lambda: (work / "ready").exists(), 240, "the guest helper to start", [a, b])
        boot = time.monotonic() - t0
        for side in (a, b):
            side.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30, "downtime-limit": 1000})
        n_before = (work / "data.bin").stat().st_size // BLK
        t_mig = time.monotonic()
        a.qmp.cmd("migrate", uri=f"unix:{migsock}")

        def completed():
            st = a.qmp.cmd("query-migrate")
            if st.get("status") in ("failed", "cancelled"):
                pytest.fail(f"migration {st.get('status')}: {st.get('error-desc')}\n"
                            f"A: {a.backend_log.read_text()[-3000:]}\nB: {b.backend_log.read_text()[-3000:]}")
            return st.get("status") == "completed"
        wait_for(completed, 300, "the migration to complete", [a, b])
        mig_seconds = time.monotonic() - t_mig
        info = a.qmp.cmd("query-migrate")
        wait_for(lambda: b.qmp.cmd("query-status")["status"] == "paused"
                 and b.qmp.cmd("query-migrate").get("status") == "completed", 60,
                 "B to finish loading", [b])
        assert a.qmp.cmd("query-status")["status"] == "postmigrate"

        # -- dirty logging: pages vhostfs A wrote while logging was on, A vs B ------------
        alog = a.backend_log.read_text()
        assert "dirty logging on" in alog, alog[-3000:]
        assert "device state saved" in alog, alog[-3000:]
        pages = [int(x) for x in witness.read_text().split()]
        assert pages, "vhostfs A marked no page during the migration: no load reached it"
        assert max(pages) < MEM_BYTES // PAGE
        ha, hb = page_hash(a.ram, pages), page_hash(b.ram, pages)
        diff = differing_pages(a.ram, b.ram)
        blog = b.backend_log.read_text()
        assert "device state loaded" in blog and f"source_mode={mode}" in blog, blog[-3000:]
        assert ha == hb, (f"{len(pages)} pages vhostfs A wrote during migration differ on B; "
                          f"differing pages: {len([p for p in pages if p in set(diff)])}")
        assert diff == [], f"{len(diff)} guest pages differ between A and B: {diff[:20]}"

        # -- the guest continues on B: same fds, cwd, mapping -----------------------------
        a.qmp.cmd("quit")
        b.qmp.cmd("cont")
        n_mig = (work / "data.bin").stat().st_size // BLK
        wait_for(lambda: (work / "data.bin").stat().st_size // BLK >= n_mig + 40, 120,
                 "the guest to keep writing on B", [b])
        (work / "stop").write_bytes(b"")
        wait_for(lambda: b.qemu.poll() is not None, 180, "the guest to finish and power off", [])
        console = b.console.read_text(errors="replace")
        result = next((ln for ln in console.splitlines() if ln.startswith("RESULT ")), None)
        assert result is not None, console[-3000:]
        fields = dict(kv.split("=", 1) for kv in result.split()[1:])
        assert f"@@VHOSTFS-EXIT-{nonce} 0@@" in console, console[-3000:]
        n = int(fields["n"])
        assert fields["bad"] == "0" and fields["cwd"] == "/mnt/work"
        assert fields["dbad"] == "0"        # O_DIRECT buffers written by vhostfs intact on B
        assert int(fields["src"], 16) == fnv1a(src)
        data = (work / "data.bin").read_bytes()
        assert len(data) == n * BLK
        for i in range(n):
            assert data[i * BLK:(i + 1) * BLK] == pattern(i, 0), f"data.bin block {i} of {n}"
        mapped = (work / "mapped.bin").read_bytes()
        for p in range(MAPPAGES):
            last = max(i for i in range(n) if i % MAPPAGES == p)
            assert mapped[p * BLK:(p + 1) * BLK] == pattern(last, 1), f"mapped.bin page {p}"
        assert n > n_mig > n_before
        print(f"\nmigration ({mode}): boot {boot:.1f}s, migration {mig_seconds:.1f}s "
              f"(downtime {info.get('downtime')} ms, {info.get('ram', {}).get('transferred', 0) >> 20} MiB), "
              f"{len(pages)} pages logged by vhostfs A, sha256 {ha[:16]} on both sides, "
              f"blocks before/at/after migration {n_before}/{n_mig}/{n}, total {time.monotonic() - t0:.1f}s")
    finally:
        for side in (a, b):
            side.kill()



@pytest.mark.parametrize("on_error", ["abort", "guest-error"])
def test_file_lost_on_the_host(tmp_path, qemu10, helper, on_error):
    """A file the guest holds open (held.bin) is deleted on the host before the
    migration, so the source can only describe it as lost.

    * abort (the default): vhostfs B refuses the state, CHECK_DEVICE_STATE says so, QEMU B
      fails the load, and (with the return-path capability) QEMU A fails the migration
      and runs the guest again: it keeps going on A through the same fds.
    * guest-error: the migration completes, vhostfs B logs the lost object, and the
      guest, which never touches held.bin again, goes on on B."""
    share = tmp_path / "share"
    work = share / "work"
    work.mkdir(parents=True)
    (work / "src.bin").write_bytes(os.urandom(4 << 20))
    (share / ".mig").mkdir()
    shutil.copy(helper, share / ".mig" / "mighelper")
    run = tmp_path / "run"
    run.mkdir()
    kern = kernel_mod.find_kernel(os.environ.get("VHOSTFS_GUEST_KERNEL"))
    nonce = secrets.token_hex(8)
    script = ("cp /mnt/.mig/mighelper /tmp/mighelper && chmod 755 /tmp/mighelper && "
              "/tmp/mighelper /mnt/work")
    initrd = initramfs.write_initrd(run / "initrd.cpio.gz", initramfs.base_initramfs(kern.version),
                                    initramfs.run_archive(nonce=nonce, tag=TAG, mode="oneshot",
                                                          command=script))
    vmlinux = str(kernel_mod.cached_vmlinux(kern))
    a, b = Side("A", run), Side("B", run)
    try:
        a.start_backend(share, {}, [])
        b.start_backend(share, {}, ["--migration-on-error", on_error])
        a.start_qemu(qemu10, vmlinux, str(initrd), [])
        migsock = str(run / "migrate.sock")
        b.start_qemu(qemu10, vmlinux, str(initrd), ["-incoming", f"unix:{migsock}", "-S"])
        wait_for(lambda: (work / "ready").exists(), 240, "the guest helper to start", [a, b])
        # The return path lets the source learn that the destination failed its load
        # (and run the guest again) instead of stopping in post-migrate.
        for side in (a, b):
            side.qmp.cmd("migrate-set-capabilities",
                         capabilities=[{"capability": "return-path", "state": True}])
        os.unlink(work / "held.bin")
        a.qmp.cmd("migrate", uri=f"unix:{migsock}")

        def finished():
            return a.qmp.cmd("query-migrate").get("status") in ("completed", "failed", "cancelled")
        wait_for(finished, 300, "the migration to end", [a])
        info = a.qmp.cmd("query-migrate")
        alog, blog = a.backend_log.read_text(), b.backend_log.read_text()
        assert "deleted on the host while the guest holds it" in alog, alog[-3000:]
        if on_error == "abort":
            assert info["status"] == "failed", (info, blog[-3000:])
            assert "not found again on the destination (--migration-on-error abort)" in blog, blog[-3000:]
            assert "ok=False" in blog, blog[-3000:]
            wait_for(lambda: a.qmp.cmd("query-status")["status"] == "running", 60,
                     "A to run again", [a])
            guest = a
        else:
            assert info["status"] == "completed", (info, blog[-3000:])
            assert "object lost, the guest gets errors on it" in blog and "ok=True" in blog, blog[-3000:]
            a.qmp.cmd("quit")
            wait_for(lambda: b.qmp.cmd("query-status")["status"] == "paused", 60, "B loaded", [b])
            b.qmp.cmd("cont")
            guest = b
        n0 = (work / "data.bin").stat().st_size // BLK
        wait_for(lambda: (work / "data.bin").stat().st_size // BLK >= n0 + 20, 120,
                 f"the guest to keep writing on {guest.name}", [guest])
        (work / "stop").write_bytes(b"")
        wait_for(lambda: guest.qemu.poll() is not None, 180, "the guest to finish and power off", [])
        console = guest.console.read_text(errors="replace")
        result = next((ln for ln in console.splitlines() if ln.startswith("RESULT ")), None)
        assert result is not None, console[-3000:]
        fields = dict(kv.split("=", 1) for kv in result.split()[1:])
        assert f"@@VHOSTFS-EXIT-{nonce} 0@@" in console, console[-3000:]
        assert fields["bad"] == "0" and fields["dbad"] == "0" and fields["cwd"] == "/mnt/work"
        n = int(fields["n"])
        assert (work / "data.bin").read_bytes() == b"".join(pattern(i, 0) for i in range(n))
        print(f"\nlost file, {on_error}: migration {info['status']} "
              f"({info.get('error-desc', '')!s}); guest went on on {guest.name} to {n} blocks")
    finally:
        for side in (a, b):
            side.kill()
