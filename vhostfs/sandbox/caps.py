"""Capability drop: keep only what the passthrough needs, as virtiofsd does.

The default set is virtiofsd's (chown, dac_override, fowner, fsetid, setgid, setuid,
mknod, setfcap): the passthrough switches fsuid/fsgid per request (setuid/setgid),
creates files for other owners (chown, fowner, fsetid), device nodes (mknod) and
files with file capabilities (setfcap), and must reach files whatever their mode
(dac_override).  ``--modcaps`` adjusts it: ``+sys_admin:-mknod`` (virtiofsd's syntax).
Everything else leaves the effective, permitted, inheritable, ambient and bounding
sets.  Must run before any other thread exists (capabilities are per thread).
"""
from __future__ import annotations

import os

from vhostfs.errors import ConfigError
from vhostfs.sandbox import _libc

#: capability number by name (linux/capability.h)
CAPS = {
    "chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "fsetid": 4,
    "kill": 5, "setgid": 6, "setuid": 7, "setpcap": 8, "linux_immutable": 9,
    "net_bind_service": 10, "net_broadcast": 11, "net_admin": 12, "net_raw": 13,
    "ipc_lock": 14, "ipc_owner": 15, "sys_module": 16, "sys_rawio": 17, "sys_chroot": 18,
    "sys_ptrace": 19, "sys_pacct": 20, "sys_admin": 21, "sys_boot": 22, "sys_nice": 23,
    "sys_resource": 24, "sys_time": 25, "sys_tty_config": 26, "mknod": 27, "lease": 28,
    "audit_write": 29, "audit_control": 30, "setfcap": 31, "mac_override": 32,
    "mac_admin": 33, "syslog": 34, "wake_alarm": 35, "block_suspend": 36, "audit_read": 37,
    "perfmon": 38, "bpf": 39, "checkpoint_restore": 40,
}
DEFAULT_KEEP = ("chown", "dac_override", "fowner", "fsetid", "setgid", "setuid", "mknod",
                "setfcap")


def parse_modcaps(spec: str | None, base=DEFAULT_KEEP) -> frozenset[str]:
    """``+name:-name:...`` applied to ``base`` -> the set of capability names to keep.

    Names are case-insensitive with or without the ``cap_`` prefix.  An unknown name or
    a missing sign raises ConfigError naming --modcaps.
    """
    keep = set(base)
    if not spec:
        return frozenset(keep)
    for item in spec.split(":"):
        if not item:
            continue
        sign, name = item[0], item[1:].lower()
        if name.startswith("cap_"):
            name = name[4:]
        if sign not in "+-" or name not in CAPS:
            raise ConfigError(f"--modcaps: invalid item {item!r} (expected +name or -name, "
                              f"e.g. +sys_admin:-mknod)")
        (keep.add if sign == "+" else keep.discard)(name)
    return frozenset(keep)


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return max(CAPS.values())


def drop(keep: frozenset[str] | set[str]) -> int:
    """Drop every capability not in ``keep`` from all sets; returns the kept mask."""
    mask = 0
    for name in keep:
        mask |= 1 << CAPS[name]
    eff, perm, _inh = _libc.capget()
    mask &= perm                      # cannot keep what we do not have
    _libc.prctl(_libc.PR_CAP_AMBIENT, _libc.PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(last_cap() + 1):
        if not mask & (1 << cap):
            try:
                _libc.prctl(_libc.PR_CAPBSET_DROP, cap)
            except OSError as exc:    # EPERM without CAP_SETPCAP: nothing to drop there
                if exc.errno != 1:
                    raise
    _libc.capset(mask, mask, 0)
    return mask


def drop_supplementary_groups() -> None:
    """setgroups([]) (needs CAP_SETGID; a process without it keeps its own groups)."""
    try:
        os.setgroups([])
    except PermissionError:
        pass
