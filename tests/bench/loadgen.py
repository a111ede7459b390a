"""The load generator: one backend process, one simulated frontend, one workload cell.

``run_cell`` starts the backend, connects the simulated QEMU frontend (hiprio +
``queues`` request queues), sends FUSE INIT, sets the workload up, keeps ``depth``
requests in flight on every request queue from a single thread (poll on the call
eventfds, reap, resubmit, publish once per round, kick only when the device asks),
warms up, then measures for ``seconds``: completions in the window, per-request
latency (submit -> reaped), backend CPU (utime+stime of its process tree) and the
load generator's own CPU.  The backend's VmHWM is read before it is stopped.
"""
from __future__ import annotations

import os
import select
import time
from dataclasses import asdict, dataclass, field, replace

from tests.bench import report
from tests.bench.backends import BackendProcess, BackendSpec
from tests.bench.workloads import BenchError, Cell, LookupMany, Workload, reset_dataset
from tests.support import fuse_client as fc
from tests.support.fuse_client import BackendCapabilityError, VirtioFsConnection

STALL_SECONDS = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK
FORGET_BATCH = 64


@dataclass
class CellResult:
    backend: str
    workload: str
    queues: int
    depth: int
    ops: int = 0
    seconds: float = 0.0
    ops_per_s: float = 0.0
    mib_per_s: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    backend_cpu_s: float = 0.0
    cpu_us_per_op: float | None = None
    backend_cpu_pct: float = 0.0
    loadgen_cpu_pct: float = 0.0
    other_cpu_pct: float | None = None     # the rest of the machine during the window
    peak_rss_mib: float | None = None
    anon_rss_mib: float | None = None       # RssAnon at the end of the window
    kicks_per_op: float | None = None
    status: str = "ok"          # ok | unsupported | error
    detail: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def start_backend(spec: BackendSpec, workdir: str, shared: str, queues: int, tag: str) -> BackendProcess:
    sock = os.path.join(workdir, f"{spec.name}-{tag}.sock")
    proc = BackendProcess(spec, sock, shared, queues, os.path.join(workdir, f"{spec.name}.log"))
    proc.start()
    return proc


