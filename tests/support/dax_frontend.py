"""A faithful simulated front end for DAX (../shared/design/dax.md §3.3), as strict as QEMU 11.1.

* The window is a POSIX shared-memory object (posix_ipc) reserved with one PROT_NONE
  mapping; SHMEM_MAP puts ``mmap(window + shm_offset, len, PROT_READ[|PROT_WRITE],
  MAP_SHARED|MAP_FIXED, fd, fd_offset)`` there; SHMEM_UNMAP puts the PROT_NONE window
  back with MAP_FIXED (never a hole a later mmap could take).
* SHMEM_MAP is checked the way QEMU 11.1.3 checks it (shmid exists, ``shm_offset + len``
  inside, ``len`` != 0, ``fd_offset`` page aligned, no overlap, fd size >= fd_offset+len,
  fd writable) and, stricter than QEMU, ``shm_offset``/``len`` page aligned.  Read-only
  maps are honoured (PROT_READ), as the old dev-branch QEMU and alioth do.
* SHMEM_UNMAP must match one whole mapping exactly.
* After each map/unmap it sends ADD_MEM_REG / REM_MEM_REG on the main socket and waits for
  the ack, as QEMU does (the ordering that deadlocks a back end that does not read its
  main socket while it waits for a map reply).  Like QEMU, the main socket is used by one
  thread at a time: while the test thread waits for a reply there (GET_VRING_BASE), the
  backend channel is not read.
* Any SHMEM_* after the rings were stopped or the device reset is a *violation* (QEMU 11.1
  segfaults); any read or write of an unmapped window byte raises :class:`UnmappedAccess`
  (QEMU would return zeros and hide the bug).
* The SHMEM feature bit is a parameter (22: QEMU 11.1 / crosvm; 21: rust-vmm 0.16 / alioth).
"""
from __future__ import annotations

import array
import ctypes
import mmap
import os
import socket
import threading

import posix_ipc

from tests.support.frontend import QEMU_FEATURES, QEMU_PROTOCOL_FEATURES, Frontend, FrontendError, FrontendVring
from vhostfs.vhost_user import messages as m

R = m.Request
PF = m.ProtocolFeature
BR = m.BackendRequest
PAGE = mmap.PAGESIZE
WINDOW_GPA = 0xF800_0000            # where QEMU 11.1 put BAR 4 in the probe (dax.md §1.1)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value
MAP_NORESERVE = 0x4000
PROT_NONE = 0
MAP_FIXED = 0x10


class UnmappedAccess(AssertionError):
    """The test touched a window byte that is not mapped (QEMU would read zeros)."""


def _mmap(addr, length, prot, flags, fd, offset) -> int:
    res = _libc.mmap(addr, length, prot, flags, fd, offset)
    if res in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


