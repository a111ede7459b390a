"""Coverage-guided fuzzing (atheris/libFuzzer) of the targets in targets.py.

    python3 tests/fuzz/atheris_main.py TARGET [libFuzzer options] [CORPUS_DIR ...]

TARGET: vhost_user, chain or fuse.  vhostfs is imported instrumented.  A crash (any
exception out of the target) writes ``crash-*`` reproducers in the working directory
(``-artifact_prefix=DIR/``); replay one with ``... TARGET crash-file``.
"""
from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports(include=["vhostfs"]):
    from tests.fuzz import targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        sys.exit(f"usage: atheris_main.py {{{','.join(targets.TARGETS)}}} [libFuzzer options]")
    target = targets.TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0]] + sys.argv[2:], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
