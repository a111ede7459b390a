"""Per-opcode request counters: count, errors, latency histogram.

``Metrics.record`` is the ``FuseServer.observer`` (called once per request, from any
worker thread); ``Metrics.dump`` logs one info line per opcode seen plus a total, on
SIGUSR1 and at exit.  At debug level ``record`` also logs one trace line per request
(opcode, unique, nodeid, errno, latency).

Latency buckets are powers of two in microseconds: bucket ``i`` counts requests that took
less than ``2**i`` µs (and at least ``2**(i-1)``); the last bucket is open-ended.
"""
from __future__ import annotations

import errno as errno_mod
import threading

from vhostfs.fuse import abi
from vhostfs.log import get_logger

log = get_logger("vhostfs.metrics")

#: bucket i: latency < 2**i µs; the last one: >= 2**(BUCKETS-2) µs (about 0.5 s and more).
BUCKETS = 21


def opcode_name(opcode: int) -> str:
    try:
        return abi.Opcode(opcode).name
    except ValueError:
        return f"OPCODE_{opcode}"


def errno_name(err: int) -> str:
    return errno_mod.errorcode.get(err, str(err)) if err else "OK"


def bucket_of(elapsed_ns: int) -> int:
    return min((elapsed_ns // 1000).bit_length(), BUCKETS - 1)


def bucket_label(i: int) -> str:
    return f"<{1 << i}us" if i < BUCKETS - 1 else f">={1 << (BUCKETS - 2)}us"


class _OpStats:
    __slots__ = ("count", "errors", "total_ns", "max_ns", "hist")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.total_ns = 0
        self.max_ns = 0
        self.hist = [0] * BUCKETS


class Metrics:
    """Thread-safe per-opcode statistics of one FUSE session."""

    def __init__(self, *, trace: bool = False) -> None:
        self.trace = trace
        self._lock = threading.Lock()
        self._ops: dict[int, _OpStats] = {}

    def record(self, opcode: int, unique: int, nodeid: int, err: int, elapsed_ns: int) -> None:
        """One finished request (``err`` 0 = success).  Never raises.  Called for every
        request, so bucket_of is inlined and the common case takes one dict lookup."""
        b = (elapsed_ns // 1000).bit_length()
        if b >= BUCKETS:
            b = BUCKETS - 1
        with self._lock:
            try:
                st = self._ops[opcode]
            except KeyError:
                st = self._ops[opcode] = _OpStats()
            st.count += 1
            if err:
                st.errors += 1
            st.total_ns += elapsed_ns
            if elapsed_ns > st.max_ns:
                st.max_ns = elapsed_ns
            st.hist[b] += 1
        if self.trace:
            log.debug("fuse request", op=opcode_name(opcode), unique=unique, nodeid=nodeid,
                      errno=errno_name(err), us=round(elapsed_ns / 1000, 1))

    def snapshot(self) -> dict[str, dict]:
        """{opcode name: {count, errors, mean_us, max_us, p50_us, p99_us, hist}}, where
        p50/p99 are bucket upper bounds and ``hist`` maps bucket labels to counts."""
        with self._lock:
            ops = {op: (st.count, st.errors, st.total_ns, st.max_ns, list(st.hist))
                   for op, st in self._ops.items()}
        out: dict[str, dict] = {}
        for op in sorted(ops):
            count, errors, total_ns, max_ns, hist = ops[op]
            out[opcode_name(op)] = {
                "count": count, "errors": errors,
                "mean_us": round(total_ns / count / 1000, 1) if count else 0.0,
                "max_us": round(max_ns / 1000, 1),
                "p50_us": _quantile(hist, count, 0.50),
                "p99_us": _quantile(hist, count, 0.99),
                "hist": {bucket_label(i): n for i, n in enumerate(hist) if n},
            }
        return out

    def dump(self, reason: str, *, skip_empty: bool = False) -> None:
        """Log the counters at info level: one line per opcode, then a total.

        ``skip_empty``: log nothing when no request was recorded (the exit dump of a
        process that served none, e.g. a sandbox parent waiting for its child)."""
        snap = self.snapshot()
        total = sum(s["count"] for s in snap.values())
        if skip_empty and not total:
            return
        errors = sum(s["errors"] for s in snap.values())
        for name, s in snap.items():
            log.info("fuse op stats", op=name, count=s["count"], errors=s["errors"],
                     mean_us=s["mean_us"], p50_us=s["p50_us"], p99_us=s["p99_us"],
                     max_us=s["max_us"],
                     hist=" ".join(f"{k}:{v}" for k, v in s["hist"].items()))
        log.info("fuse stats", reason=reason, requests=total, errors=errors, opcodes=len(snap))


def _quantile(hist: list[int], count: int, q: float) -> int | None:
    """Upper bound (µs) of the bucket holding quantile ``q``; None for the open bucket."""
    if not count:
        return 0
    need = q * count
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= need and n:
            return (1 << i) if i < BUCKETS - 1 else None
    return None
