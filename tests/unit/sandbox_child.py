"""Run inside a sandboxed child by test_sandbox.py: enter --sandbox MODE (and
--seccomp ACTION) the way the daemon does, then attack the share through the FUSE
server and report what happened as one JSON line on stdout.

argv: MODE SECCOMP SHARE [MODCAPS] [EXTRA]   EXTRA=exec: try execve after the filter.
"""
from __future__ import annotations

import errno
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from test_fuse_fakes import FuseError  # noqa: E402
from test_passthrough_roundtrip import Client  # noqa: E402
from vhostfs import sandbox  # noqa: E402
from vhostfs.config import Config  # noqa: E402
from vhostfs.fs.passthrough import PassthroughFs, inodes  # noqa: E402
from vhostfs.fuse.server import FuseServer  # noqa: E402


class _Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.fs = PassthroughFs(config.shared_dir)
        self.server = FuseServer(self.fs)


def attempt(fn, *a):
    try:
        return ["ok", repr(fn(*a))[:80]]
    except FuseError as e:
        return ["errno", errno.errorcode.get(e.errno, e.errno)]
    except OSError as e:
        return ["oserror", errno.errorcode.get(e.errno, e.errno)]


def main() -> int:
    mode, action, share = sys.argv[1:4]
    modcaps = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    extra = sys.argv[5] if len(sys.argv) > 5 else ""
    config = Config(shared_dir=share, socket_path="/nonexistent.sock", sandbox=mode,
                    seccomp=action, modcaps=modcaps, max_inodes=64)
    d = _Daemon(config)
    jail = sandbox.apply(d)
    if jail.is_parent:
        return jail.wait_child()
    out: dict = {"pid": os.getpid(), "root": sorted(os.listdir("/")),
                 "proc_self_fd": inodes.PROC_SELF_FD,
                 "socket_path": d.config.socket_path}
    status = {}
    with open(f"{inodes.PROC_SELF_FD}/../status") as f:
        for line in f:
            k, _, v = line.partition(":")
            status[k] = v.strip()
    out["caps"] = {k: status.get(k) for k in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb",
                                               "NoNewPrivs", "Seccomp", "Groups")}
    c = Client(FuseServer(d.fs))
    c.init()
    out["dotdot"] = attempt(lambda: c.lookup(1, b"..")[0])
    link = c.lookup(1, b"to_outside")[0]
    out["open_symlink"] = attempt(c.open, link, os.O_RDONLY)
    etc = c.lookup(1, b"to_etc")[0]
    out["open_symlink_dir"] = attempt(c.opendir, etc)
    out["lookup_under_symlink"] = attempt(c.lookup, etc, b"passwd")
    out["lookup_slash"] = attempt(c.lookup, 1, b"etc/passwd")
    entry, opened = c.create(1, b"created")
    nid, fh = entry[0], opened[0]
    c.write(nid, fh, 0, b"inside")
    out["read_back"] = attempt(lambda: bytes(c.read(nid, fh, 0, 100)))
    c.release(nid, fh)
    # the inode bound (max_inodes=64): a guest that never forgets
    got = []
    for i in range(80):
        r = attempt(c.mkdir, 1, f"d{i}".encode())
        got.append(r[1] if r[0] != "ok" else "ok")
    out["mkdir_results"] = sorted(set(got))
    out["mkdir_ok"] = got.count("ok")
    out["inodes"] = len(d.fs.inodes)
    if extra == "exec":
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
        os.execv("/bin/true", ["true"])     # not on the allow-list
    if extra == "unshare":
        from vhostfs.sandbox import _libc
        out["unshare"] = attempt(_libc.unshare, _libc.CLONE_NEWNS)
        out["mount"] = attempt(_libc.mount, "proc", "/", "proc", 0)
    print(json.dumps(out))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
