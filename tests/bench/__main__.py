"""`python3 -m tests.bench`: run every backend through every workload cell and report.

Settings (command-line options override the environment):
  BENCH_QUICK=1           ~2 minute smoke: 0.75 s per cell, 10,000-inode RSS item
  BENCH_SECONDS, BENCH_WARMUP   measured / warm-up seconds per cell (default 6 / 0.5)
  BENCH_BACKENDS          comma list of vhostfs, virtiofsd-rust, virtiofsd-c (default: all)
  BENCH_WORKLOADS         comma list of workload names (default: all)
  BENCH_QUEUES, BENCH_DEPTHS    comma lists (default 1,4 and 1,32)
  BENCH_RSS_INODES        inodes for the RSS item (default 100000; 0 skips it)
  BENCH_OUT               output directory (default out/bench)
  BENCH_DIR               where the shared directory is made (default /dev/shm when it is a
                          tmpfs with 2 GiB free, so disk writeback does not set the pace; else /tmp)
--report-only out/bench/results.json rewrites the Markdown and the chart without measuring.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

from tests.bench import report
from tests.bench.backends import REPO, discover
from tests.bench.loadgen import CellResult, probe_queues, run_cell, run_rss
from tests.bench.workloads import WORKLOADS, Cell, make_dataset

ALL_BACKENDS = ["vhostfs", "virtiofsd-rust", "virtiofsd-c"]


def _env_list(name: str, default: list[str]) -> list[str]:
    v = os.environ.get(name, "").strip()
    return [x.strip() for x in v.split(",") if x.strip()] if v else default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    ap = argparse.ArgumentParser(prog="python3 -m tests.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", default=quick)
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", 0) or 0))
    ap.add_argument("--warmup", type=float, default=float(os.environ.get("BENCH_WARMUP", -1) or -1))
    ap.add_argument("--backends", default=",".join(_env_list("BENCH_BACKENDS", ALL_BACKENDS)))
    ap.add_argument("--workloads", default=",".join(_env_list("BENCH_WORKLOADS", list(WORKLOADS))))
    ap.add_argument("--queues", default=",".join(_env_list("BENCH_QUEUES", ["1", "4"])))
    ap.add_argument("--depths", default=",".join(_env_list("BENCH_DEPTHS", ["1", "32"])))
    ap.add_argument("--rss-inodes", type=int, default=int(os.environ.get("BENCH_RSS_INODES", -1)))
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT", str(REPO / "out" / "bench")))
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", ""))
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument("--report-only", metavar="RESULTS_JSON",
                    help="measure nothing: rewrite results.md and the chart from a results.json")
    a = ap.parse_args(argv)
    if a.seconds <= 0:
        a.seconds = 0.75 if a.quick else 6.0
    if a.warmup < 0:
        a.warmup = 0.2 if a.quick else 0.5
    if a.rss_inodes < 0:
        a.rss_inodes = 10_000 if a.quick else 100_000
    return a


def default_base() -> str:
    """/dev/shm if it is a tmpfs with room for the data set (page-cache speed, no writeback
    stalls from the shared disk), else the default temporary directory."""
    try:
        st = os.statvfs("/dev/shm")
        if fs_type("/dev/shm") == "tmpfs" and st.f_bavail * st.f_frsize >= 2 << 30:
            return "/dev/shm"
    except OSError:
        pass
    return tempfile.gettempdir()


def fs_type(path: str) -> str:
    """The type of the file system holding ``path`` (longest mount-point match)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, typ = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, typ
    return kind


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report_only:
        with open(a.report_only) as f:
            doc = json.load(f)
        paths = report.write_outputs(doc, a.out)
        print(report.markdown(doc))
        print(f"bench: wrote {paths['md']}, chart: {paths['png']}", file=sys.stderr)
        return 0
    workloads = [w for w in a.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r} (known: {', '.join(WORKLOADS)})")
    queues = [int(x) for x in a.queues.split(",")]
    depths = [int(x) for x in a.depths.split(",")]
    t_start = time.monotonic()
    with open("/proc/loadavg") as f:
        loadavg0 = " ".join(f.read().split()[:3])
    base = a.dir or default_base()
    workdir = tempfile.mkdtemp(prefix="vhostfs-bench-", dir=base)
    shared = os.path.join(workdir, "share")
    say = lambda *x: print(*x, file=sys.stderr, flush=True)   # noqa: E731
    say(f"bench: work dir {workdir}; {a.seconds} s per cell (+{a.warmup} s warm-up)")
    try:
        say("bench: creating the data set (256 MiB files, 1,000 + 10,000 files"
            + (f", {a.rss_inodes:,} for the RSS item" if a.rss_inodes else "") + ")")
        make_dataset(shared, rss_files=a.rss_inodes)
        specs, skipped = discover([b for b in a.backends.split(",") if b], workdir)
        for name, why in skipped.items():
            say(f"bench: skipping {name}: {why}")
        backends = []
        for spec in specs:
            supported, why = probe_queues(spec, workdir, shared, max(queues))
            say(f"bench: {spec.name} {spec.version}: serves {supported} request queue(s)"
                + (f" ({why})" if why and supported is None else ""))
            if supported is None:
                skipped[spec.name] = f"did not start: {why}"
                continue
            backends.append({"name": spec.name, "version": spec.version, "notes": spec.notes,
                             "request_queues": supported, "spec": spec})
        results: list[dict] = []
        cells = [Cell(w, q, d) for w in workloads for q in queues for d in depths]
        try:
            for cell in cells:
                for b in backends:
                    if cell.queues > b["request_queues"]:
                        r = CellResult(b["name"], cell.workload, cell.queues, cell.depth,
                                       status="unsupported",
                                       detail=f"serves {b['request_queues']} request queue(s)")
                    else:
                        r = run_cell(b["spec"], cell, WORKLOADS[cell.workload](), workdir=workdir,
                                     shared=shared, warmup=a.warmup, seconds=a.seconds)
                        say(f"  {cell.key:34} {b['name']:15} {r.status:5} {report.fmt(r.ops_per_s):>9} ops/s"
                            f"  p50 {report.fmt(r.p50_us, 1):>8} µs  cpu {report.fmt(r.cpu_us_per_op, 1):>7} µs/op"
                            f"  lg {report.fmt(r.loadgen_cpu_pct)}%  {r.detail}")
                    results.append(r.to_json())
            rss = []
            if a.rss_inodes:
                for b in backends:
                    x = run_rss(b["spec"], a.rss_inodes, workdir=workdir, shared=shared)
                    say(f"  rss {b['name']:15} {x['status']}: {x.get('inodes_looked_up', 0):,} inodes, "
                        f"RSS {report.fmt(x.get('rss_mib'), 1)} MiB {x['detail']}")
                    rss.append(x)
        except KeyboardInterrupt:
            say("bench: interrupted; writing what was measured")
            rss = []
        doc = {
            "environment": {
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{platform.node()} ({os.cpu_count()} CPUs, Linux {platform.release()}, "
                           f"Python {platform.python_version()})",
                "seconds": a.seconds, "warmup": a.warmup, "quick": a.quick,
                "wall_seconds": round(time.monotonic() - t_start, 1),
                "shared_dir_fs": f"{fs_type(shared)} ({os.path.dirname(workdir)})",
                "loadavg_at_start": loadavg0,
            },
            "backends": [{k: v for k, v in b.items() if k != "spec"} for b in backends],
            "skipped": skipped,
            "workload_order": workloads,
            "results": results,
            "rss": rss,
            "notes": [
                "Queue layout: vhost-user-fs queue 0 is hiprio (FORGETs), 1..N are request queues; "
                "the load generator is one Python thread polling every call eventfd.",
                f"Shared directory on {fs_type(shared)} under {os.path.dirname(workdir)} (BENCH_DIR); "
                f"load average at start {loadavg0} on {os.cpu_count()} CPUs.",
            ],
        }
        doc["ratios"] = report.ratios(results, report.SUBJECT,
                                      [b["name"] for b in backends if b["name"] != report.SUBJECT])
        paths = report.write_outputs(doc, a.out)
        print(report.markdown(doc))
        say(f"bench: wrote {paths['md']}, {paths['json']}, chart: {paths['png']} "
            f"({time.monotonic() - t_start:.0f} s)")
        return 0 if any(r["status"] == "ok" for r in results) else 1
    finally:
        if a.keep_workdir:
            say(f"bench: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