class ShmemWindow:
    """Shared memory region 0: the DAX window, with QEMU 11.1's checks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.shm = posix_ipc.SharedMemory(None, posix_ipc.O_CREX, size=size)
        posix_ipc.unlink_shared_memory(self.shm.name)
        self.addr = _mmap(None, size, PROT_NONE, mmap.MAP_SHARED | MAP_NORESERVE, self.shm.fd, 0)
        self.mappings: dict[int, dict] = {}        # shm_offset -> {len, fd_offset, writable, file}
        self.lock = threading.Lock()
        self.log: list[tuple] = []

    def check_map(self, shmid, fd, fd_offset, shm_offset, length) -> str | None:
        """QEMU 11.1.3's reasons to refuse (None: accepted)."""
        if shmid != 0:
            return f"VIRTIO Shared Memory Region at ID {shmid} not found or uninitialized"
        if length == 0:
            return "size cannot be zero"
        if shm_offset + length > self.size or shm_offset + length < shm_offset:
            return f"Bad offset/len for mmap {shm_offset:x}+{length:x}"
        if fd_offset % PAGE:
            return f"offset 0x{fd_offset:x} must be multiples of page size"
        if shm_offset % PAGE or length % PAGE:
            return f"(strict) shm_offset 0x{shm_offset:x} / len 0x{length:x} not page aligned"
        for off, mp in self.mappings.items():
            if shm_offset < off + mp["len"] and off < shm_offset + length:
                return "VIRTIO Shared Memory mapping overlap"
        st = os.fstat(fd)
        if st.st_size < fd_offset + length:
            return (f"backing store size 0x{st.st_size:x} is too small for 'size' option 0x{length:x} "
                    f"plus 'offset' option 0x{fd_offset:x}")
        import fcntl
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
            return "unable to map backing store for guest RAM: Permission denied"
        return None

    def map(self, shmid, fd, fd_offset, shm_offset, length, writable) -> str | None:
        with self.lock:
            why = self.check_map(shmid, fd, fd_offset, shm_offset, length)
            if why is None:
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
                _mmap(self.addr + shm_offset, length, prot, mmap.MAP_SHARED | MAP_FIXED, fd, fd_offset)
                st = os.fstat(fd)
                self.mappings[shm_offset] = {"len": length, "fd_offset": fd_offset, "writable": writable,
                                             "file": (st.st_dev, st.st_ino)}
            self.log.append(("map", shm_offset, length, fd_offset, writable, why))
            return why

    def unmap(self, shm_offset, length) -> str | None:
        with self.lock:
            mp = self.mappings.get(shm_offset)
            if mp is None or mp["len"] != length:
                why = f"Shared memory mapping not found at offset {shm_offset:x} with length {length:x}"
            else:
                self._restore(shm_offset, length)
                del self.mappings[shm_offset]
                why = None
            self.log.append(("unmap", shm_offset, length, why))
            return why

    def _restore(self, shm_offset, length) -> None:
        _mmap(self.addr + shm_offset, length, PROT_NONE,
              mmap.MAP_SHARED | MAP_FIXED | MAP_NORESERVE, self.shm.fd, shm_offset)

    def reset(self) -> int:
        """The front end drops every mapping on device reset."""
        with self.lock:
            for off, mp in list(self.mappings.items()):
                self._restore(off, mp["len"])
            count = len(self.mappings)
            self.mappings.clear()
            return count

    def _covered(self, offset: int, length: int, write: bool) -> None:
        end, pos = offset + length, offset
        while pos < end:
            base = max((o for o in self.mappings if o <= pos), default=None)
            if base is None or pos >= base + self.mappings[base]["len"]:
                raise UnmappedAccess(f"window byte 0x{pos:x} is not mapped")
            if write and not self.mappings[base]["writable"]:
                raise UnmappedAccess(f"window byte 0x{pos:x} is mapped read-only")
            pos = base + self.mappings[base]["len"]

    def read(self, offset: int, length: int) -> bytes:
        with self.lock:
            self._covered(offset, length, False)
            return ctypes.string_at(self.addr + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            self._covered(offset, len(data), True)
            ctypes.memmove(self.addr + offset, data, len(data))

    def close(self) -> None:
        _libc.munmap(self.addr, self.size)
        self.shm.close_fd()


class DaxFrontend(Frontend):
    """QEMU 11.1's vhost-user-test-device with a DAX window, over a real socket."""

    def __init__(self, sock: socket.socket, *, shmem_bit: int = m.SHMEM_BIT_QEMU,
                 add_mem_reg: bool = True) -> None:
        super().__init__(sock)
        self.shmem_bit = shmem_bit
        self.add_mem_reg_on_map = add_mem_reg
        self.window: ShmemWindow | None = None
        self.main_lock = threading.RLock()      # QEMU's one thread on the main socket
        self.running = False
        self.violations: list[str] = []
        self.backend_errors: list[BaseException] = []
        self.requests: list[tuple] = []
        self._thread: threading.Thread | None = None
        self._stop = False

    @classmethod
    def connect(cls, path: str, **kwargs) -> DaxFrontend:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(path)
        return cls(sock, **kwargs)

    # -- the main socket, one user at a time ---------------------------------------------
    def request(self, *args, **kwargs):
        with self.main_lock:
            return super().request(*args, **kwargs)

    def get_u64(self, *args, **kwargs):
        with self.main_lock:
            return super().get_u64(*args, **kwargs)

    def get_vring_base(self, index):
        with self.main_lock:
            return super().get_vring_base(index)

    def get_config(self, *args, **kwargs):
        with self.main_lock:
            return super().get_config(*args, **kwargs)

    def get_shmem_config(self) -> list[int]:
        with self.main_lock:
            self.send(R.GET_SHMEM_CONFIG)
            reply = self.recv_reply(R.GET_SHMEM_CONFIG)
        if len(reply) != m.SHMEM_CONFIG.size:
            raise FrontendError(f"GET_SHMEM_CONFIG: reply of {len(reply)} bytes")
        nregions, _pad, *sizes = m.SHMEM_CONFIG.unpack(reply)
        return sizes[:max(nregions, 1)]

    # -- QEMU 11.1 sequences ---------------------------------------------------------------
    def init(self, num_queues: int) -> None:
        """vhost_user_backend_init for the generic device, then GET_SHMEM_CONFIG at realize."""
        with self.main_lock:
            offered = self.get_u64(R.GET_FEATURES)
            if not offered & (1 << m.VHOST_USER_F_PROTOCOL_FEATURES):
                raise FrontendError("no protocol features")
            backend_pf = self.get_u64(R.GET_PROTOCOL_FEATURES)
            self.protocol_features = backend_pf & (QEMU_PROTOCOL_FEATURES | (1 << self.shmem_bit))
            self.request(R.SET_PROTOCOL_FEATURES, m.U64.pack(self.protocol_features), ack=False)
            self.queue_num = self.get_u64(R.GET_QUEUE_NUM)
            if self.protocol_features & (1 << PF.CONFIGURE_MEM_SLOTS):
                self.max_mem_slots = self.get_u64(R.GET_MAX_MEM_SLOTS)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                self.request(R.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
            finally:
                theirs.close()
            self.backend_channel = ours
            self.request(R.SET_OWNER, ack=False)
            self.features = self.get_u64(R.GET_FEATURES) & QEMU_FEATURES
            if self.protocol_features & (1 << self.shmem_bit):
                sizes = self.get_shmem_config()
                if sizes and sizes[0]:
                    self.window = ShmemWindow(sizes[0])
            for index in range(num_queues):
                fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(3)]
                self.vrings[index] = FrontendVring(index, fds[1], fds[0], fds[2])
                self.set_vring_file(R.SET_VRING_CALL, index, fds[0])
                self.set_vring_file(R.SET_VRING_ERR, index, fds[2])
        self._thread = threading.Thread(target=self._serve_backend_channel, daemon=True,
                                        name="dax-frontend-backend-channel")
        self._thread.start()

    def start(self, memory, rings) -> None:
        """vhost_dev_start: memory, then each ring ``(index, size, desc, avail, used)``.
        After a reset QEMU only sends memory-table differences (none here)."""
        with self.main_lock:
            if not getattr(self, "_memory_sent", False):
                self.set_memory(memory)
                self._memory_sent = True
            else:
                self.request(R.SET_FEATURES, m.U64.pack(self.features), ack=False)
            for ring in rings:
                self.start_vring(*ring)
            self.running = True

    def stop(self) -> dict[int, int]:
        """vhost_dev_stop: from here on a SHMEM_* would crash QEMU 11.1."""
        with self.main_lock:
            self.running = False
            return {index: self.stop_vring(index) for index in list(self.vrings)}

    def reset_device(self) -> int:
        """Guest reset (driver unbind): stop, QEMU drops every mapping, RESET_DEVICE."""
        with self.main_lock:
            if self.running:
                self.stop()
            dropped = self.window.reset() if self.window else 0
            self._forget_mem_regs()
            if self.protocol_features & (1 << PF.RESET_DEVICE):
                self.request(R.RESET_DEVICE, ack=False)
            return dropped

    def _forget_mem_regs(self) -> None:
        # QEMU's memory listener drops the window's RAM subregions with the mappings.
        for region in getattr(self, "_window_regions", {}).values():
            self.rem_mem_reg(region)
        self._window_regions = {}

    # -- the backend channel ---------------------------------------------------------------
    def _recv_backend(self):
        sock = self.backend_channel
        fds: list[int] = []
        data = b""
        while len(data) < m.HEADER.size:
            chunk, anc, _flags, _ = sock.recvmsg(m.HEADER.size - len(data), socket.CMSG_SPACE(64))
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", cdata[:len(cdata) - len(cdata) % 4]))
            if not chunk:
                return None
            data += chunk
        request, flags, size = m.HEADER.unpack(data)
        payload = b""
        while len(payload) < size:
            chunk, anc, _flags, _ = sock.recvmsg(size - len(payload), socket.CMSG_SPACE(64))
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", cdata[:len(cdata) - len(cdata) % 4]))
            if not chunk:
                return None
            payload += chunk
        return request, flags, payload, fds

    def _serve_backend_channel(self) -> None:
        while not self._stop:
            try:
                got = self._recv_backend()
            except OSError:
                return
            if got is None:
                return
            request, flags, payload, fds = got
            try:
                with self.main_lock:
                    self._handle_backend(request, flags, payload, fds)
            except BaseException as exc:      # surfaced by the tests
                self.backend_errors.append(exc)
            finally:
                for fd in fds:
                    os.close(fd)

    def _handle_backend(self, request, flags, payload, fds) -> None:
        if flags & m.VERSION_MASK != m.VERSION or flags & m.FLAG_REPLY:
            raise FrontendError(f"backend request with bad flags 0x{flags:x}")
        if request not in (BR.SHMEM_MAP, BR.SHMEM_UNMAP):
            raise FrontendError(f"unexpected backend request {request}")
        name = BR(request).name
        if not self.running:
            self.violations.append(f"{name} after the rings were stopped or the device reset")
        if len(payload) != m.SHMEM_MMAP.size:
            raise FrontendError(f"{name}: payload of {len(payload)} bytes")
        shmid, fd_offset, shm_offset, length, mflags = m.SHMEM_MMAP.unpack(payload)
        self.requests.append((name, shm_offset, length, fd_offset, mflags))
        if self.window is None:
            why = "no shared memory region"
        elif request == BR.SHMEM_MAP:
            if len(fds) != 1:
                raise FrontendError(f"SHMEM_MAP with {len(fds)} fds")
            why = self.window.map(shmid, fds[0], fd_offset, shm_offset, length, bool(mflags & 1))
        else:
            if fds:
                raise FrontendError(f"SHMEM_UNMAP with {len(fds)} fds")
            why = self.window.unmap(shm_offset, length)
        if flags & m.FLAG_NEED_REPLY:
            self.backend_channel.sendall(m.HEADER.pack(request, m.VERSION | m.FLAG_REPLY, 8)
                                         + m.U64.pack(0 if why is None else 1))
        if why is None and self.add_mem_reg_on_map and self.protocol_features & (1 << PF.CONFIGURE_MEM_SLOTS):
            # QEMU: every mapping is a RAM subregion -> ADD_MEM_REG / REM_MEM_REG, acked.
            regions = getattr(self, "_window_regions", None)
            if regions is None:
                regions = self._window_regions = {}
            if request == BR.SHMEM_MAP:
                row = (WINDOW_GPA + shm_offset, length, self.window.addr + shm_offset, fd_offset,
                       os.dup(fds[0]))
                self.add_mem_reg(row)
                regions[shm_offset] = row[:4]
            else:
                region = regions.pop(shm_offset, None)
                if region is not None:
                    self.rem_mem_reg(region)

    def close(self) -> None:
        self._stop = True
        if self.backend_channel is not None:
            try:
                self.backend_channel.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        super().close()
        if self.window is not None:
            self.window.close()


class _Hooks:
    """DeviceHooks that only record (the rig serves no rings; FUSE calls come from the test)."""

    def __init__(self):
        self.started = {}
        self.memory = None
        self.memory_changes = 0

    def start_queue(self, index, queue, kick_fd, call_fd):
        self.started[index] = queue

    def stop_queue(self, index):
        return self.started.pop(index).last_avail_idx

    def memory_changed(self, memory):
        self.memory = memory
        self.memory_changes += 1

    def reset(self):
        pass


class DaxRig:
    """vhostfs's device (serve loop in a thread, as the daemon runs it) + DaxPassthroughFs
    + DaxManager, against a :class:`DaxFrontend`.  The test thread plays the FUSE worker:
    it calls the filesystem's setupmapping/removemapping/... directly."""

    def __init__(self, tmp_path, *, window: int = 16 << 20, shmem_bit: int = m.SHMEM_BIT_QEMU,
                 frontend_bit: int | None = None, inode_min_size: int = 0) -> None:
        from tests.support.frontend import UVA_BASE, MemfdRam
        from vhostfs.dax import DaxManager
        from vhostfs.fs.passthrough.dax import DaxPassthroughFs
        from vhostfs.vhost_user import transport
        from vhostfs.vhost_user.device import VhostUserDevice

        self.share = tmp_path / "share"
        self.share.mkdir()
        self.manager = DaxManager(window)
        self.fs = DaxPassthroughFs(str(self.share), dax=self.manager, dax_inode_min_size=inode_min_size)
        self.hooks = _Hooks()
        self.device = VhostUserDevice(self.hooks, tag="daxfs", num_request_queues=1,
                                      dax=self.manager, shmem_bit=shmem_bit)
        path = str(tmp_path / "dax.sock")
        listener = transport.listen(path)
        self.error = None

        def serve():
            sock, _ = listener.accept()
            listener.close()
            try:
                transport.serve_connection(sock, self.device)
            except Exception as exc:
                self.error = exc

        self.thread = threading.Thread(target=serve, daemon=True, name="dax-rig-device")
        self.thread.start()
        self.ram = MemfdRam([(0, 1 << 20)])
        self.fe = DaxFrontend.connect(path, shmem_bit=shmem_bit if frontend_bit is None else frontend_bit)
        self.fe.init(num_queues=2)
        self.rings = [(0, 64, UVA_BASE, UVA_BASE + 0x1000, UVA_BASE + 0x2000),
                      (1, 64, UVA_BASE + 0x4000, UVA_BASE + 0x5000, UVA_BASE + 0x6000)]
        self.start()

    def start(self) -> None:
        self.fe.start(self.ram, self.rings)
        self.fe.get_u64(R.GET_FEATURES)         # a round trip: the rings run, the gate is open

    def ctx(self):
        from vhostfs.fs.api import Context
        return Context(0, 0, 1)

    def create(self, name: str, data: bytes) -> int:
        (self.share / name).write_bytes(data)
        return self.fs.lookup(self.ctx(), 1, name.encode()).nodeid

    def setup(self, nodeid, foffset, moffset, *, write=False, length=2 << 20, fh=(1 << 64) - 1, flags=None):
        if flags is None:
            flags = 2 | (1 if write else 0)
        self.fs.setupmapping(self.ctx(), nodeid, fh, foffset, length, flags, moffset)

    def remove(self, *entries):
        self.fs.removemapping(self.ctx(), [(mo, ln) for mo, ln in entries])

    def frontend_spans(self) -> set[tuple[int, int]]:
        return {(off, mp["len"]) for off, mp in self.fe.window.mappings.items()}

    def manager_spans(self) -> set[tuple[int, int]]:
        return {(p.shm_offset, p.length) for mp in self.manager.window.mappings() for p in mp.pieces}

    def check(self) -> None:
        """No overlap, misalignment or leak; no front-end rule broken."""
        self.manager.window.check_invariants()
        assert self.frontend_spans() == self.manager_spans()
        assert not self.fe.violations, self.fe.violations
        assert not self.fe.backend_errors, self.fe.backend_errors
        assert self.error is None, self.error

    def close(self) -> None:
        import gc
        self.fe.close()
        self.thread.join(10)
        self.ram.close()
        # Close the filesystem's fds now: its objects sit in reference cycles, and a later
        # test that counts open fds must not see them go in the middle.
        self.fs.destroy()
        root = self.fs.inodes.root
        fd, root.fd = root.fd, -1
        os.close(fd)
        self.fs = self.manager = self.device = None
        gc.collect()
