"""Build ``vhostfs._hostsys``: the one compiled helper of the project.

Out-of-line API mode.  The declarations and C sources are split by concern into
``cffi_build/parts/NAME.h`` (the cdef: declarations only, as cffi parses them) and
``cffi_build/parts/NAME.c`` (the implementation compiled into the module), so that
ring atomics and syscall wrappers can grow independently.  Only
``vhostfs/hostsys.py`` imports the result.
"""
from __future__ import annotations

import pathlib

from cffi import FFI

PARTS = pathlib.Path(__file__).resolve().parent / "parts"


def _parts(suffix: str) -> str:
    return "\n".join(p.read_text() for p in sorted(PARTS.glob(f"*{suffix}")))


ffibuilder = FFI()
ffibuilder.cdef(_parts(".h"))
ffibuilder.set_source(
    "vhostfs._hostsys",
    # The .h parts are plain C too: compiled ahead of the .c parts, they are the one
    # definition of the shared structs and constants, and every definition is checked
    # against its declaration.  (Python.h already defines _GNU_SOURCE.)
    "#include <stdint.h>\n" + _parts(".h") + "\n" + _parts(".c"),
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    # `python cffi_build/build_hostsys.py` builds in place, next to vhostfs/.
    import os

    os.chdir(pathlib.Path(__file__).resolve().parent.parent)
    ffibuilder.compile(verbose=False)
