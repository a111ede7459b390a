"""Tools a guest test fetches on first use through a scripts/fetch-*.sh (a newer kernel,
a newer QEMU): the path the script prints last, or the test fails (in CI) or is skipped
(elsewhere) with the script's own reason."""
from __future__ import annotations

import os
import pathlib
import subprocess

import pytest


def fetched(script: pathlib.Path, what: str) -> str:
    """Run ``script`` (timeout 15 min) and return the last line it prints."""
    try:
        out = subprocess.run([str(script)], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        why = f"fetching {what} failed: {exc}"
    else:
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[-1]
        why = f"fetching {what} failed ({out.returncode}): {out.stderr.strip()[-800:]}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(why)
    pytest.skip(why)
