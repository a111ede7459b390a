"""`python3 -m tests.bench.profile`: where vhostfs spends its CPU, per request (issue 7).

The daemon runs as in the bench (its own process, the bench's simulated frontend over a
real socket, real split rings in memfd guest RAM: ``tests/bench/loadgen.run_cell``), but
started through this module's ``--serve`` wrapper, which gives every thread its own
``cProfile.Profile(time.thread_time)`` (``threading.setprofile``: the queue threads and
the worker pool too; the timer is the thread's CPU time, so blocking in poll() or on the
GIL costs nothing in it) and dumps the merged statistics when the daemon exits.

For each cell it runs the daemon twice: once plain (the CPU µs/op that counts) and once
under cProfile (where it goes: tottime per op of every function, grouped into the
stages of the request path).  cProfile inflates short calls (~0.3-0.5 µs per call
profiled), so read the *shares* from it and the absolute µs from the plain run and from
``tests/bench/micro.py``.

Usage:
  python3 -m tests.bench.profile [--cells randread-4k/1,lookup-getattr/32,...] [--seconds 3]
  python3 -m tests.bench.profile --resummarise       (re-read out/bench/profile/*.prof)
  python3 -m tests.bench.profile --serve OUT.prof -- <vhostfs arguments>   (internal)
Outputs: out/bench/profile/<cell>.prof (pstats), out/bench/profile/summary.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

DEFAULT_CELLS = ["randread-4k/1", "randread-4k/32", "lookup-getattr/1", "lookup-getattr/32",
                 "readdirplus-10k/1", "readdirplus-10k/32"]
PLAIN_CELLS = ["readdirplus-10k@4/32", "randread-4k@4/32"]

# Stage of the request path -> substrings of "file:line(function)" (first match wins).
# Built-ins (len, min, list.append, Struct.unpack_from ...) that match no pattern are
# charged to the stage of the function that called them (pstats keeps per-caller time).
STAGES = [
    ("start-up (imports, handshake, INIT; one-off)",
     ["<frozen", "importlib", "marshal", "builtins.compile", "recvmsg", "vhost_user/", "click/",
      "structlog/", "cli.py", "daemon.py", "config.py", "sre_", "re/_", "typing.py", "enum.py",
      "dataclasses.py", "inspect.py", "abc.py", "functools.py", "log.py"]),
    ("kick: poll + eventfd_read (queue thread)", ["method 'poll'", "eventfd_read", "queue.py:138(_run)"]),
    ("handoff to the pool (SimpleQueue, locks, worker loop)",
     ["SimpleQueue", "queue.py:77(submit)", "queue.py:80(_run)", "'acquire'", "'release'",
      "'__enter__' of '_thread.lock'", "'__exit__' of '_thread.lock'", "threading.py"]),
    ("add_used + notification + eventfd_write", ["split.py:185(add_used)", "needs_notification",
     "eventfd_write", "store_release", "fence_seq_cst", "queue.py:272(_finish)",
     "_complete_locked", "enable_notification", "disable_notification"]),
    ("pop + chain walk + translate", ["split.py:155(pop)", "chain.py", "memory.py", "load_acquire",
                                      "queue.py:190(_pop_one)"]),
    ("Reader / Writer (iov.py)", ["iov.py"]),
    ("syscalls (os.*, hostsys wrappers)", ["posix.", "'preadv'", "'pwritev'", "hostsys", "scandir",
                                           "'fsencode'", "os.py", "method 'close'", "DirEntry"]),
    ("FUSE decode / dispatch / reply packing", ["fuse/", "metrics.py", "fs/api.py"]),
    ("filesystem (passthrough, Python side)", ["fs/passthrough"]),
    ("queue runtime (drain, dispatch, serve)", ["runtime/"]),
]


def _name(key: tuple) -> str:
    return f"{key[0]}:{key[1]}({key[2]})"


def _match(key: tuple) -> str | None:
    name = _name(key)
    for stage, pats in STAGES:
        if any(p in name for p in pats):
            return stage
    return None


def stage_of(key: tuple, stats: dict, depth: int = 0) -> list[tuple[str, float]]:
    """[(stage, fraction)] for one function: its own stage, or (a built-in matching no
    pattern) its callers' stages weighted by the time spent under each caller."""
    st = _match(key)
    if st is not None or key[0] != "~" or depth > 3:
        return [(st or "other Python", 1.0)]
    callers = stats[key][4]
    total = sum(v[2] for v in callers.values()) or 0.0
    if not total:
        return [("other Python", 1.0)]
    out = []
    for ck, v in callers.items():
        for sg, fr in stage_of(ck, stats, depth + 1):
            out.append((sg, fr * v[2] / total))
    return out


