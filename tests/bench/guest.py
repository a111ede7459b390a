"""`python3 -m tests.bench.guest`: the in-guest benchmark (issue 7, second bullet).

For each backend (vhostfs, the Rust virtiofsd, QEMU's C virtiofsd) it boots one guest
with ``vhostfs.guestrun.GuestRunner`` on a fresh share (all guests up at once; the jobs
are interleaved across backends, rotating the order, so the machine's changing load
falls on all of them alike), runs fio (Debian's, with its
shared libraries and loader copied into ``<share>/.fio``: the guest is a static busybox)
for each workload, and reports guest-visible ops/s, MiB/s, p50/p99 completion latency,
the backend's CPU µs per op (utime+stime of its process tree over the fio run, /proc)
and its peak RSS, with vhostfs / Rust-reference ratios: ``out/bench/guest.{md,json}``.

Workloads (all data I/O with ``direct=1``, so the guest page cache does not answer):
  seq-read-1m / seq-write-1m   1 MiB, psync, depth 1 and libaio depth 32
  rand-read-4k / rand-write-4k 4 KiB, psync depth 1, libaio iodepth 32
  create                       fio ``filecreate`` (open(O_CREAT)+close of new files)
  stat                         fio ``filestat`` (stat of existing files)

The guest runs under TCG (this machine has no usable KVM, see qemu-configs/guest-tcg.args):
the guest's own CPU cost is emulated and large, so guest-visible ops/s are bounded by the
guest and noisy; the backend's CPU µs per op is the comparable number.

Settings: GUEST_BENCH_SECONDS (fio runtime per job, default 5), GUEST_BENCH_BACKENDS
(comma list, default all three), GUEST_BENCH_WORKLOADS, GUEST_BENCH_OUT (default out/bench).
Bounded: 3 boots + 10 jobs x 3 backends x (runtime + ~4 s): 334 s measured on a busy 2-CPU host.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench import report
from tests.bench.backends import REPO, REFERENCE_TOOL, BackendProcess
from tests.bench.loadgen import machine_busy_seconds

RUST_DEFAULT = "/root/.cache/reference-virtiofsd/virtiofsd"
FIO = "/usr/bin/fio"
DATA_MIB = 128
META_FILES = 400         # filecreate: new files per job (TCG: ~100 creates/s)
STAT_FILES = 200         # filestat: pre-created 4 KiB files, stat()ed in a loop

# name -> (fio job options, bytes per op or None, depth)
def _jobs(runtime: int) -> dict[str, tuple[list[str], int | None, int]]:
    common = ["--direct=1", "--time_based", f"--runtime={runtime}", "--ramp_time=1",
              "--filename=data.bin", f"--size={DATA_MIB}m", "--thread", "--group_reporting"]
    d1 = ["--ioengine=psync", "--iodepth=1"]
    d32 = ["--ioengine=libaio", "--iodepth=32", "--iodepth_batch_submit=1"]
    jobs: dict[str, tuple[list[str], int | None, int]] = {}
    for name, rw, bs in (("seq-read-1m", "read", "1m"), ("seq-write-1m", "write", "1m"),
                         ("rand-read-4k", "randread", "4k"), ("rand-write-4k", "randwrite", "4k")):
        nbytes = (1 << 20) if bs == "1m" else 4096
        jobs[f"{name}/1"] = (common + d1 + [f"--rw={rw}", f"--bs={bs}"], nbytes, 1)
        jobs[f"{name}/32"] = (common + d32 + [f"--rw={rw}", f"--bs={bs}"], nbytes, 32)
    meta = ["--thread", "--group_reporting", "--filesize=4k", "--openfiles=1",
            f"--nrfiles={META_FILES}", "--fallocate=none", "--create_on_open=1"]
    jobs["create/1"] = (meta + ["--ioengine=filecreate", "--directory=meta-create"], None, 1)
    jobs["stat/1"] = (["--thread", "--group_reporting", "--filesize=4k", "--openfiles=1",
                       f"--nrfiles={STAT_FILES}", "--ioengine=filestat", "--directory=meta-stat",
                       "--time_based", f"--runtime={runtime}", "--ramp_time=1"], None, 1)
    return jobs


def backends(names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        if name == "vhostfs":
            out[name] = "vhostfs"
        elif name == "virtiofsd-c":
            out[name] = "virtiofsd"
        elif name == "virtiofsd-rust":
            path = RUST_DEFAULT
            if not os.access(path, os.X_OK) and REFERENCE_TOOL.exists():
                path = subprocess.run(["sh", str(REFERENCE_TOOL)], capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1]
            out[name] = f"{path} --socket-path {{socket}} --shared-dir {{shared_dir}} --sandbox none"
        else:
            raise SystemExit(f"unknown backend {name!r}")
    return out


def stage_fio(share: Path) -> str:
    """Copy fio, its libraries and the loader into ``share/.fio``; the guest command prefix."""
    dest = share / ".fio"
    (dest / "lib").mkdir(parents=True, exist_ok=True)
    ldd = subprocess.run(["ldd", FIO], capture_output=True, text=True, check=True).stdout
    loader = None
    for line in ldd.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else (parts[0] if parts and parts[0].startswith("/") else None)
        if not path or not path.startswith("/"):
            continue
        shutil.copy2(os.path.realpath(path), dest / "lib" / os.path.basename(path))
        if "ld-linux" in path:
            loader = os.path.basename(path)
    shutil.copy2(FIO, dest / "fio")
    assert loader, "no dynamic loader in ldd output"
    return f"/tmp/fio/lib/{loader} --library-path /tmp/fio/lib /tmp/fio/fio"


def make_share(root: Path) -> Path:
    share = root / "share"
    share.mkdir()
    block = os.urandom(1 << 20)
    with open(share / "data.bin", "wb") as f:
        for _ in range(DATA_MIB):
            f.write(block)
    (share / "meta-create").mkdir()
    (share / "meta-stat").mkdir()
    # fio's own names for job "stat" (<name>.<job>.<file>), so it skips laying them out
    for i in range(STAT_FILES):
        with open(share / "meta-stat" / f"stat.0.{i}", "wb") as f:
            f.write(bytes(4096))
    return share


def parse_fio(output: str) -> dict:
    start = output.find("{")
    end = output.rfind("}")
    if start < 0 or end < 0:
        raise ValueError("no JSON in fio output: " + output.strip()[-300:])
    doc = json.loads(output[start:end + 1])
    job = doc["jobs"][0]
    out = {"ops_per_s": 0.0, "bytes_per_s": 0.0, "p50_us": None, "p99_us": None, "ios": 0,
           "runtime_s": 0.0}
    for side in ("read", "write"):
        s = job[side]
        if s.get("total_ios", 0) or s.get("iops", 0):
            out["ops_per_s"] += s["iops"]
            out["bytes_per_s"] += s["bw_bytes"]
            out["ios"] += s["total_ios"]
            out["runtime_s"] = max(out["runtime_s"], s["runtime"] / 1000)
            pct = s.get("clat_ns", {}).get("percentile") or s.get("lat_ns", {}).get("percentile") or {}
            if pct:
                out["p50_us"] = pct.get("50.000000", 0) / 1000
                out["p99_us"] = pct.get("99.000000", 0) / 1000
    return out


def backend_handle(session) -> BackendProcess:
    """A BackendProcess view of the runner's backend, for its /proc CPU and RSS readers."""
    bp = BackendProcess.__new__(BackendProcess)
    bp.proc = session.backend
    return bp


