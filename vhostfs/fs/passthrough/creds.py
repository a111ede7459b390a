"""Per-request credentials and uid/gid translation.

``--translate-uid`` / ``--translate-gid`` (virtiofsd 1.13 syntax, repeatable):
``TYPE:SOURCE:TARGET:COUNT`` with TYPE ``guest`` (guest ids -> host ids, 1:1),
``host`` (host -> guest, 1:1), ``map`` (both ways, 1:1: ``map:GUEST:HOST:COUNT``),
``squash-guest`` (a guest range -> one host id), ``squash-host`` (a host range -> one
guest id), ``forbid-guest`` (``forbid-guest:SOURCE:COUNT``: guest ids that may not
create or own files: EPERM).  The first matching rule of a direction applies; ids no
rule matches pass unchanged.

Credentials are switched on the calling thread only, with raw syscalls (Python's
``os.setresuid`` and glibc's ``setgroups`` change every thread): fsuid, fsgid and the
supplementary groups.  A fsuid other than 0 also drops the thread's filesystem
capabilities (CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, ...), so the host kernel makes
the permission checks it would make for that user.
"""
from __future__ import annotations

import dataclasses
import errno
import os

from vhostfs import hostsys

_TYPES = ("guest", "host", "map", "squash-guest", "squash-host", "forbid-guest")


@dataclasses.dataclass(frozen=True)
class IdRule:
    type: str
    source: int
    target: int
    count: int


def parse_rule(text: str, what: str = "--translate-uid") -> IdRule:
    parts = text.split(":")
    try:
        if parts and parts[0] == "forbid-guest" and len(parts) == 3:
            typ, source, count, target = parts[0], int(parts[1]), int(parts[2]), 0
        elif len(parts) == 4:
            typ, source, target, count = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected TYPE:SOURCE:TARGET:COUNT") from None
    if typ not in _TYPES:
        raise ValueError(f"{what} {text!r}: unknown type {typ!r}")
    if count < 1 or not (0 <= source and source + count <= 1 << 32) or not 0 <= target < 1 << 32:
        raise ValueError(f"{what} {text!r}: range out of 0..2**32-1")
    if typ in ("guest", "host", "map") and target + count > 1 << 32:
        raise ValueError(f"{what} {text!r}: target range out of 0..2**32-1")
    return IdRule(typ, source, target, count)


class IdMap:
    """Translates ids between guest and host per a list of rules."""

    def __init__(self, rules=()) -> None:
        self.rules = tuple(r if isinstance(r, IdRule) else parse_rule(r) for r in rules)
        self.identity = not self.rules

    def to_host(self, gid_or_uid: int) -> int:
        i = gid_or_uid
        for r in self.rules:
            if r.type in ("guest", "map") and r.source <= i < r.source + r.count:
                return r.target + (i - r.source)
            if r.type == "squash-guest" and r.source <= i < r.source + r.count:
                return r.target
            if r.type == "forbid-guest" and r.source <= i < r.source + r.count:
                raise OSError(errno.EPERM, f"guest id {i} is forbidden by the id translation")
        return i

    def to_guest(self, host_id: int) -> int:
        i = host_id
        for r in self.rules:
            if r.type == "host" and r.source <= i < r.source + r.count:
                return r.target + (i - r.source)
            if r.type == "map" and r.target <= i < r.target + r.count:
                return r.source + (i - r.target)
            if r.type == "squash-host" and r.source <= i < r.source + r.count:
                return r.target
        return i


class Credentials:
    """Switches the calling thread to a guest caller's (translated) ids."""

    def __init__(self, uid: int, gid: int, enabled: bool) -> None:
        self.uid, self.gid, self.enabled = uid, gid, enabled
        if enabled and os.getgroups():
            # The daemon's own supplementary groups would leak into every caller's
            # checks unless each switch replaced them (a setgroups costs ~2 us of
            # kernel time each way); a root daemon needs none (its capabilities decide),
            # and the sandbox drops them anyway.  glibc's setgroups covers every thread.
            os.setgroups([])
        self.groups: list[int] = []

    def enter(self, uid: int, gid: int, supp: list[int]) -> int:
        """Become fsuid ``uid``, fsgid ``gid`` with supplementary groups ``supp`` on
        this thread.  Returns what ``leave`` must undo: 0 nothing (the daemon's own ids
        and no groups: a root daemon serving guest root keeps its capabilities), 1 the
        ids, 2 the ids and the groups."""
        if not self.enabled or (uid == self.uid and gid == self.gid and not supp):
            return 0
        token = 2 if supp else 1
        try:
            hostsys.set_fscreds(uid, gid, supp if supp else None)
        except BaseException:
            self.leave(token)
            raise
        return token

    def leave(self, token: int = 2) -> None:
        hostsys.set_fscreds(self.uid, self.gid, self.groups if token == 2 else None)
