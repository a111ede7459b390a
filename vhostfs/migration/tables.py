"""Export and import of what the guest holds: FUSE session, inode and handle tables.

Works on :class:`~vhostfs.fs.passthrough.PassthroughFs` (and its DAX subclass) and
:class:`~vhostfs.fuse.server.FuseServer`.  The export runs while the device is
suspended (every ring stopped), the import into a daemon the guest has not used yet.

Modes (virtiofsd 1.13 ``--migration-mode``):

* ``find-paths``: each inode is described by its path relative to the shared
  directory (read from /proc/self/fd); the destination opens that path and checks the
  file type and inode number.
* ``file-handles``: each inode is described by its file handle
  (name_to_handle_at); the destination opens it with open_by_handle_at (needs
  CAP_DAC_READ_SEARCH and the same filesystem).

On the destination an inode or handle that cannot be found again is an error:
``abort`` (the default) fails the whole load (QEMU then fails the migration and the
source keeps running); ``guest-error`` keeps it as an invalid object so that only the
guest's requests on it fail (EBADF), the rest of the migration goes on.
"""
from __future__ import annotations

import base64
import os
import stat

from vhostfs import hostsys
from vhostfs.fs.passthrough.handles import DirHandle, FileHandle
from vhostfs.fs.passthrough import inodes as _inodes_mod
from vhostfs.fs.passthrough.inodes import Inode, key_of, stat_fd
from vhostfs.log import get_logger
from vhostfs.migration.state import MODES, ON_ERROR, ROOT_ID, MigrationStateError

log = get_logger("vhostfs.migration")

_REOPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _proc_fd(fd: int) -> bytes:
    # The sandbox moves the magic links (inodes.PROC_SELF_FD) once /proc is gone.
    return f"{getattr(_inodes_mod, 'PROC_SELF_FD', '/proc/self/fd')}/{fd}".encode()


def _path_of(fd: int, root: bytes) -> tuple[bytes | None, str | None]:
    try:
        target = os.readlink(_proc_fd(fd))
    except OSError as exc:
        return None, f"cannot read its path: {exc.strerror}"
    if target.endswith(b" (deleted)"):
        return None, "deleted on the host while the guest holds it"
    prefix = root.rstrip(b"/") + b"/"
    if not target.startswith(prefix):
        return None, f"its path {target!r} is outside the shared directory"
    return target[len(prefix):], None


def export_state(server, fs, mode: str, pages_marked: int = 0) -> dict:
    """The state dict (see state.py) of ``server``/``fs``; the device must be suspended."""
    if mode not in MODES:
        raise MigrationStateError(f"migration mode {mode!r} is not one of {MODES}")
    inodes_t, handles_t = fs.inodes, fs.handles
    root = os.readlink(_proc_fd(inodes_t.root.fd))
    with inodes_t._lock:
        inodes = [i for i in inodes_t._by_id.values() if i.nodeid != ROOT_ID]
        next_nodeid = inodes_t._next
    with handles_t._lock:
        handles = dict(handles_t._handles)
        next_fh = handles_t._next
    out_inodes = []
    for inode in sorted(inodes, key=lambda i: i.nodeid):
        path = handle = err = None
        if inode.fd < 0:
            err = "invalid since an earlier migration"
        elif mode == "find-paths":
            rel, err = _path_of(inode.fd, root)
            path = _b64(rel) if rel is not None else None
        else:
            try:
                htype, hbytes, _mnt = hostsys.name_to_handle_at(inode.fd, b"", hostsys.AT_EMPTY_PATH)
                handle = {"type": htype, "bytes": _b64(hbytes)}
            except OSError as exc:
                err = f"no file handle: {exc.strerror}"
        if err is not None:
            log.warning("migration: inode cannot be described", nodeid=inode.nodeid, error=err)
        out_inodes.append({"nodeid": inode.nodeid, "nlookup": inode.nlookup, "ftype": inode.ftype,
                           "ino": inode.key[1], "path": path, "handle": handle, "error": err})
    locked = [i.nodeid for i in inodes if getattr(i, "plocks", None)]
    if locked:
        # Host locks belong to this process and die with it: not part of the state.
        log.warning("migration: the guest's POSIX locks are not migrated", inodes=len(locked),
                    nodeids=locked[:20])
    out_handles = []
    for fh, h in sorted(handles.items()):
        if h.inode.nodeid != ROOT_ID and h.inode.nodeid not in inodes_t._by_id:
            continue          # its inode was forgotten; the guest will RELEASE it
        kind = "file" if isinstance(h, FileHandle) else "dir"
        out_handles.append({"fh": fh, "kind": kind, "nodeid": h.inode.nodeid,
                            "flags": (h.flags & 0xFFFFFFFF) if kind == "file" else os.O_RDONLY})
    with server._lock:
        fuse = {"initialized": bool(server.initialized), "proto_minor": server.proto_minor,
                "flags": server.flags, "writeback_on": bool(getattr(fs, "writeback_on", False))}
    return {"mode": mode, "fuse": fuse, "next_nodeid": next_nodeid, "next_fh": next_fh,
            "inodes": out_inodes, "handles": out_handles,
            "dirty_log": {"page_size": 4096, "pages_marked": pages_marked}}


