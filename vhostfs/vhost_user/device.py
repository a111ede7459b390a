"""The vhost-user-fs device: request handlers, feature negotiation, vring state.

``VhostUserDevice.handle(msg)`` takes one decoded :class:`~.protocol.Message` and
returns the reply bytes (or None); the transport loops over it.  The device owns every
fd the frontend gives it (kick/call/err eventfds, the log mapping, the backend request
socket) and closes each when it is replaced, on reset and on shutdown.  It never
touches threads: it reaches the runtime only through :class:`DeviceHooks`.

Ring model (vhost-user.rst, "Ring states"): a ring is *running* - handed to the
runtime with ``start_queue`` - exactly when it has a size, addresses and a kick fd, has
been kicked (SET_VRING_KICK) since it was last stopped, and is enabled.  Any change to
a running ring's configuration stops it (``stop_queue`` returns its last_avail_idx,
which becomes the base) and starts it again with the new settings.
"""
from __future__ import annotations

import mmap
import os
import stat
from contextlib import contextmanager
from typing import Protocol

from vhostfs.errors import ConfigError, GuestMemoryError, VhostfsError
from vhostfs.log import get_logger
from vhostfs.memory import GuestMemory, MemoryRegion
from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user import protocol as p
from vhostfs.vhost_user.protocol import FatalProtocolError, Message, MessageError

log = get_logger("vhostfs.vhost_user")

R = m.Request
PF = m.ProtocolFeature

# VHOST_F_LOG_ALL: dirty logging for live migration (vhost-user.rst "Migration";
# vhostfs/migration/dirtylog.py).
VIRTIO_FEATURES = ((1 << m.VIRTIO_F_VERSION_1) | (1 << m.VIRTIO_RING_F_INDIRECT_DESC)
                   | (1 << m.VIRTIO_RING_F_EVENT_IDX) | (1 << m.VHOST_USER_F_PROTOCOL_FEATURES)
                   | (1 << m.VHOST_F_LOG_ALL))
PROTOCOL_FEATURES = sum(1 << bit for bit in (
    PF.MQ, PF.LOG_SHMFD, PF.REPLY_ACK, PF.BACKEND_REQ, PF.BACKEND_SEND_FD,
    PF.CONFIGURE_MEM_SLOTS, PF.RESET_DEVICE))

# Requests whose reply is part of the protocol, not a REPLY_ACK (vhost-user.rst,
# "Communication"): a failure we cannot encode in the reply closes the connection.
EXPLICIT_REPLY = frozenset({R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_VRING_BASE,
                            R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS, R.GET_CONFIG,
                            R.GET_SHMEM_CONFIG, R.SET_DEVICE_STATE_FD, R.CHECK_DEVICE_STATE})


class DeviceHooks(Protocol):
    """What the device needs from the runtime (docs/design.md, vhost_user/).

    The queue passed to ``start_queue`` is already attached to the current memory.
    The kick/call fds stay owned by the device and open until ``stop_queue`` (or
    ``set_call_fd``, for the old call fd) returned.  ``set_call_fd(index, fd)`` is
    optional: without it a call fd change restarts the ring.
    """
    def start_queue(self, index: int, queue, kick_fd: int, call_fd: int | None) -> None: ...
    def stop_queue(self, index: int) -> int | None: ...
    def memory_changed(self, memory: GuestMemory) -> None: ...
    def reset(self) -> None: ...