# -- the --serve wrapper (runs inside the daemon process) ----------------------------------
def serve(out: str, args: list[str]) -> int:
    import cProfile
    import pstats
    import signal
    import time

    profilers: list[cProfile.Profile] = []
    lock = threading.Lock()

    def hook(frame, event, arg):   # first profile event of a new thread: give it a profiler
        p = cProfile.Profile(time.thread_time)   # CPU of this thread, not wall time
        with lock:
            profilers.append(p)
        p.enable()                 # replaces this hook for this thread

    threading.setprofile(hook)
    main_p = cProfile.Profile(time.thread_time)
    profilers.append(main_p)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from vhostfs import cli
    main_p.enable()
    try:
        cli.main(args, prog_name="vhostfs", standalone_mode=False)
    except SystemExit:
        pass
    finally:
        main_p.disable()
        stats = None
        with lock:
            for p in profilers:
                try:
                    s = pstats.Stats(p)
                except TypeError:    # a profiler that saw no call
                    continue
                if stats is None:
                    stats = s
                else:
                    stats.add(s)
        if stats is not None:
            stats.dump_stats(out)
    return 0


# -- the driver ----------------------------------------------------------------------------
def summarise(prof_path: str, top: int = 25) -> dict:
    """Per served request (the number of FuseServer.handle calls): CPU µs by stage and the
    top functions; the start-up stage is reported but left out of the request total."""
    import pstats
    st = pstats.Stats(prof_path)
    stats = st.stats
    requests = sum(v[1] for k, v in stats.items() if k[0].endswith("fuse/server.py") and k[2] == "handle")
    requests = max(requests, 1)
    rows, stages = [], {}
    for key, (cc, nc, tt, ct, callers) in stats.items():
        if tt <= 0:
            continue
        short = f"{key[0].split('/vhostfs/')[-1].split('/lib/python3.11/')[-1]}:{key[1]}({key[2]})"
        parts = stage_of(key, stats)
        rows.append({"fn": short, "stage": parts[0][0] if len(parts) == 1 else "(callers)",
                     "calls_per_req": nc / requests, "tottime_us_per_req": tt / requests * 1e6,
                     "cumtime_us_per_req": ct / requests * 1e6})
        for sg, fr in parts:
            stages[sg] = stages.get(sg, 0.0) + fr * tt / requests * 1e6
    rows.sort(key=lambda r: -r["tottime_us_per_req"])
    startup = [k for k, _ in STAGES][0]
    per_req = sum(v for k, v in stages.items() if k != startup)
    return {"requests": requests, "profiled_us_per_req": per_req,
            "stages": sorted(([k, v] for k, v in stages.items()), key=lambda kv: -kv[1]),
            "top": [r for r in rows if r["stage"] != startup][:top]}


def run(cells: list[str], plain_cells: list[str], seconds: float, outdir: Path) -> dict:
    from tests.bench.backends import BackendSpec
    from tests.bench.loadgen import run_cell
    from tests.bench.workloads import WORKLOADS, Cell, make_dataset

    outdir.mkdir(parents=True, exist_ok=True)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = tempfile.mkdtemp(prefix="vhostfs-prof-", dir=base)
    shared = os.path.join(work, "share")
    make_dataset(shared, rss_files=0)
    py = sys.executable
    common = ["--log-level", "error", "--sandbox", "none"]
    summary: dict = {"seconds": seconds, "cells": {}}
    for c in cells + plain_cells:
        wname, depth = c.split("/")
        queues = 1
        if "@" in wname:
            wname, q = wname.split("@")
            queues = int(q)
        cell = Cell(wname, queues, int(depth))
        tag = c.replace("/", "-d").replace("@", "-q")
        prof = str(outdir / f"{tag}.prof")
        plain = BackendSpec("vhostfs", lambda s, d, q: [py, "-m", "vhostfs", "--socket-path", s,
                                                         "--shared-dir", d, "--num-request-queues",
                                                         str(q)] + common)
        profiled = BackendSpec("vhostfs", lambda s, d, q, prof=prof: [
            py, "-m", "tests.bench.profile", "--serve", prof, "--", "--socket-path", s,
            "--shared-dir", d, "--num-request-queues", str(q)] + common)
        runs = [("plain", plain)] + ([("cprofile", profiled)] if c in cells else [])
        entry: dict = {"workload": wname, "queues": queues, "depth": int(depth)}
        for label, spec in runs:
            r = run_cell(spec, cell, WORKLOADS[wname](), workdir=work, shared=shared,
                         warmup=0.3, seconds=seconds)
            entry[label] = {k: getattr(r, k) for k in ("status", "detail", "ops", "ops_per_s",
                                                       "cpu_us_per_op", "p50_us", "p99_us",
                                                       "peak_rss_mib", "anon_rss_mib",
                                                       "loadgen_cpu_pct", "other_cpu_pct")}
            print(f"profile: {c} {label}: {r.status} {r.ops_per_s:.0f} ops/s "
                  f"{(r.cpu_us_per_op or 0):.1f} µs/op {r.detail}", file=sys.stderr, flush=True)
        if c in cells and os.path.exists(prof):
            entry["prof"] = prof
            entry["profile"] = summarise(prof)
        summary["cells"][c] = entry
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    write(summary, outdir)
    return summary