def connect(proc: BackendProcess, queues: int, depth: int, data_size: int,
            timeout: float = 30.0) -> VirtioFsConnection:
    """Wait (while the backend lives) for its socket, then play the QEMU handshake."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(proc.sock):
        if not proc.alive():
            tail = proc.log_tail(400).strip().splitlines()
            raise BenchError(f"backend exited (rc {proc.proc.returncode}) before listening: "
                             f"{tail[-1] if tail else 'no output'}")
        if time.monotonic() > deadline:
            raise BenchError(f"backend created no socket within {timeout:.0f} s")
        time.sleep(0.01)
    return VirtioFsConnection.connect(proc.sock, request_queues=queues, depth=depth,
                                      data_size=data_size, connect_timeout=5)


def probe_queues(spec: BackendSpec, workdir: str, shared: str, want: int) -> tuple[int | None, str]:
    """How many request queues the backend serves (GET_QUEUE_NUM - 1 for hiprio), asking
    for ``want``; (None, why) when it cannot even start."""
    proc = start_backend(spec, workdir, shared, want, "probe")
    try:
        try:
            conn = connect(proc, want, 1, 4096)
        except BackendCapabilityError as exc:
            return exc.backend_queues - 1, str(exc)
        try:
            conn.init()
            n = conn.backend_queues
            return (want if n is None else n - 1), ""
        finally:
            conn.close()
    except Exception as exc:   # noqa: BLE001 - recorded, the bench goes on
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        proc.stop()


def _drive(conn: VirtioFsConnection, wl: Workload, depth: int, *, warmup: float, seconds: float,
           proc: BackendProcess | None) -> dict:
    """The hot loop.  Returns the raw measurements of the window."""
    chans = conn.requests
    hiprio = conn.channels[0]
    for qi, ch in enumerate(chans):
        for k in range(depth):
            op = wl.first(qi * depth + k)
            if op is not None:
                ch.submit(op, tag=qi * depth + k, publish=False)
        ch.publish()
    poller = select.poll()
    by_fd = {}
    for ch in conn.channels:
        poller.register(ch.call_fd, select.POLLIN)
        by_fd[ch.call_fd] = ch
    perf = time.perf_counter
    start = perf()
    t_measure = start + warmup
    t_end = t_measure + seconds
    measuring = warmup <= 0
    stopping = False
    lat: list[float] = []
    ops = 0
    cpu0 = proc.cpu_seconds() if (proc and measuring) else 0.0
    lg0 = time.process_time()
    busy0 = machine_busy_seconds()
    busy1 = None
    kicks0 = sum(ch.kicks for ch in chans)
    cpu1 = lg1 = kicks1 = None
    last_progress = perf()
    forgets = wl.pending_forgets
    in_flight = sum(ch.in_flight for ch in chans)
    while in_flight or (forgets and not stopping) or hiprio.in_flight:
        events = poller.poll(1000)
        now = perf()
        if not measuring and now >= t_measure:
            measuring = True
            cpu0 = proc.cpu_seconds() if proc else 0.0
            lg0 = time.process_time()
            busy0 = machine_busy_seconds()
            kicks0 = sum(ch.kicks for ch in chans)
            lat.clear()
            ops = 0
        if measuring and not stopping and now >= t_end:
            stopping = True
            cpu1 = proc.cpu_seconds() if proc else 0.0
            lg1 = time.process_time()
            busy1 = machine_busy_seconds()
            kicks1 = sum(ch.kicks for ch in chans)
        if not events:
            if now - last_progress > STALL_SECONDS:
                raise BenchError(f"no completion for {STALL_SECONDS:.0f} s "
                                 f"({in_flight} requests in flight)")
            continue
        last_progress = now
        for fd, _ in events:
            ch = by_fd[fd]
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
            replies = ch.reap()
            if ch is hiprio:
                for r in replies:
                    if r.error:
                        raise BenchError(f"{fc._opname(r.opcode)} on hiprio: {os.strerror(-r.error)}")
                continue
            for r in replies:
                if measuring and not stopping:
                    if r.completed <= t_end:
                        ops += 1
                        lat.append(r.completed - r.submitted)
                op = wl.next(r.tag, r)
                if op is not None and not stopping:
                    ch.submit(op, tag=r.tag, publish=False)
            ch.publish()
        if forgets and hiprio.has_free_slot and (len(forgets) >= FORGET_BATCH or stopping):
            batch, forgets[:] = forgets[:250], forgets[250:]
            hiprio.submit(fc.encode_batch_forget(batch))
        in_flight = sum(ch.in_flight for ch in chans)
        if stopping and not in_flight and not hiprio.in_flight and not forgets:
            break
    if cpu1 is None:      # the workload ran out before the window closed
        cpu1 = proc.cpu_seconds() if proc else 0.0
        lg1 = time.process_time()
        busy1 = machine_busy_seconds()
        kicks1 = sum(ch.kicks for ch in chans)
        t_end = min(t_end, perf())
    window = t_end - t_measure if warmup > 0 else t_end - start
    return {"ops": ops, "lat": lat, "window": max(window, 1e-9), "cpu": cpu1 - cpu0,
            "loadgen_cpu": lg1 - lg0, "kicks": kicks1 - kicks0,
            "other_cpu": max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - (lg1 - lg0))}


def run_cell(spec: BackendSpec, cell: Cell, wl: Workload, *, workdir: str, shared: str,
             warmup: float, seconds: float) -> CellResult:
    res = CellResult(spec.name, cell.workload, cell.queues, cell.depth)
    reset_dataset(shared)
    proc = start_backend(spec, workdir, shared, cell.queues, cell.key.replace("/", "-"))
    conn = None
    try:
        conn = connect(proc, cell.queues, cell.depth, wl.data_size)
        conn.init()
        wl.setup(conn, cell.queues * cell.depth)
        m = _drive(conn, wl, cell.depth, warmup=warmup, seconds=seconds, proc=proc)
        res.anon_rss_mib = proc.anon_rss_kib() / 1024
        wl.teardown(conn)
        res.peak_rss_mib = proc.peak_rss_kib() / 1024
        res.ops = m["ops"]
        res.seconds = m["window"]
        res.ops_per_s = m["ops"] / m["window"]
        if wl.bytes_per_op:
            res.mib_per_s = res.ops_per_s * wl.bytes_per_op / (1 << 20)
        if m["lat"]:
            res.p50_us = report.percentile(m["lat"], 50) * 1e6
            res.p99_us = report.percentile(m["lat"], 99) * 1e6
        res.backend_cpu_s = m["cpu"]
        res.cpu_us_per_op = m["cpu"] / m["ops"] * 1e6 if m["ops"] else None
        res.backend_cpu_pct = 100 * m["cpu"] / m["window"]
        res.loadgen_cpu_pct = 100 * m["loadgen_cpu"] / m["window"]
        res.other_cpu_pct = 100 * m["other_cpu"] / m["window"]
        res.kicks_per_op = m["kicks"] / m["ops"] if m["ops"] else None
        if hasattr(wl, "entries"):
            res.extra["dirents_per_s"] = wl.entries / max(m["window"] + warmup, 1e-9)
    except BackendCapabilityError as exc:
        res.status = "unsupported"
        res.detail = f"backend serves {exc.backend_queues - 1} request queue(s)"
    except Exception as exc:   # noqa: BLE001 - one failed cell must not stop the bench
        res.status = "error"
        res.detail = f"{type(exc).__name__}: {exc}"
        if not proc.alive() and "backend exited" not in res.detail:
            tail = proc.log_tail(400).strip().splitlines()
            res.detail += f" [backend exited rc {proc.proc.returncode}: {tail[-1] if tail else ''}]"
    finally:
        if conn is not None:
            conn.close()
        proc.stop()
    return res


def run_rss(spec: BackendSpec, count: int, *, workdir: str, shared: str, depth: int = 32) -> dict:
    """RSS of the backend after ``count`` distinct LOOKUPs (kept: no FORGET), with the
    backend's file-handle options if it has them (one O_PATH fd per inode would stop
    every backend at the machine's RLIMIT_NOFILE long before 100,000)."""
    out = {"backend": spec.name, "inodes_wanted": count, "status": "ok", "detail": "",
           "args": " ".join(spec.file_handle_args) or "(one fd per inode)"}
    if spec.file_handle_args:
        base, extra = spec.argv, list(spec.file_handle_args)
        spec = replace(spec, argv=lambda sock, shared_dir, queues: base(sock, shared_dir, queues) + extra)
    proc = start_backend(spec, workdir, shared, 1, "rss")
    conn = None
    try:
        conn = connect(proc, 1, depth, 4096)
        conn.init()
        out["rss_after_init_mib"] = proc.rss_kib() / 1024
        curve: list[tuple[int, float]] = []
        wl = LookupMany(count, lambda done: curve.append((done, proc.rss_kib() / 1024)))
        wl.setup(conn, depth)
        t0 = time.perf_counter()
        _drive(conn, wl, depth, warmup=0, seconds=3600, proc=proc)
        out["seconds"] = time.perf_counter() - t0
        out["inodes_looked_up"] = wl.done
        out["rss_mib"] = proc.rss_kib() / 1024
        out["peak_rss_mib"] = proc.peak_rss_kib() / 1024
        out["anon_rss_mib"] = proc.anon_rss_kib() / 1024
        if wl.done and (not curve or curve[-1][0] != wl.done):
            curve.append((wl.done, out["rss_mib"]))
        out["rss_curve"] = curve            # measured (inodes, RSS MiB) points
        out.update(report.rss_slope(out["rss_after_init_mib"], curve, count))
        try:
            with open(f"/proc/{proc.pid}/limits") as f:
                for line in f:
                    if line.startswith("Max open files"):
                        out["nofile_limit"] = line.split()[3:5]
            out["open_fds"] = sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in proc.tree())
        except OSError:
            pass
        if wl.error:
            out["status"] = "partial"
            out["detail"] = wl.error
    except Exception as exc:   # noqa: BLE001
        out["status"] = "error"
        out["detail"] = f"{type(exc).__name__}: {exc}"
    finally:
        if conn is not None:
            conn.close()
        proc.stop()
    return out
