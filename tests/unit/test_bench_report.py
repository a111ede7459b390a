"""Benchmark report math and output (no timing, no backend)."""
from __future__ import annotations

import json
import math

import pytest

from tests.bench import report


@pytest.mark.parametrize("samples, p, expected", [
    ([5.0], 50, 5.0),
    ([5.0], 99, 5.0),
    ([1, 2, 3, 4], 50, 2.5),
    ([4, 3, 2, 1], 0, 1),
    ([4, 3, 2, 1], 100, 4),
    (list(range(1, 101)), 99, 99.01),
    (list(range(1, 101)), 50, 50.5),
    ([10, 20], 25, 12.5),
])
def test_percentile_linear_interpolation(samples, p, expected):
    assert math.isclose(report.percentile(samples, p), expected)


def test_percentile_errors():
    with pytest.raises(ValueError):
        report.percentile([], 50)
    with pytest.raises(ValueError):
        report.percentile([1], 101)


def test_ratio():
    assert report.ratio(3.0, 2.0) == 1.5
    assert report.ratio(None, 2.0) is None
    assert report.ratio(1.0, None) is None
    assert report.ratio(1.0, 0) is None


def test_targets_follow_issue_7():
    assert report.target_for("seqread-1m", 1) == 1.0
    assert report.target_for("seqwrite-1m", 32) == 1.0
    assert report.target_for("randread-4k", 32) == 0.8
    assert report.target_for("lookup-getattr", 1) == 0.6


def _r(backend, workload="randread-4k", q=1, d=32, ops=100.0, cpu=10.0, rss=20.0, status="ok"):
    return {"backend": backend, "workload": workload, "queues": q, "depth": d, "ops_per_s": ops,
            "mib_per_s": None, "p50_us": 1.0, "p99_us": 2.0, "cpu_us_per_op": cpu,
            "backend_cpu_pct": 50.0, "loadgen_cpu_pct": 50.0, "peak_rss_mib": rss,
            "status": status, "detail": ""}


def test_ratios_only_for_identical_cells():
    results = [
        _r("vhostfs", ops=80, cpu=30, rss=40), _r("virtiofsd-rust", ops=100, cpu=10, rss=20),
        _r("virtiofsd-c", ops=200, cpu=5, rss=10),
        _r("vhostfs", d=1, ops=50), _r("virtiofsd-rust", d=1, ops=100),
        _r("vhostfs", q=4, ops=300), _r("virtiofsd-rust", q=4, status="unsupported"),
    ]
    rows = {(x["queues"], x["depth"]): x for x in report.ratios(results, "vhostfs",
                                                                  ["virtiofsd-rust", "virtiofsd-c"])}
    a = rows[(1, 32)]
    assert a["virtiofsd-rust"] == {"ops": 0.8, "cpu_per_op": 3.0, "peak_rss": 2.0,
                                   "ref_loadgen_bound": False}
    assert a["virtiofsd-c"]["ops"] == 0.4
    assert a["target"] == 0.8 and a["target_met"] is True
    assert rows[(1, 1)]["target_met"] is False          # 0.5 < 0.6
    assert rows[(4, 32)]["virtiofsd-rust"]["ops"] is None and rows[(4, 32)]["target_met"] is None


def _doc(results, rss=()):
    return {"environment": {"date": "d", "machine": "m", "seconds": 1, "warmup": 0},
            "backends": [{"name": "vhostfs", "version": "v", "request_queues": 4, "notes": []},
                         {"name": "virtiofsd-rust", "version": "1.13", "request_queues": 1, "notes": []}],
            "skipped": {"virtiofsd-c": "not installed"}, "workload_order": ["randread-4k"],
            "results": results, "rss": list(rss), "notes": ["n1"],
            "ratios": report.ratios(results, "vhostfs", ["virtiofsd-rust"])}


def test_markdown_tables_are_well_formed():
    results = [_r("vhostfs"), _r("virtiofsd-rust", ops=200),
               dict(_r("vhostfs", q=4), status="error", detail="line one\nline | two")]
    md = report.markdown(_doc(results, [{"backend": "vhostfs", "inodes_wanted": 100000,
                                         "inodes_looked_up": 100000, "rss_mib": 90.5,
                                         "status": "ok", "detail": ""}]))
    assert "0.50x" in md and "**no**" in md
    assert "line one line \\| two" in md
    assert "not run: **virtiofsd-c**" in md
    assert "90.5" in md
    # each table: separator row has as many columns as its header
    blocks, cur = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            blocks.append(cur)
            cur = []
    for block in blocks:
        ncols = block[1].count("---")
        for line in block:
            assert line.replace("\\|", "").count("|") == ncols + 1


def test_write_outputs(tmp_path):
    doc = _doc([_r("vhostfs"), _r("virtiofsd-rust")])
    paths = report.write_outputs(doc, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["backend"] == "vhostfs"
    assert (tmp_path / "results.md").read_text().startswith("# vhostfs benchmark")
    assert paths["png"].endswith("results.png") or paths["png"].startswith("not written")


def test_ratio_flags_a_reference_capped_by_the_load_generator():
    results = [_r("vhostfs", ops=50), dict(_r("virtiofsd-rust", ops=100), loadgen_cpu_pct=97.0)]
    [row] = report.ratios(results, "vhostfs", ["virtiofsd-rust"])
    assert row["virtiofsd-rust"]["ref_loadgen_bound"] is True
    assert "0.50x†" in report.markdown(_doc(results))


def test_rss_slope_uses_the_second_half_and_labels_extrapolation():
    curve = [(5000, 30.0), (10000, 35.0), (15000, 40.0), (20000, 45.0)]
    got = report.rss_slope(20.0, curve, 100_000)
    assert math.isclose(got["rss_mib_per_1000_inodes"], 1.0)
    assert math.isclose(got["rss_extrapolated_mib"], 125.0)
    assert "rss_extrapolated_mib" not in report.rss_slope(20.0, curve, 20_000)
    assert report.rss_slope(20.0, [], 10) == {}
    assert math.isclose(report.rss_slope(20.0, [(4000, 24.0)], 4000)["rss_mib_per_1000_inodes"], 1.0)
