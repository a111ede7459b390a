"""The device state vhostfs sends through the vhost-user DEVICE_STATE pipe.

Wire format (all integers little-endian)::

    magic    8 bytes  b"VHFSMIG\\0"
    version  u32      STATE_VERSION
    reserved u32      0
    length   u64      bytes of payload
    sha256   32 bytes of payload
    payload  length bytes: UTF-8 JSON (below)

A state that is truncated, longer than announced, corrupt (checksum), of another
version, or whose JSON does not follow the schema is rejected with
:class:`MigrationStateError` naming what is wrong; nothing is applied from it.

Payload (version 1)::

    {"mode": "find-paths" | "file-handles",
     "fuse": {"initialized": bool, "proto_minor": int, "flags": int, "writeback_on": bool},
     "next_nodeid": int, "next_fh": int,
     "inodes": [{"nodeid": int >= 2, "nlookup": int >= 1, "ftype": S_IFMT bits, "ino": int,
                 "path": base64 of the path relative to the share | null,
                 "handle": {"type": int, "bytes": base64} | null,
                 "error": str | null}],
     "handles": [{"fh": int >= 1, "kind": "file" | "dir", "nodeid": int, "flags": int}],
     "dirty_log": {"page_size": 4096, "pages_marked": int}}

Each inode carries how to find it again: its path (find-paths) or its file handle
(file-handles).  ``error`` says why the source could not describe it (e.g. the file was
deleted while open); the destination then applies --migration-on-error to it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import stat
import struct

from vhostfs.errors import VhostfsError

MAGIC = b"VHFSMIG\0"
STATE_VERSION = 1
HEADER = struct.Struct("<8sIIQ32s")
MAX_STATE = 1 << 30
MODES = ("find-paths", "file-handles")
ON_ERROR = ("abort", "guest-error")
ROOT_ID = 1
_FTYPES = frozenset((stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK,
                     stat.S_IFCHR, stat.S_IFBLK))
_U64 = (1 << 64) - 1


class MigrationStateError(VhostfsError):
    """The migration state cannot be used (truncated, corrupt, wrong version, invalid)."""


def encode(state: dict) -> bytes:
    """Validate ``state`` and serialise it with the header."""
    validate(state)
    payload = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
    return HEADER.pack(MAGIC, STATE_VERSION, 0, len(payload), hashlib.sha256(payload).digest()) + payload


def decode(data: bytes) -> dict:
    """Parse and validate a state produced by :func:`encode`."""
    if len(data) < HEADER.size:
        raise MigrationStateError(f"migration state truncated: {len(data)} bytes, the header "
                                  f"alone is {HEADER.size}")
    magic, version, reserved, length, digest = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MigrationStateError(f"not a vhostfs migration state (magic {magic!r})")
    if version != STATE_VERSION:
        raise MigrationStateError(f"migration state version {version} is not supported "
                                  f"(this vhostfs reads version {STATE_VERSION})")
    if reserved:
        raise MigrationStateError(f"migration state header: reserved field is {reserved}, not 0")
    payload = data[HEADER.size:]
    if len(payload) < length:
        raise MigrationStateError(f"migration state truncated: payload is {len(payload)} of "
                                  f"{length} bytes")
    if len(payload) > length:
        raise MigrationStateError(f"migration state has {len(payload) - length} bytes after "
                                  f"its {length}-byte payload")
    if hashlib.sha256(payload).digest() != digest:
        raise MigrationStateError("migration state corrupt: payload checksum mismatch")
    try:
        state = json.loads(payload.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise MigrationStateError(f"migration state payload is not JSON: {exc}") from None
    validate(state)
    return state


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise MigrationStateError(f"invalid migration state: {what}")


def _int(v, lo: int = 0, hi: int = _U64) -> bool:
    return type(v) is int and lo <= v <= hi


def _b64(v) -> bool:
    if not isinstance(v, str):
        return False
    try:
        base64.b64decode(v, validate=True)
    except ValueError:
        return False
    return True


def validate(state) -> None:
    """Check the schema above; raise MigrationStateError naming the first problem."""
    _need(isinstance(state, dict), "top level is not an object")
    keys = {"mode", "fuse", "next_nodeid", "next_fh", "inodes", "handles", "dirty_log"}
    _need(set(state) == keys, f"keys {sorted(set(state) ^ keys)} missing or unexpected")
    _need(state["mode"] in MODES, f"mode {state['mode']!r} is not one of {MODES}")
    fuse = state["fuse"]
    _need(isinstance(fuse, dict) and set(fuse) == {"initialized", "proto_minor", "flags", "writeback_on"},
          "fuse must hold initialized, proto_minor, flags, writeback_on")
    _need(type(fuse["initialized"]) is bool and type(fuse["writeback_on"]) is bool,
          "fuse.initialized / fuse.writeback_on must be booleans")
    _need(_int(fuse["proto_minor"], 0, 0xFFFFFFFF), "fuse.proto_minor must be a u32")
    _need(_int(fuse["flags"]), "fuse.flags must be a u64")
    _need(_int(state["next_nodeid"], ROOT_ID + 1), "next_nodeid must be an integer >= 2")
    _need(_int(state["next_fh"], 1), "next_fh must be an integer >= 1")
    dl = state["dirty_log"]
    _need(isinstance(dl, dict) and dl.get("page_size") == 4096 and _int(dl.get("pages_marked"))
          and len(dl) == 2, "dirty_log must be {page_size: 4096, pages_marked: int}")
    _need(isinstance(state["inodes"], list), "inodes must be a list")
    nodeids: set[int] = set()
    for i, ino in enumerate(state["inodes"]):
        where = f"inodes[{i}]"
        _need(isinstance(ino, dict) and set(ino) == {"nodeid", "nlookup", "ftype", "ino", "path",
                                                      "handle", "error"},
              f"{where} must hold nodeid, nlookup, ftype, ino, path, handle, error")
        _need(_int(ino["nodeid"], ROOT_ID + 1), f"{where}.nodeid must be >= 2")
        _need(ino["nodeid"] < state["next_nodeid"], f"{where}.nodeid is not below next_nodeid")
        _need(ino["nodeid"] not in nodeids, f"{where}.nodeid {ino['nodeid']} appears twice")
        nodeids.add(ino["nodeid"])
        _need(_int(ino["nlookup"], 1), f"{where}.nlookup must be >= 1")
        _need(ino["ftype"] in _FTYPES, f"{where}.ftype 0o{ino['ftype']:o} is not a file type"
              if type(ino["ftype"]) is int else f"{where}.ftype is not an integer")
        _need(_int(ino["ino"]), f"{where}.ino must be a u64")
        _need(ino["path"] is None or _b64(ino["path"]), f"{where}.path must be base64 or null")
        h = ino["handle"]
        _need(h is None or (isinstance(h, dict) and set(h) == {"type", "bytes"}
                            and _int(h["type"], -(1 << 31), (1 << 31) - 1) and _b64(h["bytes"])),
              f"{where}.handle must be {{type, bytes}} or null")
        _need(ino["error"] is None or isinstance(ino["error"], str), f"{where}.error must be a string or null")
        _need(ino["error"] is not None or (ino["path"] if state["mode"] == "find-paths" else h) is not None,
              f"{where} has neither a {'path' if state['mode'] == 'find-paths' else 'handle'} nor an error")
        if ino["path"] is not None:
            rel = base64.b64decode(ino["path"])
            _need(rel != b"" and not rel.startswith(b"/") and b"\0" not in rel
                  and b".." not in rel.split(b"/"), f"{where}.path is not a relative path inside the share")
    _need(isinstance(state["handles"], list), "handles must be a list")
    fhs: set[int] = set()
    for i, h in enumerate(state["handles"]):
        where = f"handles[{i}]"
        _need(isinstance(h, dict) and set(h) == {"fh", "kind", "nodeid", "flags"},
              f"{where} must hold fh, kind, nodeid, flags")
        _need(_int(h["fh"], 1) and h["fh"] < state["next_fh"], f"{where}.fh must be in 1..next_fh-1")
        _need(h["fh"] not in fhs, f"{where}.fh {h['fh']} appears twice")
        fhs.add(h["fh"])
        _need(h["kind"] in ("file", "dir"), f"{where}.kind must be file or dir")
        _need(_int(h["nodeid"], ROOT_ID) and (h["nodeid"] == ROOT_ID or h["nodeid"] in nodeids),
              f"{where}.nodeid {h['nodeid']} is not an inode of this state")
        _need(_int(h["flags"], 0, 0xFFFFFFFF), f"{where}.flags must be a u32")
