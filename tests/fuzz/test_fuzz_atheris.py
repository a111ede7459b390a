"""Coverage-guided fuzzing in the test suite: each atheris target runs for
``VHOSTFS_FUZZ_SECONDS`` (default 8) and must finish without a crash.  ``make fuzz``
runs them for longer with a corpus kept in .fuzz-corpus/."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SECONDS = int(os.environ.get("VHOSTFS_FUZZ_SECONDS", "8"))
CORPUS = os.environ.get("VHOSTFS_FUZZ_CORPUS")


@pytest.mark.parametrize("target", ["vhost_user", "chain", "fuse"])
def test_atheris_target(target, tmp_path):
    args = [sys.executable, str(HERE / "atheris_main.py"), target,
            f"-max_total_time={SECONDS}", "-rss_limit_mb=2048", "-timeout=20",
            f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]
    if CORPUS:
        corpus = pathlib.Path(CORPUS) / target
        corpus.mkdir(parents=True, exist_ok=True)
        args.append(str(corpus))
    res = subprocess.run(args, capture_output=True, text=True, timeout=SECONDS + 120, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    out = res.stdout + res.stderr
    crashes = list(tmp_path.glob("crash-*")) + list(tmp_path.glob("timeout-*"))
    assert res.returncode == 0 and not crashes, out[-6000:]
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
    assert runs and int(runs.group(1)) > 50, out[-3000:]
    cov = re.search(r"cov: (\d+)", out)
    assert cov and int(cov.group(1)) > 0, out[-3000:]
