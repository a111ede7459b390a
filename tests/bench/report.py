"""Benchmark arithmetic and output: percentiles, ratios, Markdown, JSON and a PNG chart.

Pure functions over the result dicts (``CellResult.to_json()``), so unit tests can feed
them tables by hand.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Sequence

REFERENCE = "virtiofsd-rust"       # the targets are ratios against this one
SUBJECT = "vhostfs"
LOADGEN_BOUND_PCT = 90.0           # a cell whose load generator ran this busy measured it, not the backend


def percentile(samples: Sequence[float], p: float) -> float:
    """The p-th percentile by linear interpolation between closest ranks (numpy's default).

    ``samples`` need not be sorted; raises ValueError when empty or p is outside 0..100.
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} outside 0..100")
    xs = sorted(samples)
    k = (len(xs) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ratio(subject: float | None, reference: float | None) -> float | None:
    """subject / reference, or None when either is missing or the reference is zero."""
    if subject is None or reference is None or reference == 0:
        return None
    return subject / reference


def target_for(workload: str, depth: int) -> float:
    """Issue 7's throughput target (vs the Rust virtiofsd) for a cell."""
    if workload.endswith("-1m"):
        return 1.0
    return 0.8 if depth >= 32 else 0.6


def _key(r: dict) -> tuple[str, int, int]:
    return r["workload"], r["queues"], r["depth"]


def ratios(results: Iterable[dict], subject: str = SUBJECT, references: Sequence[str] = ()) -> list[dict]:
    """One row per measured subject cell: ops/s, CPU/op and peak-RSS ratios against each
    reference measured on the identical cell (same workload, queues, depth)."""
    results = list(results)
    by = {(r["backend"],) + _key(r): r for r in results if r.get("status") == "ok"}
    rows = []
    for r in results:
        if r["backend"] != subject or r.get("status") != "ok":
            continue
        row = {"workload": r["workload"], "queues": r["queues"], "depth": r["depth"],
               "target": target_for(r["workload"], r["depth"])}
        for ref in references:
            other = by.get((ref,) + _key(r))
            row[ref] = {
                "ops": ratio(r["ops_per_s"], other["ops_per_s"]) if other else None,
                "cpu_per_op": ratio(r["cpu_us_per_op"], other["cpu_us_per_op"]) if other else None,
                "peak_rss": ratio(r["peak_rss_mib"], other["peak_rss_mib"]) if other else None,
                # the reference's ops/s was capped by the load generator: the true ratio is lower
                "ref_loadgen_bound": bool(other) and other.get("loadgen_cpu_pct", 0) >= LOADGEN_BOUND_PCT,
            }
        ref = row.get(REFERENCE, {}).get("ops") if REFERENCE in references else None
        row["target_met"] = None if ref is None else ref >= row["target"]
        rows.append(row)
    return rows


def rss_slope(base_mib: float, curve: Sequence[tuple[int, float]], wanted: int) -> dict:
    """MiB per 1,000 inodes over the second half of the measured curve (past start-up
    allocations), and, when fewer than ``wanted`` inodes were reached, the linear
    extrapolation to ``wanted`` (an estimate, reported as such)."""
    if not curve:
        return {}
    hi_n, hi_rss = curve[-1]
    lo = [p for p in curve if p[0] <= hi_n // 2]
    lo_n, lo_rss = lo[-1] if lo else (0, base_mib)
    if hi_n <= lo_n:
        return {}
    per_k = (hi_rss - lo_rss) / (hi_n - lo_n) * 1000
    out = {"rss_mib_per_1000_inodes": per_k}
    if hi_n < wanted:
        out["rss_extrapolated_mib"] = hi_rss + per_k * (wanted - hi_n) / 1000
    return out


# -- formatting ----------------------------------------------------------------------------
def fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def cell_text(text: str, limit: int = 160) -> str:
    """One Markdown table cell: one line, no pipes, at most ``limit`` characters."""
    one = " ".join(str(text).split()).replace("|", "\\|")
    return one if len(one) <= limit else one[:limit - 1] + "…"


def _status(r: dict) -> str:
    return cell_text(r["status"] + (f": {r['detail']}" if r.get("detail") else ""))


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def markdown(doc: dict) -> str:
    results = doc["results"]
    backends = [b["name"] for b in doc["backends"]]
    refs = [b for b in backends if b != SUBJECT]
    lines = ["# vhostfs benchmark: simulated frontend, no guest", ""]
    env = doc["environment"]
    lines += [f"Run {env['date']} on {env['machine']}; {env['seconds']} s measured per cell after "
              f"{env['warmup']} s warm-up; depth = requests in flight per request queue; an op is "
              "one FUSE request on a request queue (FORGETs go to hiprio, uncounted). "
              "Latency is submit-to-reap in the load generator; CPU/op is the backend process "
              "tree's utime+stime over the window divided by the ops; peak RSS is VmHWM, which counts "
              "the guest-RAM pages the backend touched (up to depth x queues x 1 MiB for the 1 MiB "
              "workloads); anon RSS is RssAnon at the end of the window, the backend's private "
              "memory. "
              "Load-generator CPU near 100% means the (Python, single-thread) load generator, not "
              "the backend, bounds the throughput of that cell; other load is the rest of the machine "
              "(e.g. other users' QEMU) during the window, in % of one CPU.", ""]
    lines += ["Backends: " + "; ".join(
        f"**{b['name']}** {b.get('version', '')} (request queues: {b.get('request_queues', '?')}"
        + (f"; {', '.join(b['notes'])}" if b.get("notes") else "") + ")" for b in doc["backends"])]
    for name, why in doc.get("skipped", {}).items():
        lines.append(f"- not run: **{name}**: {cell_text(why, 300)}")
    lines.append("")
    header = ["workload", "q", "depth", "backend", "ops/s", "MiB/s", "p50 µs", "p99 µs",
              "CPU µs/op", "backend CPU %", "loadgen CPU %", "other load %", "peak RSS MiB",
              "anon RSS MiB", "status"]
    rows = []
    order = {b: i for i, b in enumerate(backends)}
    for r in sorted(results, key=lambda r: (doc["workload_order"].index(r["workload"]),
                                            r["queues"], r["depth"], order.get(r["backend"], 99))):
        ok = r["status"] == "ok"
        rows.append([r["workload"], str(r["queues"]), str(r["depth"]), r["backend"],
                     fmt(r["ops_per_s"]) if ok else "-", fmt(r["mib_per_s"], 1) if ok else "-",
                     fmt(r["p50_us"], 1), fmt(r["p99_us"], 1), fmt(r["cpu_us_per_op"], 1),
                     fmt(r["backend_cpu_pct"]) if ok else "-", fmt(r["loadgen_cpu_pct"]) if ok else "-",
                     fmt(r.get("other_cpu_pct")) if ok else "-",
                     fmt(r["peak_rss_mib"], 1), fmt(r.get("anon_rss_mib"), 1), _status(r)])
    lines += ["## Per backend and cell", ""] + _table(header, rows) + [""]
    rat = doc.get("ratios") or []
    if rat and refs:
        header = ["workload", "q", "depth", "target (ops vs rust)"]
        for ref in refs:
            header += [f"ops/s vs {ref}", f"CPU/op vs {ref}", f"RSS vs {ref}"]
        header.append("target met")
        rows = []
        for x in rat:
            if not any((x.get(ref) or {}).get("ops") is not None for ref in refs):
                continue           # no reference served this cell (e.g. 4 queues): nothing to compare
            row = [x["workload"], str(x["queues"]), str(x["depth"]), f">= {x['target']:.1f}x"]
            for ref in refs:
                v = x.get(ref) or {}
                row += [fmt_ratio(v.get("ops")) + ("†" if v.get("ref_loadgen_bound") else ""),
                        fmt_ratio(v.get("cpu_per_op")), fmt_ratio(v.get("peak_rss"))]
            row.append({True: "yes", False: "**no**", None: "-"}[x["target_met"]])
            rows.append(row)
        lines += [f"## Ratios {SUBJECT} / reference (same cell; CPU/op and RSS: lower is better)", ""]
        lines += _table(header, rows) + [""]
        if any("†" in c for r in rows for c in r):
            lines += [f"† the reference's load generator ran >= {LOADGEN_BOUND_PCT:.0f}% busy in that cell, so "
                      "its ops/s is a floor and the true ops/s ratio is lower; CPU/op stays comparable.", ""]
    rss = doc.get("rss") or []
    if rss:
        lines += ["## RSS after N distinct LOOKUPs (issue 7 target for vhostfs: < 150 MiB at 100,000)", ""]
        rows = [[x["backend"], x.get("args", "-"), fmt(x.get("inodes_wanted")), fmt(x.get("inodes_looked_up")),
                 fmt(x.get("rss_after_init_mib"), 1), fmt(x.get("rss_mib"), 1), fmt(x.get("peak_rss_mib"), 1),
                 fmt(x.get("anon_rss_mib"), 1),
                 fmt(x.get("rss_mib_per_1000_inodes"), 2),
                 ("~" + fmt(x["rss_extrapolated_mib"], 0)) if "rss_extrapolated_mib" in x else "-",
                 fmt(x.get("open_fds")), " / ".join(x.get("nofile_limit", [])) or "-",
                 _status(x)] for x in rss]
        lines += _table(["backend", "inode references", "wanted", "looked up", "RSS after INIT MiB", "RSS MiB",
                         "peak RSS MiB", "anon RSS MiB", "MiB / 1,000 inodes", "estimate at wanted MiB",
                         "open fds", "nofile soft / hard", "status"], rows) + [""]
        if any("rss_extrapolated_mib" in x for x in rss):
            lines += ["The estimate column is a linear extrapolation of the measured slope (second "
                      "half of the run), not a measurement: the backend stopped early (see status); "
                      "the measured points are in results.json (rss_curve).", ""]
    for note in doc.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def write_outputs(doc: dict, outdir: str) -> dict[str, str]:
    """results.json, results.md and (matplotlib permitting) results.png; returns paths/why."""
    os.makedirs(outdir, exist_ok=True)
    paths = {}
    p = os.path.join(outdir, "results.json")
    with open(p, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    paths["json"] = p
    p = os.path.join(outdir, "results.md")
    with open(p, "w") as f:
        f.write(markdown(doc))
    paths["md"] = p
    try:
        paths["png"] = chart(doc, os.path.join(outdir, "results.png"))
    except ImportError as exc:
        paths["png"] = f"not written: {exc} (make bench installs the 'bench' extra)"
    return paths


def chart(doc: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = [b["name"] for b in doc["backends"]]
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    cells = []
    for w in doc["workload_order"]:
        for r in sorted({(r["queues"], r["depth"]) for r in ok if r["workload"] == w}):
            cells.append((w,) + r)
    by = {(r["backend"], r["workload"], r["queues"], r["depth"]): r for r in ok}
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.55 * len(cells) * max(1, len(backends)) / 2), 9),
                             sharex=True)
    width = 0.8 / max(1, len(backends))
    for i, b in enumerate(backends):
        xs = [k + (i - (len(backends) - 1) / 2) * width for k in range(len(cells))]
        ops = [by.get((b,) + c, {}).get("ops_per_s") or 0 for c in cells]
        cpu = [by.get((b,) + c, {}).get("cpu_us_per_op") or 0 for c in cells]
        axes[0].bar(xs, ops, width, label=b)
        axes[1].bar(xs, cpu, width, label=b)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ops/s (higher is better)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("backend CPU µs per op (lower is better)")
    axes[0].legend()
    axes[0].set_title("virtio-fs backends under a simulated frontend (no guest)")
    axes[1].set_xticks(range(len(cells)))
    axes[1].set_xticklabels([f"{w} q{q} d{d}" for w, q, d in cells], rotation=60, ha="right", fontsize=8)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
