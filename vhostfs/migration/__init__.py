"""Live migration of the vhostfs device state (vhost-user DEVICE_STATE).

:class:`MigrationBackend` is what the vhost-user device calls for
SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE: the state (state.py) is produced by
tables.export_state and written to the pipe (save), or read from the pipe to EOF,
decoded and applied with tables.import_state (load), on a thread of its own so the
control socket is never blocked on a pipe QEMU reads only after our reply.
CHECK_DEVICE_STATE waits for that thread and reports its result.
"""
from __future__ import annotations

import os
import threading

from vhostfs.log import get_logger
from vhostfs.migration import state as state_mod
from vhostfs.migration.state import MODES, ON_ERROR, MigrationStateError
from vhostfs.migration.tables import export_state, import_state

__all__ = ["MigrationBackend", "MigrationStateError", "MODES", "ON_ERROR"]

log = get_logger("vhostfs.migration")
WITNESS_ENV = "VHOSTFS_DIRTY_WITNESS"


class MigrationBackend:
    def __init__(self, server, fs, *, mode: str = "find-paths", on_error: str = "abort") -> None:
        if mode not in MODES:
            raise ValueError(f"migration mode {mode!r} is not one of {MODES}")
        if on_error not in ON_ERROR:
            raise ValueError(f"migration on-error {on_error!r} is not one of {ON_ERROR}")
        self.server, self.fs, self.mode, self.on_error = server, fs, mode, on_error
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self.lost: list[str] = []
        self.loaded_state: dict | None = None

    @property
    def witness_path(self) -> str | None:
        return os.environ.get(WITNESS_ENV) or None

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, direction: str, fd: int, dirty_log=None) -> None:
        """Begin a transfer over ``fd`` (taken over) on a thread."""
        if self.busy():
            os.close(fd)
            raise MigrationStateError("a device state transfer is already running")
        self._error = None
        target = self._save if direction == "save" else self._load
        self._thread = threading.Thread(target=self._run, args=(target, fd, dirty_log),
                                        name=f"migration-{direction}", daemon=True)
        self._thread.start()

    def _run(self, target, fd: int, dirty_log) -> None:
        try:
            target(fd, dirty_log)
        except MigrationStateError as exc:
            self._error = str(exc)
        except OSError as exc:
            self._error = f"device state transfer failed: {exc}"
        except Exception as exc:      # a bug: fail the migration, keep the daemon
            log.exception("device state transfer failed")
            self._error = f"device state transfer failed: {exc!r}"
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        if self._error:
            log.error("migration: device state transfer failed", error=self._error)

    def _save(self, fd: int, dirty_log) -> None:
        pages = dirty_log.pages_marked if dirty_log is not None else 0
        st = export_state(self.server, self.fs, self.mode, pages)
        data = state_mod.encode(st)
        if dirty_log is not None and dirty_log.witness is not None and self.witness_path:
            with open(self.witness_path + ".tmp", "w") as f:
                f.write("".join(f"{p}\n" for p in dirty_log.witness_pages()))
            os.replace(self.witness_path + ".tmp", self.witness_path)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        log.info("migration: device state saved", bytes=len(data), inodes=len(st["inodes"]),
                 handles=len(st["handles"]), mode=self.mode, pages_logged=pages)

    def _load(self, fd: int, _dirty_log) -> None:
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            total += len(chunk)
            if total > state_mod.MAX_STATE:
                raise MigrationStateError(f"migration state larger than {state_mod.MAX_STATE} bytes")
            chunks.append(chunk)
        st = state_mod.decode(b"".join(chunks))
        self.lost = import_state(self.server, self.fs, st, self.on_error)
        self.loaded_state = st
        log.info("migration: device state loaded", bytes=total, inodes=len(st["inodes"]),
                 handles=len(st["handles"]), lost=len(self.lost), source_mode=st["mode"],
                 source_pages_logged=st["dirty_log"]["pages_marked"])

    def check(self, timeout: float | None = 60.0) -> bool:
        """Wait for the transfer; True if it succeeded."""
        t = self._thread
        if t is None:
            log.error("migration: CHECK_DEVICE_STATE without a transfer")
            return False
        t.join(timeout)
        if t.is_alive():
            log.error("migration: device state transfer still running at CHECK_DEVICE_STATE")
            return False
        self._thread = None
        return self._error is None