class Guest:
    """One booted guest on its own share, served by one backend."""

    def __init__(self, name: str, template: str, workdir: Path, runtime: int) -> None:
        from vhostfs.guestrun import GuestRunner
        self.name, self.template = name, template
        self.root = Path(tempfile.mkdtemp(prefix=f"gbench-{name}-", dir=workdir))
        share = make_share(self.root)
        self.fio = stage_fio(share)
        self.runner = GuestRunner(share, backend=template, log_level="error", memory="1G", smp=2,
                                  timeout=120 + 4 * runtime)
        self.info: dict = {"backend": name, "command": template}
        self.session = None
        self.error = ""

    def boot(self) -> None:
        t0 = time.monotonic()
        self.session = self.runner.session().__enter__()
        self.info["boot_s"] = time.monotonic() - t0
        self.bp = backend_handle(self.session)
        r = self.session.run("cp -a /mnt/.fio /tmp/fio && " + self.fio + " --version")
        self.info["fio_version"] = r.output.strip().splitlines()[-1] if r.output.strip() else ""
        if r.status:
            raise RuntimeError(f"fio does not start in the guest: {r.output[-300:]}")

    def run_job(self, key: str, opts: list[str], nbytes: int | None, depth: int, runtime: int) -> dict:
        workload = key.split("/")[0]
        row = {"backend": self.name, "workload": workload, "queues": 1, "depth": depth,
               "status": "ok", "detail": ""}
        if self.session is None:
            row.update(status="error", detail=self.error or "guest not running")
            return row
        cmd = self.fio + " --name=" + workload + " --output-format=json " + " ".join(map(shlex.quote, opts))
        if workload == "create":
            cmd = "rm -rf meta-create/* ; " + cmd
        cpu0, busy0 = self.bp.cpu_seconds(), machine_busy_seconds()
        try:
            res = self.session.run(cmd, timeout=60 + 4 * runtime)
        except Exception as exc:   # noqa: BLE001 - the session is dead (killed by run())
            self.session = None
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            row.update(status="error", detail=self.error)
            return row
        cpu1, busy1 = self.bp.cpu_seconds(), machine_busy_seconds()
        try:
            if res.status:
                raise ValueError(f"fio exit {res.status}: {res.output.strip()[-300:]}")
            m = parse_fio(res.output)
            row.update(ops=m["ios"], seconds=m["runtime_s"], ops_per_s=m["ops_per_s"],
                       p50_us=m["p50_us"], p99_us=m["p99_us"])
            row["mib_per_s"] = m["bytes_per_s"] / (1 << 20) if nbytes else None
            # CPU over the whole fio command (layout + ramp + run): an upper bound per op
            row["backend_cpu_s"] = cpu1 - cpu0
            row["cpu_us_per_op"] = (cpu1 - cpu0) / m["ios"] * 1e6 if m["ios"] else None
        except (ValueError, KeyError, IndexError) as exc:
            row["status"] = "error"
            row["detail"] = str(exc).replace("\n", " ")
        row["peak_rss_mib"] = self.bp.peak_rss_kib() / 1024
        row["wall_s"] = res.duration
        # busy CPU% of the whole machine during the command (guests, backends, other users)
        row["machine_busy_pct"] = 100 * (busy1 - busy0) / max(res.duration, 1e-9)
        return row

    def close(self) -> None:
        t0 = time.monotonic()
        if self.session is not None:
            try:
                self.session.__exit__(None, None, None)
            except Exception as exc:   # noqa: BLE001
                self.info["shutdown_error"] = str(exc).splitlines()[0][:200]
            self.session = None
        self.info["shutdown_s"] = time.monotonic() - t0
        shutil.rmtree(self.root, ignore_errors=True)