def _default_queue_factory(index, size, desc_uva, avail_uva, used_uva, *, event_idx, last_avail_idx):
    from vhostfs.virtqueue.split import SplitQueue   # virtqueue sits below us; imported lazily
    return SplitQueue(index, size, desc_uva, avail_uva, used_uva,
                      event_idx=event_idx, last_avail_idx=last_avail_idx)


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class Vring:
    """What the frontend told us about one ring."""
    __slots__ = ("index", "num", "desc_uva", "avail_uva", "used_uva", "base",
                 "kick_fd", "call_fd", "err_fd", "enabled", "running", "queue",
                 "log_used", "log_gpa")

    def __init__(self, index: int) -> None:
        self.index = index
        self.num: int | None = None
        self.desc_uva = self.avail_uva = self.used_uva = None
        self.base = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.running = False
        self.queue = None
        self.log_used = False      # VHOST_VRING_F_LOG: log used-ring writes at log_gpa
        self.log_gpa = 0

    def configured(self) -> bool:
        return self.num is not None and self.desc_uva is not None and self.kick_fd is not None

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            _close(getattr(self, name))
            setattr(self, name, None)


class VhostUserDevice:
    """Server side of vhost-user for a virtio-fs device (QEMU vhost-user-fs-pci)."""

    def __init__(self, hooks: DeviceHooks, *, tag: str | None, num_request_queues: int,
                 max_mem_slots: int = 509, queue_factory=None, dax=None,
                 shmem_bit: int = m.SHMEM_BIT_QEMU, migration=None) -> None:
        if not 1 <= num_request_queues <= m.VRING_IDX_MASK:
            raise ConfigError(f"num_request_queues must be 1..{m.VRING_IDX_MASK}, got {num_request_queues}")
        if tag is not None:
            raw = tag.encode()
            if not 0 < len(raw) <= m.VIRTIO_FS_TAG_SIZE or b"\0" in raw:
                raise ConfigError(f"tag must be 1..{m.VIRTIO_FS_TAG_SIZE} bytes without NUL: {tag!r}")
        self.hooks = hooks
        self.tag = tag
        self.num_queues = 1 + num_request_queues       # hiprio + request queues (virtio 1.2 §5.11.2)
        self.max_mem_slots = max_mem_slots
        self.queue_factory = queue_factory or _default_queue_factory
        self.features = VIRTIO_FEATURES
        self.protocol_features = PROTOCOL_FEATURES | ((1 << PF.CONFIG) if tag is not None else 0)
        self.config_space = (m.VIRTIO_FS_CONFIG.pack(tag.encode(), num_request_queues)
                             if tag is not None else b"")
        # DAX (docs/dax.md): ``dax`` is a vhostfs.dax.DaxManager; its window is shared
        # memory region 0, announced with the SHMEM protocol feature and GET_SHMEM_CONFIG.
        if shmem_bit not in m.SHMEM_BITS:
            raise ConfigError(f"SHMEM protocol feature bit must be one of {m.SHMEM_BITS}, got {shmem_bit}")
        self.dax = dax
        self.shmem_bit = shmem_bit
        self.backend_channel = None
        if dax is not None:
            self.protocol_features |= 1 << shmem_bit
        # Live migration (vhostfs/migration): device state through SET_DEVICE_STATE_FD.
        # Not with a DAX window: its mappings are not part of the state, so QEMU is told
        # the back-end cannot migrate ("Back-end does not support migration state
        # transfer") instead of migrating a guest whose window would come back empty.
        self.migration = migration if dax is None else None
        if self.migration is not None:
            self.protocol_features |= 1 << PF.DEVICE_STATE
        self.dirty_log = None      # a migration.dirtylog.DirtyLog while logging is on
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.owner = False
        self.memory: GuestMemory | None = None
        self.log_mapping: mmap.mmap | None = None
        self.log_fd: int | None = None
        self.backend_req_fd: int | None = None
        self.rings = [Vring(i) for i in range(self.num_queues)]
        self._table = self._build_table()

    # -- dispatch ---------------------------------------------------------------------
    def _build_table(self):
        table = [None] * (max(R) + 1)
        for req in R:
            handler = getattr(self, "_" + req.name.lower(), None)
            if handler is not None:
                table[req] = handler
        return table

    def handle(self, msg: Message) -> bytes | None:
        """Handle one request; return the reply bytes or None.

        Raises FatalProtocolError when the connection must be closed.  Every fd of
        ``msg`` not taken by a handler is closed before returning, on every path.
        """
        handler = self._table[msg.request] if msg.request < len(self._table) else None
        log.debug("vhost-user request", request=msg.name, size=len(msg.payload), fds=len(msg.fds),
                  need_reply=msg.need_reply)
        try:
            if handler is None:
                raise MessageError(f"{msg.name}: request not supported by this device")
            reply = handler(msg)
        except FatalProtocolError:
            raise
        except (MessageError, GuestMemoryError) as exc:
            log.error("vhost-user request failed", request=msg.name, error=str(exc))
            return self._failed(msg)
        except Exception:   # a bug must not take the daemon down: log it, fail the request
            log.exception("unexpected error handling vhost-user request", request=msg.name)
            return self._failed(msg)
        finally:
            msg.close_fds()
        if reply is not None:
            return reply
        return p.encode_ack(msg.request, True) if msg.need_reply else None

    def _failed(self, msg: Message) -> bytes | None:
        if msg.request in EXPLICIT_REPLY:
            raise FatalProtocolError(f"{msg.name}: failed and its reply cannot carry an error")
        if msg.request == R.SET_LOG_BASE and self._has_protocol(PF.LOG_SHMFD):
            return p.encode_u64_reply(msg.request, 1)
        return p.encode_ack(msg.request, False) if msg.need_reply else None

    def _has_protocol(self, bit: int) -> bool:
        return bool(self.acked_protocol_features & (1 << bit))

    def _ring(self, msg: Message, index: int) -> Vring:
        if index >= self.num_queues:
            raise MessageError(f"{msg.name}: ring {index} does not exist (device has {self.num_queues})")
        return self.rings[index]

    # -- features and ownership -----------------------------------------------------------
    def _get_features(self, msg: Message) -> bytes:
        p.decode_empty(msg)
        return p.encode_u64_reply(msg.request, self.features)

    def _set_features(self, msg: Message) -> None:
        value = p.decode_u64(msg)
        if value & ~self.features:
            raise MessageError(f"{msg.name}: features 0x{value & ~self.features:x} were not offered")
        self.acked_features = value
        log.debug("virtio features acked", features=hex(value))
        self._update_dirty_log()

    def _get_protocol_features(self, msg: Message) -> bytes:
        p.decode_empty(msg)
        return p.encode_u64_reply(msg.request, self.protocol_features)

    def _set_protocol_features(self, msg: Message) -> None:
        value = p.decode_u64(msg)
        if value & ~self.protocol_features:
            raise MessageError(f"{msg.name}: protocol features 0x{value & ~self.protocol_features:x} "
                               "were not offered")
        self.acked_protocol_features = value
        log.debug("protocol features acked", features=hex(value))

    def _set_owner(self, msg: Message) -> None:
        p.decode_empty(msg)
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated; vhost-user.rst recommends ignoring it or disabling all rings.
        p.decode_empty(msg)
        self._close_gate("RESET_OWNER")
        for ring in self.rings:
            self._stop(ring)
            ring.enabled = False
        self._dax_reset()

    def _reset_device(self, msg: Message) -> None:
        # vhost-user.rst RESET_DEVICE: disable all rings and reset device state; the
        # frontend keeps ownership, and its memory table stays (QEMU only sends table
        # differences after a reset when CONFIGURE_MEM_SLOTS is in use).
        p.decode_empty(msg)
        self._close_gate("RESET_DEVICE")
        for ring in self.rings:
            self._stop(ring)
            ring.close_fds()
        self.rings = [Vring(i) for i in range(self.num_queues)]
        self.acked_features = 0
        self._update_dirty_log()
        self.hooks.reset()
        self._dax_reset()
        log.info("device reset by the frontend")

    def _get_queue_num(self, msg: Message) -> bytes:
        p.decode_empty(msg)
        return p.encode_u64_reply(msg.request, self.num_queues)

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        p.decode_empty(msg)
        return p.encode_u64_reply(msg.request, self.max_mem_slots)

    # -- memory ---------------------------------------------------------------------------
    def _set_mem_table(self, msg: Message) -> None:
        regions = p.decode_memory_table(msg)
        if len(regions) > self.max_mem_slots:
            raise MessageError(f"{msg.name}: {len(regions)} regions exceed {self.max_mem_slots} slots")
        table = [region + (msg.take_fd(),) for region in regions]
        self._swap_memory(GuestMemory.from_table(table))   # closes every fd it was given

    def _add_mem_reg(self, msg: Message) -> None:
        gpa, size, uva, offset = p.decode_single_region(msg)
        p.expect_fds(msg, 1)
        memory = self.memory or GuestMemory()
        if len(memory) >= self.max_mem_slots:
            raise MessageError(f"{msg.name}: all {self.max_mem_slots} memory slots are in use")
        region = MemoryRegion.map(gpa, size, uva, offset, msg.fds[0])   # fd closed by handle()
        self._swap_memory(memory.with_region(region))

    def _rem_mem_reg(self, msg: Message) -> None:
        # vhost-user.rst REM_MEM_REG: identified by gpa, uva and size; a stray fd is
        # accepted for compatibility and closed unused.
        gpa, size, uva, _offset = p.decode_single_region(msg)
        if len(msg.fds) > 1 or msg.fds_truncated:
            p.expect_fds(msg, 1)
        self._swap_memory((self.memory or GuestMemory()).without_region(gpa, size, uva))

    def _swap_memory(self, memory: GuestMemory) -> None:
        self.memory = memory
        log.debug("memory table changed", regions=len(memory))
        if self.dirty_log is not None:
            self.dirty_log.add_memory(memory)
        self.hooks.memory_changed(memory)
        for ring in self.rings:      # a ring kicked before the table arrived can start now
            if not ring.running and ring.configured():
                try:
                    self._maybe_start(ring)
                except (MessageError, GuestMemoryError) as exc:
                    log.warning("ring not started", ring=ring.index, error=str(exc))

    def _set_log_base(self, msg: Message) -> bytes:
        # With LOG_SHMFD the log is a shared mapping and the frontend waits for a reply
        # (vhost-user.rst, "Communication" and "Migration").
        if not self._has_protocol(PF.LOG_SHMFD):
            raise MessageError(f"{msg.name}: only supported with LOG_SHMFD")
        size, offset = p.decode_log(msg)
        p.expect_fds(msg, 1)
        fd = msg.fds[0]
        if size == 0 or offset % mmap.ALLOCATIONGRANULARITY:
            raise MessageError(f"{msg.name}: log size 0x{size:x} / offset 0x{offset:x} not mappable")
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise MessageError(f"{msg.name}: cannot stat the log fd: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode) or st.st_size < offset + size:
            raise MessageError(f"{msg.name}: log fd does not cover 0x{size:x} bytes at 0x{offset:x}")
        try:
            self.log_mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                                         prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except (OSError, ValueError, OverflowError) as exc:
            raise MessageError(f"{msg.name}: cannot map the log: {exc}") from None
        log.info("dirty log mapped", size=hex(size), covers=hex(size * 8 * 4096))
        self._update_dirty_log(new_mapping=True)
        return p.encode_u64_reply(msg.request, 0)

    # -- dirty logging (vhost-user.rst "Migration"; vhostfs/migration/dirtylog.py) --------
    def logging(self) -> bool:
        return bool(self.acked_features & (1 << m.VHOST_F_LOG_ALL)) and self.log_mapping is not None

    def _update_dirty_log(self, new_mapping: bool = False) -> None:
        """Turn logging on or off after SET_FEATURES / SET_LOG_BASE; a new log mapping
        replaces the old one (QEMU resizes the log by sending a new base)."""
        from vhostfs.migration.dirtylog import DirtyLog
        from vhostfs.virtqueue import iov
        old = self.dirty_log
        if self.logging():
            if old is None or new_mapping:
                witness = bool(self.migration is not None and self.migration.witness_path)
                dl = DirtyLog(self.log_mapping, self.memory, witness=witness)
                if old is not None:
                    dl.pages_marked = old.pages_marked
                    if old.witness is not None and dl.witness is not None:
                        dl.witness |= old.witness
                    for start, end, gpa in old._ranges:
                        if (start, end, gpa) not in dl._ranges:
                            dl._ranges.append((start, end, gpa))
                    dl._ranges.sort()
                    dl._starts = [e[0] for e in dl._ranges]
                self.dirty_log = dl
                iov.set_dirty_log(dl)
                log.info("dirty logging on", log_size=hex(dl.size))
        elif old is not None:
            self.dirty_log = None
            iov.set_dirty_log(None)
            log.info("dirty logging off", pages_marked=old.pages_marked)
        for ring in self.rings:
            if ring.running and hasattr(ring.queue, "set_dirty_log"):
                ring.queue.set_dirty_log(self.dirty_log if ring.log_used else None, ring.log_gpa)

    def _set_log_fd(self, msg: Message) -> None:
        p.decode_empty(msg)
        p.expect_fds(msg, 1)
        _close(self.log_fd)
        self.log_fd = msg.take_fd()

    def _set_backend_req_fd(self, msg: Message) -> None:
        p.decode_empty(msg)
        if not self._has_protocol(PF.BACKEND_REQ):
            raise MessageError(f"{msg.name}: BACKEND_REQ was not negotiated")
        p.expect_fds(msg, 1)
        _close(self.backend_req_fd)
        self.backend_req_fd = msg.take_fd()
        self._replace_backend_channel()

    # -- device state (vhost-user.rst "Migrating back-end state"; vhostfs/migration) ------
    def _set_device_state_fd(self, msg: Message) -> bytes:
        try:
            if self.migration is None or not self._has_protocol(PF.DEVICE_STATE):
                raise MessageError(f"{msg.name}: DEVICE_STATE was not negotiated")
            p.expect_size(msg, m.DEVICE_STATE_PARAMS.size)
            direction, phase = m.DEVICE_STATE_PARAMS.unpack(msg.payload)
            p.expect_fds(msg, 1)
            if direction not in (m.DEVICE_STATE_SAVE, m.DEVICE_STATE_LOAD):
                raise MessageError(f"{msg.name}: unknown transfer direction {direction}")
            if phase != m.DEVICE_STATE_PHASE_STOPPED:
                raise MessageError(f"{msg.name}: unknown migration phase {phase}")
            running = [r.index for r in self.rings if r.running]
            if running:
                # The phase is "stopped": the device must be suspended (every ring
                # stopped with GET_VRING_BASE), or the state would change under us.
                raise MessageError(f"{msg.name}: rings {running} are still running")
            what = "save" if direction == m.DEVICE_STATE_SAVE else "load"
            self.migration.start(what, msg.take_fd(), self.dirty_log)
            log.info("device state transfer started", direction=what)
        except Exception as exc:
            log.error("vhost-user request failed", request=msg.name, error=str(exc))
            return p.encode_u64_reply(msg.request, m.DEVICE_STATE_REPLY_NO_FD | 1)
        return p.encode_u64_reply(msg.request, m.DEVICE_STATE_REPLY_NO_FD)

    def _check_device_state(self, msg: Message) -> bytes:
        try:
            p.decode_empty(msg)
            ok = self.migration is not None and self.migration.check()
        except Exception as exc:
            log.error("vhost-user request failed", request=msg.name, error=str(exc))
            ok = False
        log.info("device state checked", ok=ok)
        return p.encode_u64_reply(msg.request, 0 if ok else 1)

    # -- DAX: shared memory region and the backend channel (docs/dax.md) ----------------
    def _replace_backend_channel(self) -> None:
        old, self.backend_channel = self.backend_channel, None
        if self.dax is not None:
            self.dax.set_channel(None)
        if old is not None:
            old.close()
        if self.dax is None or self.backend_req_fd is None:
            return
        if not self._has_protocol(self.shmem_bit):
            log.warning("DAX window configured but the frontend did not accept the SHMEM "
                        "protocol feature; mappings will fail", bit=self.shmem_bit)
            return
        if not self._has_protocol(PF.REPLY_ACK):
            log.warning("DAX needs REPLY_ACK to learn whether a map succeeded; mappings will fail")
            return
        from vhostfs.vhost_user.backend_channel import BackendChannel
        channel = BackendChannel(os.dup(self.backend_req_fd))
        if any(ring.running for ring in self.rings):
            channel.open_gate()
        self.backend_channel = channel
        self.dax.set_channel(channel)

    def _close_gate(self, why: str) -> None:
        if self.backend_channel is not None:
            self.backend_channel.close_gate(why)

    def _dax_reset(self) -> None:
        if self.dax is not None:
            self.dax.reset()

    def _get_shmem_config(self, msg: Message) -> bytes:
        p.decode_empty(msg)
        if self.dax is None:
            raise MessageError(f"{msg.name}: no shared memory regions (no DAX window configured)")
        sizes = [0] * m.MAX_SHMEM_REGIONS
        sizes[0] = self.dax.size          # VIRTIO_FS_SHMCAP_ID_CACHE
        log.info("DAX window announced", size=hex(self.dax.size))
        return p.encode_reply(msg.request, m.SHMEM_CONFIG.pack(1, 0, *sizes))

    # -- device configuration space (virtio 1.2 §5.11.4) ---------------------------------
    def _get_config(self, msg: Message) -> bytes:
        # vhost-user.rst GET_CONFIG: an empty payload signals an error.
        try:
            if not self.config_space:
                raise MessageError(f"{msg.name}: no config space (no tag configured)")
            offset, size, flags, _ = p.decode_config(msg)
            if offset + size > len(self.config_space):
                raise MessageError(f"{msg.name}: range {offset}+{size} beyond the "
                                   f"{len(self.config_space)}-byte config space")
        except MessageError as exc:
            log.error("vhost-user request failed", request=msg.name, error=str(exc))
            return p.encode_reply(msg.request)
        return p.encode_config_reply(msg.request, offset, flags, self.config_space[offset:offset + size])

    def _set_config(self, msg: Message) -> None:
        # vhost-user.rst SET_CONFIG: read-only fields (all of virtio-fs's) may only be
        # written for live migration; we accept that only if nothing would change.
        if not self.config_space:
            raise MessageError(f"{msg.name}: no config space (no tag configured)")
        offset, size, flags, data = p.decode_config(msg)
        if offset + size > len(self.config_space):
            raise MessageError(f"{msg.name}: range {offset}+{size} beyond the config space")
        if flags != m.CONFIG_FLAG_MIGRATION or data != self.config_space[offset:offset + size]:
            raise MessageError(f"{msg.name}: the virtio-fs config space is read-only")

    # -- rings --------------------------------------------------------------------------
    def _set_vring_num(self, msg: Message) -> None:
        index, num = p.decode_vring_state(msg)
        ring = self._ring(msg, index)
        # virtio 1.2 §2.7: split queue size is a power of 2, at most 32768.
        if num == 0 or num & (num - 1) or num > m.VIRTQUEUE_MAX_SIZE:
            raise MessageError(f"{msg.name}: ring {index} size {num} is not a power of 2 in 1..32768")
        with self._reconfigure(ring):
            ring.num = num

    def _set_vring_base(self, msg: Message) -> None:
        index, base = p.decode_vring_state(msg)
        ring = self._ring(msg, index)
        if base > 0xFFFF:
            raise MessageError(f"{msg.name}: ring {index} base {base} does not fit a 16-bit index")
        with self._reconfigure(ring):
            ring.base = base

    def _set_vring_addr(self, msg: Message) -> None:
        addr = p.decode_vring_addr(msg)
        ring = self._ring(msg, addr.index)
        if addr.flags & ~m.VHOST_VRING_F_LOG:
            raise MessageError(f"{msg.name}: ring {addr.index}: unknown flags 0x{addr.flags:x}")
        log_used = bool(addr.flags & m.VHOST_VRING_F_LOG)
        self._check_ring_layout(msg, ring.index, ring.num or 1, addr.desc_uva, addr.avail_uva, addr.used_uva)
        if (ring.running and (ring.desc_uva, ring.avail_uva, ring.used_uva)
                == (addr.desc_uva, addr.avail_uva, addr.used_uva)):
            # Only the logging changed (QEMU turns used-ring logging on and off this
            # way during migration): no need to stop and drain the ring.
            ring.log_used, ring.log_gpa = log_used, addr.log_gpa
            if hasattr(ring.queue, "set_dirty_log"):
                ring.queue.set_dirty_log(self.dirty_log if log_used else None, addr.log_gpa)
            return
        with self._reconfigure(ring):
            ring.desc_uva, ring.avail_uva, ring.used_uva = addr.desc_uva, addr.avail_uva, addr.used_uva
            ring.log_used, ring.log_gpa = log_used, addr.log_gpa

    def _check_ring_layout(self, msg, index, num, desc, avail, used) -> None:
        """Alignment and translation of the three ring parts (virtio 1.2 §2.7, table
        "Virtqueue Part Alignment/Size"; vhost-user.rst: ring addresses are UVAs)."""
        if self.memory is None:
            raise MessageError(f"{msg.name}: ring {index}: addresses set before any memory table")
        parts = (("descriptor table", desc, 16, 16 * num), ("available ring", avail, 2, 6 + 2 * num),
                 ("used ring", used, 4, 6 + 8 * num))
        for what, uva, align, size in parts:
            if uva % align:
                raise MessageError(f"{msg.name}: ring {index}: {what} at 0x{uva:x} not {align}-byte aligned")
            try:
                self.memory.uva_to_gpa(uva, size)
            except GuestMemoryError as exc:
                raise MessageError(f"{msg.name}: ring {index}: {what} outside guest memory: {exc}") from None

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = p.decode_vring_state(msg)
        if index >= self.num_queues:
            raise FatalProtocolError(f"{msg.name}: ring {index} does not exist (device has {self.num_queues})")
        ring = self.rings[index]
        self._stop(ring)
        # vhost-user.rst "Ring states": the ring is stopped now and starts again only on
        # a new kick; the old kick fd is of no further use.
        _close(ring.kick_fd)
        ring.kick_fd = None
        return p.encode_vring_state_reply(msg.request, index, ring.base)

    def _set_vring_kick(self, msg: Message) -> None:
        index, has_fd = p.decode_vring_file(msg)
        ring = self._ring(msg, index)
        if not has_fd:
            log.warning("ring polling mode (no kick fd) is not supported; ring stays stopped", ring=index)
        with self._reconfigure(ring):
            _close(ring.kick_fd)
            ring.kick_fd = msg.take_fd() if has_fd else None

    def _set_vring_call(self, msg: Message) -> None:
        index, has_fd = p.decode_vring_file(msg)
        ring = self._ring(msg, index)
        new_fd = msg.take_fd() if has_fd else None
        set_call_fd = getattr(self.hooks, "set_call_fd", None)
        if ring.running and set_call_fd is not None:
            set_call_fd(index, new_fd)
            _close(ring.call_fd)
            ring.call_fd = new_fd
            return
        with self._reconfigure(ring):
            _close(ring.call_fd)
            ring.call_fd = new_fd

    def _set_vring_err(self, msg: Message) -> None:
        index, has_fd = p.decode_vring_file(msg)
        ring = self._ring(msg, index)
        _close(ring.err_fd)
        ring.err_fd = msg.take_fd() if has_fd else None

    def _set_vring_enable(self, msg: Message) -> None:
        index, enable = p.decode_vring_state(msg)
        ring = self._ring(msg, index)
        if enable not in (0, 1):
            raise MessageError(f"{msg.name}: ring {index}: enable value {enable} is not 0 or 1")
        with self._reconfigure(ring):
            ring.enabled = bool(enable)

    # -- starting and stopping rings ------------------------------------------------------
    @contextmanager
    def _reconfigure(self, ring: Vring):
        """Stop a running ring around a configuration change, then start it if it can.

        Callers validate before entering, so the body cannot fail half-way.
        """
        self._stop(ring)
        yield
        self._maybe_start(ring)

    def _is_enabled(self, ring: Vring) -> bool:
        # vhost-user.rst "Ring states": without VHOST_USER_F_PROTOCOL_FEATURES a ring
        # starts enabled; with it, only SET_VRING_ENABLE enables it.
        return ring.enabled or not self.acked_features & (1 << m.VHOST_USER_F_PROTOCOL_FEATURES)

    def _maybe_start(self, ring: Vring) -> None:
        if ring.running or not ring.configured() or not self._is_enabled(ring):
            return
        if self.memory is None:
            raise MessageError(f"ring {ring.index}: cannot start before a memory table was set")
        try:
            queue = self.queue_factory(
                ring.index, ring.num, ring.desc_uva, ring.avail_uva, ring.used_uva,
                event_idx=bool(self.acked_features & (1 << m.VIRTIO_RING_F_EVENT_IDX)),
                last_avail_idx=ring.base)
            queue.attach(self.memory)
        except VhostfsError as exc:
            raise MessageError(f"ring {ring.index}: cannot start: {exc}") from None
        if ring.log_used and self.dirty_log is not None and hasattr(queue, "set_dirty_log"):
            queue.set_dirty_log(self.dirty_log, ring.log_gpa)
        self.hooks.start_queue(ring.index, queue, ring.kick_fd, ring.call_fd)
        ring.running, ring.queue = True, queue
        if self.backend_channel is not None:
            self.backend_channel.open_gate()
        log.debug("ring started", ring=ring.index, size=ring.num, base=ring.base)

    def _stop(self, ring: Vring) -> None:
        """Stop a running ring; its last_avail_idx becomes the ring's base."""
        if not ring.running:
            return
        # No SHMEM_* once a ring stops (QEMU 11.1 segfaults on them after a stop or
        # reset), and a worker waiting for a map reply must not hold up the drain.
        self._close_gate(f"ring {ring.index} stopped")
        last = self.hooks.stop_queue(ring.index)
        if last is None:
            last = ring.queue.last_avail_idx
        ring.base, ring.running, ring.queue = last & 0xFFFF, False, None
        log.debug("ring stopped", ring=ring.index, base=ring.base)

    def shutdown(self) -> None:
        """End of the connection: stop every ring, then close every fd we hold."""
        self._close_gate("disconnected")
        for ring in self.rings:
            try:
                self._stop(ring)
            except Exception:
                log.exception("error stopping ring at shutdown", ring=ring.index)
            ring.close_fds()
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        if self.dax is not None:
            self.dax.set_channel(None)
            try:
                self._dax_reset()
            except Exception:
                log.exception("error clearing the DAX window at shutdown")
        for fd in (self.log_fd, self.backend_req_fd):
            _close(fd)
        self.log_fd = self.backend_req_fd = None
        if self.dirty_log is not None:
            from vhostfs.virtqueue import iov
            iov.set_dirty_log(None)
            self.dirty_log = None
        # Dropping the snapshot unmaps guest memory once no request holds a view of it
        # (a Python mmap keeps a dup of its fd until then).
        self.log_mapping = None
        self.memory = None
