"""Which FUSE requests may block indefinitely.

A request that can wait on the guest or on another request must not occupy a
worker-pool thread: with a pool of N threads, N such waiters would sit in front of the
request that releases them (on the device side, the deadlock the Linux commit
"virtiofs: use a unique work_struct for each async reply that can block" fixed in the
driver).  The runtime serves these on a dedicated per-request thread, with a cancel
token (``fs.api.Cancel``) that FUSE_INTERRUPT sets:

* SETLKW (POSIX and flock locks): waits for another owner's unlock, which may be a
  request queued behind it;
* OPEN, READ, WRITE of a FIFO or a character device: wait for the other end (a FIFO
  opened by one guest process and written by another, a tty);
* FSYNC, FSYNCDIR, SYNCFS: bounded, but for as long as slow storage takes.

GETLK and SETLK never wait; FLUSH and RELEASE only drop locks.

Every other request is bounded.  Most are quick (a syscall or two on the host), and the
runtime may serve them inline on the queue thread, saving the pool handoff.  Those in
``BULK`` are bounded too, but their host work grows with the data or the directory
they name: SETATTR (a truncate), FALLOCATE, COPY_FILE_RANGE, and READDIR/READDIRPLUS (a
lookup per entry).  They go to the worker pool, so they never hold up the quick
requests queued behind them.  UNLINK, RENAME and RELEASE may free a file's data too,
but they are among the commonest requests (every close, every temporary file): the
pool handoff doubled their cost in the benchmark, and virtiofsd serves them on its
queue thread; they count as quick.

The node type comes from ``FileSystem.node_type(nodeid)`` (S_IFMT bits, or None when
unknown) if the filesystem has it; without it only the opcode decides.

The decision is made on a copy of the header read before the request is served (the
runtime must choose the thread first); a guest that rewrites its request in between
only misroutes its own request onto a pool thread, it cannot make the device lose or
duplicate a reply.
"""
from __future__ import annotations

import stat
from typing import Callable

from vhostfs.fuse.abi import Opcode as O

__all__ = ["ALWAYS", "BULK", "BULK_OPS", "ON_SPECIAL_NODE", "SPECIAL_TYPES", "may_block"]

#: Opcodes that may block whatever node they name.
ALWAYS = frozenset((O.SETLKW, O.FSYNC, O.FSYNCDIR, O.SYNCFS))
#: Opcodes that may block when their node is a FIFO or a character device.
ON_SPECIAL_NODE = frozenset((O.OPEN, O.READ, O.WRITE))
SPECIAL_TYPES = frozenset((stat.S_IFIFO, stat.S_IFCHR))
#: Bounded opcodes whose host work can be long (see the module docstring).
BULK_OPS = frozenset((O.SETATTR, O.FALLOCATE, O.COPY_FILE_RANGE, O.READDIR, O.READDIRPLUS))
#: What ``FuseServer.may_block`` returns for a BULK_OPS request: serve it on the worker
#: pool (never inline); it is not a key, since a FUSE ``unique`` is never negative.
BULK = -1

NodeType = Callable[[int], "int | None"]


def may_block(opcode: int, nodeid: int, node_type: NodeType | None = None) -> bool:
    """Whether a request with this opcode on this node may wait indefinitely."""
    if opcode in ALWAYS:
        return True
    if opcode in ON_SPECIAL_NODE and node_type is not None:
        try:
            kind = node_type(nodeid)
        except (OSError, LookupError):   # unknown node: the request fails at once
            return False
        return kind is not None and stat.S_IFMT(kind) in SPECIAL_TYPES
    return False