def run_all(backend_templates: dict[str, str], jobs: dict, *, workdir: Path, runtime: int,
            echo, doc: dict) -> None:
    """Boot one guest per backend (all at once), then run every job on each guest in turn,
    rotating the order per job, so that the machine's changing load falls on all backends
    alike."""
    guests = [Guest(n, t, workdir, runtime) for n, t in backend_templates.items()]
    try:
        for g in guests:
            echo(f"{g.name}: booting")
            try:
                g.boot()
            except Exception as exc:   # noqa: BLE001 - the others go on
                g.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                g.info["error"] = g.error
                if g.session is not None:
                    g.session.kill()
                    g.session = None
                echo(f"{g.name}: {g.error}")
        for k, (key, (opts, nbytes, depth)) in enumerate(jobs.items()):
            order = guests[k % len(guests):] + guests[:k % len(guests)]
            for g in order:
                row = g.run_job(key, opts, nbytes, depth, runtime)
                echo(f"  {g.name:15s} {key:16s} {row.get('ops_per_s') or 0:10.0f} ops/s "
                     f"{row.get('cpu_us_per_op') or 0:8.1f} us/op  machine {row.get('machine_busy_pct') or 0:4.0f} %"
                     f"  {row['status']} {row['detail'][:120]}")
                doc["results"].append(row)
    finally:
        for g in guests:
            g.close()
            doc["backends"].append(g.info)
    order = {n: i for i, n in enumerate(backend_templates)}
    keys = list(jobs)
    doc["results"].sort(key=lambda r: (keys.index(f"{r['workload']}/{r['depth']}"), order[r["backend"]]))


