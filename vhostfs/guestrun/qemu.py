"""Build the QEMU argv from the argument files in ``qemu-configs/``.

The files are the single source of the QEMU line (the tests, the demo and people
typing it by hand use the same ones): shell-quoted arguments, ``#`` comment lines,
``${NAME}`` placeholders.  Every placeholder must be given: a missing one is an error,
not an empty string.
"""
from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import string

CONFIG_DIR = pathlib.Path(os.environ.get(
    "VHOSTFS_QEMU_CONFIGS", pathlib.Path(__file__).resolve().parents[2] / "qemu-configs"))

MACHINE = "guest-tcg.args"
SHARE = "vhostfs-share.args"


def read_args(path: pathlib.Path, values: dict[str, str]) -> list[str]:
    """Parse one argument file, substituting ``${NAME}`` (KeyError names a missing one)."""
    argv: list[str] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            argv += shlex.split(string.Template(line).substitute(values))
        except KeyError as exc:
            raise KeyError(f"{path}:{lineno}: no value for ${{{exc.args[0]}}}") from None
    return argv


def qemu_binary() -> str:
    found = shutil.which(os.environ.get("VHOSTFS_QEMU", "qemu-system-x86_64"))
    if not found:
        raise FileNotFoundError("qemu-system-x86_64 not found (install the qemu-system-x86 package)")
    return found


def build_argv(*, kernel: str, initrd: str, append: str, socket: str, tag: str,
               memory: str = "1G", smp: int = 2, queue_size: int = 1024,
               config_dir: pathlib.Path | None = None, extra: list[str] | None = None) -> list[str]:
    cfg = config_dir or CONFIG_DIR
    values = {
        "KERNEL": kernel, "INITRD": initrd, "APPEND": append, "SOCKET": socket, "TAG": tag,
        "MEMORY": memory, "SMP": str(smp), "QUEUE_SIZE": str(queue_size),
    }
    return [qemu_binary(), *read_args(cfg / MACHINE, values), *read_args(cfg / SHARE, values),
            *(extra or [])]