def write(summary: dict, outdir: Path) -> None:
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1))
    (outdir / "summary.md").write_text(markdown(summary))


def markdown(summary: dict) -> str:
    L = ["# vhostfs profile (cProfile with a per-thread CPU timer, all threads)", "",
         "*profiled µs/req*: CPU under cProfile per served request (FuseServer.handle call), "
         "inflated by the profiler's per-call cost; *est. µs/op* = the stage's share of the "
         "profiled request time x the plain run's CPU µs/op (no profiler).", ""]
    L += ["| cell | plain ops/s | plain CPU µs/op | p50 µs | p99 µs | anon RSS MiB |",
          "|---|---|---|---|---|---|"]
    for c, e in summary["cells"].items():
        p = e["plain"]
        L.append(f"| {c} | {p['ops_per_s']:.0f} | {p['cpu_us_per_op'] or 0:.1f} | "
                 f"{p['p50_us'] or 0:.0f} | {p['p99_us'] or 0:.0f} | {p['anon_rss_mib'] or 0:.0f} |")
    L.append("")
    for c, e in summary["cells"].items():
        if "profile" not in e:
            continue
        p, pr = e["plain"], e["profile"]
        L += [f"## {c}", "",
              f"{pr['requests']} requests profiled; {pr['profiled_us_per_req']:.1f} profiled CPU µs per "
              f"request (plain run: {p['cpu_us_per_op'] or 0:.1f} µs/op).", "",
              "| stage | profiled µs/req | share | est. µs/op |", "|---|---|---|---|"]
        tot = pr["profiled_us_per_req"] or 1
        for k, v in pr["stages"]:
            if k.startswith("start-up"):
                L.append(f"| {k} | {v:.1f} | (excluded) | |")
                continue
            L.append(f"| {k} | {v:.1f} | {100 * v / tot:.0f} % | {v / tot * (p['cpu_us_per_op'] or 0):.1f} |")
        L += ["", "| function | stage | calls/req | tottime µs/req | cumtime µs/req |",
              "|---|---|---|---|---|"]
        for r in pr["top"][:15]:
            L.append(f"| `{r['fn']}` | {r['stage']} | {r['calls_per_req']:.2f} | "
                     f"{r['tottime_us_per_req']:.2f} | {r['cumtime_us_per_req']:.2f} |")
        L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        rest = argv[2:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        return serve(argv[1], rest)
    ap = argparse.ArgumentParser(prog="python3 -m tests.bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=",".join(DEFAULT_CELLS),
                    help="workload/depth[,...] run plain and under cProfile; workload@4/depth: 4 queues")
    ap.add_argument("--plain-cells", default=",".join(PLAIN_CELLS),
                    help="cells run without the profiler only (CPU/op, latency, RSS)")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", default="out/bench/profile")
    ap.add_argument("--resummarise", action="store_true",
                    help="re-read <out>/summary.json and its .prof files; measure nothing")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.resummarise:
        s = json.loads((out / "summary.json").read_text())
        for e in s["cells"].values():
            if e.get("prof") and os.path.exists(e["prof"]):
                e["profile"] = summarise(e["prof"])
        write(s, out)
    else:
        s = run([c for c in a.cells.split(",") if c], [c for c in a.plain_cells.split(",") if c],
                a.seconds, out)
    print(markdown(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