def markdown(doc: dict) -> str:
    res = doc["results"]
    L = ["# In-guest benchmark (fio in a booted TCG guest)", "",
         f"Run {doc['started']} on {doc['host']}; fio runtime {doc['runtime_s']} s per job "
         f"(+1 s ramp), `direct=1` for data, guest: {doc['guest']}.",
         "Command: `python3 -m tests.bench.guest`.", "",
         "**Read with care**: the guest is emulated (TCG, no KVM), so the guest's CPU, not the "
         "backend, bounds most cells: ops/s ratios here mostly measure the guest and the machine's "
         "contention, not the backend. *CPU µs/op* is the backend's utime+stime "
         "over the whole fio command (file layout, ramp and run) divided by the measured ops: an "
         "upper bound, comparable between backends.", ""]
    L.append("| workload | depth | backend | ops/s | MiB/s | p50 µs | p99 µs | CPU µs/op | peak RSS MiB | machine busy % | status |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res:
        L.append(f"| {r['workload']} | {r['depth']} | {r['backend']} | {report.fmt(r.get('ops_per_s'))} | "
                 f"{report.fmt(r.get('mib_per_s'), 1)} | {report.fmt(r.get('p50_us'))} | "
                 f"{report.fmt(r.get('p99_us'))} | {report.fmt(r.get('cpu_us_per_op'), 1)} | "
                 f"{report.fmt(r.get('peak_rss_mib'))} | {report.fmt(r.get('machine_busy_pct'))} | "
                 f"{r['status']}{(': ' + report.cell_text(r['detail'])) if r['detail'] else ''} |")
    L += ["", "## vhostfs / reference ratios", ""]
    refs = [b for b in ("virtiofsd-rust", "virtiofsd-c") if any(r["backend"] == b for r in res)]
    hdr = "| workload | depth | target (ops/s vs Rust) | " + " | ".join(
        f"ops/s vs {b} | CPU/op vs {b}" for b in refs) + " |"
    L += [hdr, "|" + "---|" * (3 + 2 * len(refs))]
    by = {(r["backend"], r["workload"], r["depth"]): r for r in res if r["status"] == "ok"}
    for r in res:
        if r["backend"] != "vhostfs" or r["status"] != "ok":
            continue
        cells = []
        for b in refs:
            ref = by.get((b, r["workload"], r["depth"]))
            cells.append(report.fmt_ratio(report.ratio(r.get("ops_per_s"), ref and ref.get("ops_per_s"))))
            cells.append(report.fmt_ratio(report.ratio(r.get("cpu_us_per_op"), ref and ref.get("cpu_us_per_op"))))
        tgt = report.target_for(r["workload"], r["depth"])
        L.append(f"| {r['workload']} | {r['depth']} | {tgt:.1f}x | " + " | ".join(cells) + " |")
    L += ["", "## Backends", ""]
    for i in doc["backends"]:
        L.append(f"- {i['backend']}: `{i['command']}`, boot {report.fmt(i.get('boot_s'), 1)} s"
                 f"{(' - ' + i['error']) if i.get('error') else ''}")
    L += ["", f"Total {report.fmt(doc.get('total_s'))} s. *machine busy %*: all CPUs of the host "
          f"({os.cpu_count()}), busy during the fio command (the three TCG guests, the backends and "
          "other users' work): above ~150 % the numbers measure the machine's contention more "
          "than the backend."]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.bench.guest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("GUEST_BENCH_SECONDS", 5)))
    ap.add_argument("--backends", default=os.environ.get("GUEST_BENCH_BACKENDS",
                                                         "vhostfs,virtiofsd-rust,virtiofsd-c"))
    ap.add_argument("--workloads", default=os.environ.get("GUEST_BENCH_WORKLOADS", ""))
    ap.add_argument("--out", default=os.environ.get("GUEST_BENCH_OUT", str(REPO / "out" / "bench")))
    a = ap.parse_args(argv)
    if not os.access(FIO, os.X_OK):
        raise SystemExit(f"{FIO} not found: apt-get install fio")
    jobs = _jobs(a.seconds)
    if a.workloads:
        want = {w.strip() for w in a.workloads.split(",")}
        jobs = {k: v for k, v in jobs.items() if k.split("/")[0] in want or k in want}
    names = [b.strip() for b in a.backends.split(",") if b.strip()]
    doc = {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "host": f"{platform.node()} ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})",
           "guest": "TCG, 2 vCPUs, 1 GiB, busybox + Debian fio", "runtime_s": a.seconds,
           "results": [], "backends": []}
    workdir = Path(tempfile.mkdtemp(prefix="vhostfs-gbench-"))
    t_start = time.monotonic()
    echo = lambda s: print(s, flush=True)   # noqa: E731
    try:
        run_all(backends(names), jobs, workdir=workdir, runtime=a.seconds, echo=echo, doc=doc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    doc["total_s"] = time.monotonic() - t_start
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "guest.json"), "w") as f:
        json.dump(doc, f, indent=1)
    md = markdown(doc)
    with open(os.path.join(a.out, "guest.md"), "w") as f:
        f.write(md)
    print(md)
    return 0 if doc["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