def _find(fs, ino: dict, mode: str) -> tuple[int, hostsys.Statx]:
    """Open the inode again (O_PATH); raise OSError or MigrationStateError."""
    if ino["error"] is not None:
        raise MigrationStateError(f"the source could not describe it: {ino['error']}")
    root_fd = fs.inodes.root.fd
    if mode == "find-paths":
        rel = base64.b64decode(ino["path"])
        fd = hostsys.openat2(root_fd, rel, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0, hostsys.RESOLVE_BENEATH | hostsys.RESOLVE_NO_MAGICLINKS)
    else:
        h = ino["handle"]
        # open_by_handle_at wants a real (not O_PATH) fd on the mount as mount_fd.
        mount_fd = os.open(_proc_fd(root_fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = hostsys.open_by_handle_at(mount_fd, h["type"], base64.b64decode(h["bytes"]),
                                           os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        finally:
            os.close(mount_fd)
    try:
        st = stat_fd(fd)
        if stat.S_IFMT(st.mode) != ino["ftype"]:
            raise MigrationStateError(f"file type changed (0o{stat.S_IFMT(st.mode):o}, was 0o{ino['ftype']:o})")
        if st.ino != ino["ino"]:
            raise MigrationStateError(f"found inode {st.ino}, the guest held inode {ino['ino']}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def import_state(server, fs, state: dict, on_error: str) -> list[str]:
    """Rebuild the session, inodes and handles of ``state``; returns the per-object
    errors kept under ``guest-error`` (empty if all was found again).  Raises
    MigrationStateError (with every failed object listed) under ``abort``."""
    if on_error not in ON_ERROR:
        raise MigrationStateError(f"--migration-on-error {on_error!r} is not one of {ON_ERROR}")
    inodes_t, handles_t = fs.inodes, fs.handles
    if len(inodes_t) != 1 or len(handles_t) or server.initialized:
        raise MigrationStateError("cannot load a migration state into a daemon the guest already uses")
    mode = state["mode"]
    errors: list[str] = []
    new_inodes: dict[int, Inode] = {}
    try:
        for ino in state["inodes"]:
            try:
                fd, st = _find(fs, ino, mode)
                inode = Inode(ino["nodeid"], fd, key_of(st), ino["ftype"])
            except (OSError, MigrationStateError) as exc:
                what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                desc = (base64.b64decode(ino["path"]).decode(errors="replace")
                        if ino["path"] else "file handle" if ino["handle"] else "?")
                errors.append(f"inode {ino['nodeid']} ({desc}): {what}")
                inode = Inode(ino["nodeid"], -1, (-1, -1, -ino["nodeid"]), ino["ftype"])
            inode.nlookup = ino["nlookup"]
            new_inodes[inode.nodeid] = inode
        new_handles: dict[int, object] = {}
        for h in state["handles"]:
            inode = inodes_t.root if h["nodeid"] == ROOT_ID else new_inodes[h["nodeid"]]
            fd = -1
            if inode.fd >= 0:
                try:
                    if h["kind"] == "file":
                        fd = os.open(inode.proc_path, (h["flags"] & ~_REOPEN_DROP) | os.O_CLOEXEC)
                    else:
                        fd = os.open(inode.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError as exc:
                    errors.append(f"handle {h['fh']} of inode {h['nodeid']}: cannot reopen: {exc.strerror}")
            else:
                errors.append(f"handle {h['fh']} of inode {h['nodeid']}: its inode was not found")
            new_handles[h["fh"]] = (FileHandle(fd, inode, h["flags"]) if h["kind"] == "file"
                                    else DirHandle(fd, inode))
        if errors and on_error == "abort":
            raise MigrationStateError(f"{len(errors)} object(s) not found again on the destination "
                                      f"(--migration-on-error abort): " + "; ".join(errors[:20]))
    except BaseException:
        new_inodes.clear()     # their fds close with the objects
        raise
    with inodes_t._lock:
        for inode in new_inodes.values():
            inodes_t._by_id[inode.nodeid] = inode
            if inode.fd >= 0:
                inodes_t._by_key[inode.key] = inode
        inodes_t._next = max(inodes_t._next, state["next_nodeid"])
    with handles_t._lock:
        handles_t._handles.update(new_handles)
        handles_t._next = max(handles_t._next, state["next_fh"])
    fuse = state["fuse"]
    if hasattr(fs, "writeback_on"):
        fs.writeback_on = fuse["writeback_on"]
    with server._lock:
        server.proto_minor = fuse["proto_minor"]
        server.flags = fuse["flags"]
        server.initialized = fuse["initialized"]
    for e in errors:
        log.error("migration: object lost, the guest gets errors on it", error=e)
    return errors
