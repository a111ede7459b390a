"""PassthroughFs: serve a host directory to the guest with real syscalls.

Safety rules (the guest is untrusted):
- every name is resolved by an ``*at()`` call relative to its parent's O_PATH fd, as a
  single component, with O_NOFOLLOW; no host path is ever built from a guest name;
- ``.`` and ``..`` are resolved here: ``..`` of the shared root is the root itself;
- files are opened for I/O by re-opening the inode's own O_PATH fd through
  ``/proc/self/fd/N`` (it names the inode, not a path): symlinks are never opened
  (ELOOP) and device nodes, FIFOs and sockets are never opened on the host (EACCES;
  the guest kernel serves those itself and never sends OPEN for them);
- every request the host would permission-check runs with the caller's (translated)
  fsuid/fsgid on its own thread (per-thread syscalls): LOOKUP, OPEN(DIR), the create
  family, UNLINK, RMDIR, RENAME, LINK, SETATTR, ACCESS, the xattr ops and the flag
  ioctls -- so the host kernel's checks (modes, ACLs, sticky dirs, ownership) are the
  ones that apply, and new files belong to the caller; the guest's umask is applied
  here (DONT_MASK).  Requests on an open handle (READ, WRITE, FSYNC, FALLOCATE, LSEEK,
  COPY_FILE_RANGE, locks, READDIR) have no permission check in POSIX beyond the open.
"""
from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import secrets
import stat

from vhostfs import hostsys
from vhostfs.fs import api
from vhostfs.fs.api import Attr, Context, DirSink, Entry, FileSystem, ReadSink, SetAttr, StatFs, WriteSource
from vhostfs.fs.passthrough.handles import (DIRENT64_NAME, DIRENT64_UNPACK, DirHandle, FileHandle,
                                            HandleTable)
from vhostfs.fs.passthrough.inodes import Inode, InodeTable, key_of, stat_fd
from vhostfs.fs.passthrough import inodes, locks
from vhostfs.fs.passthrough import xattr as xattrs
from vhostfs.fs.passthrough.creds import Credentials, IdMap
from vhostfs.fs.passthrough.extras import ExtrasMixin
from vhostfs.fs.passthrough.fhandles import FileHandleInodes

_O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
#: guest open flags passed to the host; O_CREAT/O_EXCL/O_NOFOLLOW/O_PATH/O_DIRECTORY/
#: O_TMPFILE/O_NOCTTY and anything unknown are dropped.  O_DIRECT is dropped too: guest
#: buffers need not meet the host's alignment rules (the guest kernel still bypasses
#: its own page cache for O_DIRECT files).
_PASS_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC
               | os.O_NOATIME | os.O_NONBLOCK | os.O_LARGEFILE)
_STATX_NOFOLLOW = hostsys.AT_EMPTY_PATH | hostsys.AT_SYMLINK_NOFOLLOW
_RENAME_FLAGS = hostsys.RENAME_NOREPLACE | hostsys.RENAME_EXCHANGE | hostsys.RENAME_WHITEOUT
_U64 = (1 << 64) - 1
_DOTS = (b".", b"..")

# d_type values (<dirent.h>)
DT_UNKNOWN, DT_FIFO, DT_CHR, DT_DIR, DT_BLK, DT_REG, DT_LNK, DT_SOCK = 0, 1, 2, 4, 6, 8, 10, 12

FOPEN_DIRECT_IO = api.FOPEN_DIRECT_IO
FOPEN_KEEP_CACHE = api.FOPEN_KEEP_CACHE
FOPEN_CACHE_DIR = api.FOPEN_CACHE_DIR


class CachePolicy(str, enum.Enum):
    """never: no caching (timeouts 0, direct I/O); metadata: entries/attrs cached for
    ``timeout``, data not kept across opens; auto: the default (timeouts, the kernel's
    own invalidation); always: long timeouts and kept data/dir caches."""

    NEVER = "never"
    METADATA = "metadata"
    AUTO = "auto"
    ALWAYS = "always"


def encode_rdev(dev: int) -> int:
    """Host dev_t -> the kernel's new_encode_dev() u32 used in fuse_attr.rdev."""
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


_S64_MAX = (1 << 63) - 1


def to_attr(st: hostsys.Statx) -> Attr:
    """statx -> fuse_attr.  Sanity: the guest reads size and blocks as signed (loff_t,
    blkcnt_t), so they are capped at 2**63-1 and never turn negative; nanoseconds are
    capped at 999999999 and the mode keeps only the type and permission bits.
    (Unpacked once and branch-tested: this runs for every LOOKUP/GETATTR reply.)"""
    (_, mode, nlink, uid, gid, rdev, ino, size, blocks, blksize,
     atime, ansec, mtime, mnsec, ctime, cnsec, _, _, _, _, _, _) = st
    if size > _S64_MAX:
        size = _S64_MAX
    if blocks > _S64_MAX:
        blocks = _S64_MAX
    if ansec > 999_999_999 or mnsec > 999_999_999 or cnsec > 999_999_999:
        ansec, mnsec, cnsec = (min(ansec, 999_999_999), min(mnsec, 999_999_999),
                               min(cnsec, 999_999_999))
    return Attr(ino, size, blocks, atime & _U64, mtime & _U64, ctime & _U64, ansec, mnsec,
                cnsec, mode & (mode & 0o170000 | 0o7777), nlink, uid, gid,
                encode_rdev(rdev) if rdev else 0, blksize)


class PassthroughFs(ExtrasMixin, FileSystem):
    """Serves ``shared_dir``; see the module docstring for the safety rules.

    ``timeout`` is the entry/attr cache timeout in seconds (``cache="never"`` forces 0,
    ``"always"`` raises it to a day).  ``switch_credentials`` (default: when running as
    root) makes requests run with the caller's fsuid/fsgid (see the module docstring).
    """

    def __init__(self, shared_dir: str, *, readonly: bool = False, timeout: float = 1.0,
                 cache: CachePolicy | str = CachePolicy.AUTO,
                 switch_credentials: bool | None = None, xattr: bool = False,
                 posix_acl: bool = False, xattrmap: str | None = None,
                 security_label: bool = False, killpriv_v2: bool = False,
                 announce_submounts: bool = True, writeback: bool = False,
                 allow_direct_io: bool = False, allow_mmap: bool = False,
                 readdirplus: bool = True, preserve_noatime: bool = False,
                 inode_file_handles: str = "never", translate_uid=(), translate_gid=(),
                 posix_lock: bool = True, flock: bool = True,
                 inode_fd_cache: int = 1024) -> None:
        if timeout < 0:
            raise ValueError("timeout must be >= 0")
        if inode_file_handles == "fallback":
            inode_file_handles = "prefer"  # virtiofsd's deprecated alias
        if inode_file_handles not in ("never", "prefer", "mandatory"):
            raise ValueError(f"inode_file_handles: never, prefer or mandatory, "
                             f"not {inode_file_handles!r}")
        self.inode_file_handles = inode_file_handles
        if posix_acl and (translate_uid or translate_gid):
            raise ValueError("posix_acl cannot be combined with uid/gid translation "
                             "(ACL entries carry raw ids)")
        self.xattr = bool(xattr or posix_acl or xattrmap or security_label)
        self.security_label = security_label
        self.posix_acl = posix_acl
        self.xattrmap = xattrs.XattrMap.parse(xattrmap) if xattrmap else None
        self.killpriv_v2 = killpriv_v2
        self.announce_submounts = announce_submounts
        self.writeback = writeback
        self.allow_direct_io = allow_direct_io
        self.allow_mmap = allow_mmap
        self.readdirplus_enabled = readdirplus
        self.preserve_noatime = preserve_noatime
        self.posix_lock, self.flock_enabled = posix_lock, flock
        self.uidmap, self.gidmap = IdMap(translate_uid), IdMap(translate_gid)
        self.cache = CachePolicy(cache)
        if self.cache is CachePolicy.NEVER:
            timeout = 0.0
        elif self.cache is CachePolicy.ALWAYS:
            timeout = max(timeout, 86400.0)
        self.timeout = timeout
        self.readonly = readonly
        if not os.path.isdir(inodes.PROC_SELF_FD):
            raise RuntimeError("/proc must be mounted: files are re-opened via /proc/self/fd")
        root_fd = os.open(shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if inode_file_handles == "never":
                self.inodes = InodeTable(root_fd)
            else:
                try:
                    self.inodes = FileHandleInodes(root_fd, mandatory=inode_file_handles == "mandatory",
                                                   max_open=inode_fd_cache)
                except OSError as e:
                    if inode_file_handles == "mandatory":
                        raise OSError(e.errno, f"--inode-file-handles=mandatory: file handles "
                                               f"unusable here ({e.strerror})") from None
                    self.inodes = InodeTable(root_fd)  # prefer: no handles on this host
        except BaseException:
            os.close(root_fd)
            raise
        self.handles = HandleTable()
        self.posix_locks = locks.PosixLocks()
        self._uid, self._gid = os.geteuid(), os.getegid()
        self.switch_credentials = (self._uid == 0) if switch_credentials is None else switch_credentials
        self.creds = Credentials(self._uid, self._gid, self.switch_credentials)
        self._identity_ids = self.uidmap.identity and self.gidmap.identity
        # The process umask also applies to host creations; bits it strips are put back
        # (a daemon that runs with umask 0 never pays for that).
        self._proc_umask = os.umask(0o022)
        os.umask(self._proc_umask)
        self._file_open_flags = {CachePolicy.NEVER: FOPEN_DIRECT_IO,
                                 CachePolicy.ALWAYS: FOPEN_KEEP_CACHE}.get(self.cache, 0)
        self._pass_flags = _PASS_FLAGS | (os.O_DIRECT if allow_direct_io else 0)
        if not preserve_noatime:
            self._pass_flags &= ~os.O_NOATIME
        self._dir_open_flags = (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR
                                if self.cache is CachePolicy.ALWAYS else 0)

    # --- helpers -------------------------------------------------------------------------
    def _attr(self, st: hostsys.Statx) -> Attr:
        a = to_attr(st)
        if not self.uidmap.identity:
            a.uid = self.uidmap.to_guest(a.uid)
        if not self.gidmap.identity:
            a.gid = self.gidmap.to_guest(a.gid)
        return a

    def _entry(self, inode: Inode, st: hostsys.Statx) -> Entry:
        return Entry(inode.nodeid, 0, self._attr(st), self.timeout, self.timeout)

    def _child_entry(self, inode: Inode, st: hostsys.Statx, parent: Inode) -> Entry:
        """The entry of a name looked up in ``parent``: FUSE_ATTR_SUBMOUNT when it is a
        directory on another host mount (st_dev or mnt_id differ), so that the guest
        gives it its own superblock (a distinct st_dev)."""
        entry = self._entry(inode, st)
        if (self.announce_submounts and stat.S_ISDIR(st.mode)
                and (st.dev, st.mnt_id) != (parent.key[0], parent.key[2])):
            entry.attr.flags |= api.ATTR_SUBMOUNT
        return entry

    def _dir(self, nodeid: int) -> Inode:
        inode = self.inodes.get(nodeid)
        if inode.ftype != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, "not a directory")
        return inode

    def _writable(self) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "read-only share")

    @staticmethod
    def _plain_name(name: bytes) -> None:
        if name in _DOTS or not name or b"/" in name or b"\0" in name:
            raise OSError(errno.EINVAL, "invalid name")

    @contextlib.contextmanager
    def _as_caller(self, ctx: Context, extra: tuple | list = ()):
        """Run the block with the caller's (translated) fsuid/fsgid and supplementary
        groups on this thread only: the groups the request carries
        (FUSE_CREATE_SUPP_GROUP, Linux >= 6.7) plus ``extra``; never the daemon's own
        groups.  A guest id the translation forbids fails with EPERM; a forbidden
        supplementary group is left out."""
        uid, gid = self.uidmap.to_host(ctx.uid), self.gidmap.to_host(ctx.gid)
        supp = [*self._host_groups(ctx.groups), *extra]
        token = self.creds.enter(uid, gid, supp)
        if not token:
            yield
            return
        try:
            yield
        finally:
            self.creds.leave(token)

    def _host_groups(self, groups) -> list[int]:
        if not groups or self.gidmap.identity:
            return list(groups)
        out = []
        for g in groups:
            try:
                out.append(self.gidmap.to_host(g))
            except OSError:
                pass
        return out

    def _as_caller_do(self, ctx: Context, fn, gids_of, *, create: bool = False,
                      errnos: tuple = (errno.EACCES,)):
        """``fn()`` with the caller's credentials, so the host kernel makes the
        permission checks (DAC, ACLs, sticky bits, protected links) for that user.

        FUSE carries no supplementary groups except on create-type requests from a
        Linux >= 6.7 guest (FUSE_CREATE_SUPP_GROUP, and then only the parent's group).
        The guest kernel checked first with the caller's full group list (virtio-fs
        mounts are default_permissions), so when the host refuses (``errnos``) a request
        that carried no groups, ``fn()`` is tried once more with the groups of the
        objects involved (``gids_of()``, host gids) as supplementary groups -- only
        groups the guest could have named as the request's gid itself (the id
        translation maps them back unchanged), so the retry grants nothing a guest
        could not claim outright.  A thread in the daemon's own ids switches nothing."""
        if (ctx is None or not self.creds.enabled
                or (ctx.uid == self._uid and ctx.gid == self._gid and not ctx.groups
                    and self._identity_ids)):
            # an internal call, a daemon that switches nothing, or the daemon's own ids
            return fn()
        try:
            uid, gid = self.uidmap.to_host(ctx.uid), self.gidmap.to_host(ctx.gid)
            token = self.creds.enter(uid, gid, self._host_groups(ctx.groups))
            try:
                return fn()
            finally:
                if token:
                    self.creds.leave(token)
        except PermissionError as e:
            if (e.errno not in errnos or ctx.groups
                    or (create and getattr(self, "create_supp_group", False))):
                raise
            if not self._switches(ctx):
                raise  # nothing was switched: the daemon's own refusal
            gid = self.gidmap.to_host(ctx.gid)
            extra = [g for g in dict.fromkeys(gids_of()) if g != gid and self._claimable_gid(g)]
            if not extra:
                raise
        with self._as_caller(ctx, extra):
            return fn()

    @staticmethod
    def _gids(*inodes: Inode):
        """The retry's candidate groups: the host groups of ``inodes`` (looked up only
        when a retry is considered)."""
        return lambda: [stat_fd(i.fd).gid for i in inodes]

    def _switches(self, ctx: Context) -> bool:
        """Whether this request runs with other ids than the daemon's."""
        return ctx is not None and self.creds.enabled and (self.uidmap.to_host(ctx.uid),
                                       self.gidmap.to_host(ctx.gid)) != (self._uid, self._gid)

    def _claimable_gid(self, host_gid: int) -> bool:
        """Whether a guest could send ``host_gid`` (translated) as a request's gid."""
        if self.gidmap.identity:
            return True
        try:
            return self.gidmap.to_host(self.gidmap.to_guest(host_gid)) == host_gid
        except OSError:
            return False

    def _create_as_caller(self, ctx: Context, parent: Inode, make):
        """``make()``, a creation in ``parent``, as the caller: the new object belongs
        to the caller's fsuid/fsgid (the parent's group under a setgid parent), and the
        parent's group is the one a supplementary group can matter for."""
        return self._as_caller_do(ctx, make, self._gids(parent), create=True)

    def _lookup_in(self, parent: Inode, name: bytes, ctx: Context | None = None) -> Entry:
        """Resolve one component under ``parent`` and account one lookup (+1).  With
        ``ctx`` (LOOKUP) the host checks the caller's search permission on ``parent``;
        the bookkeeping after the openat runs with the daemon's credentials."""
        if name == b".." and parent is self.inodes.root:
            name = b"."
        elif b"/" in name or b"\0" in name or not name:
            raise OSError(errno.EINVAL, "invalid name")
        if ctx is None:
            fd = os.open(name, _O_PATH_FLAGS, dir_fd=parent.fd)
        else:
            fd = self._as_caller_do(ctx, lambda: os.open(name, _O_PATH_FLAGS, dir_fd=parent.fd),
                                    self._gids(parent))
        try:
            st = stat_fd(fd)
            if name == b".." and not self._inside_root(fd, st):
                raise OSError(errno.EACCES, "'..' leads outside the shared directory")
        except BaseException:
            os.close(fd)
            raise
        return self._child_entry(self.inodes.add_ref(fd, st), st, parent)

    def _inside_root(self, fd: int, st: hostsys.Statx) -> bool:
        """Whether the directory at ``fd`` lies inside the shared root: walk '..' up to
        the root (True) or to the host's / (False).  Only '..' lookups pay for this (the
        kernel resolves '..' itself unless EXPORT_SUPPORT; a host-side rename may have
        moved a directory the guest holds out of the share)."""
        root_key = self.inodes.root.key
        cur, owned = fd, False
        try:
            for _ in range(4096):
                if key_of(st) == root_key:
                    return True
                up = os.open(b"..", _O_PATH_FLAGS, dir_fd=cur)
                up_st = stat_fd(up)
                if key_of(up_st) == key_of(st):  # '..' of / is / itself
                    os.close(up)
                    return False
                if owned:
                    os.close(cur)
                cur, owned, st = up, True, up_st
            return False
        finally:
            if owned:
                os.close(cur)

    def _default_acl(self, parent: Inode) -> bool:
        """Whether new entries of ``parent`` get their mode from its default ACL (the host
        kernel then ignores the umask, and so must we)."""
        if not self.posix_acl:
            return False
        try:
            os.getxattr(parent.proc_path, xattrs.ACL_DEFAULT)
            return True
        except OSError:
            return False

    def _umask_for(self, ctx: Context, parent: Inode) -> int:
        return 0 if self._default_acl(parent) else ctx.umask

    def _label(self, ctx: Context, target: str | int) -> None:
        """--security-label: give a new object the security contexts the guest's LSM
        chose (FUSE_SECURITY_CTX), with the daemon's credentials.  Only ``security.*``
        names are accepted (a guest must not reach trusted.* or user.* through this
        path); --xattrmap applies.  ``target``: an open fd, or a path whose last
        component is the object itself (never followed: it may be a symlink)."""
        for name, value in ctx.secctx if self.security_label else ():
            if not name.startswith(b"security."):
                raise OSError(errno.EPERM, "security context name outside security.*")
            host = self.xattrmap.to_host(name) if self.xattrmap is not None else name
            if isinstance(target, int):
                os.setxattr(target, host, value)
            else:
                os.setxattr(target, host, value, follow_symlinks=False)

    def _create_named(self, ctx: Context, p: Inode, name: bytes, make, remove):
        """``make(n)`` creates the object ``n`` in ``p`` (as the caller); returns its
        result (CREATE's fd).  With security contexts to set, the object never exists
        under ``name`` without them -- a guest LSM that reads the label right after
        the creation must not see an unlabelled file -- so it is made under a unique
        hidden name, labelled, and moved onto ``name`` with RENAME_NOREPLACE (EEXIST
        as for a plain creation).  The guest itself cannot list the hidden name: its
        VFS holds the parent locked across the creation.  Where the host filesystem
        lacks RENAME_NOREPLACE (EINVAL), the object is made under ``name`` and
        labelled after."""
        if not (self.security_label and ctx.secctx):
            return self._create_as_caller(ctx, p, lambda: make(name))
        tmp = b".vhostfs-new-" + secrets.token_hex(8).encode()
        result = self._create_as_caller(ctx, p, lambda: make(tmp))
        try:
            self._label(ctx, result if isinstance(result, int)
                        else f"{inodes.PROC_SELF_FD}/{p.fd}/{tmp.decode()}")
            hostsys.renameat2(p.fd, tmp, p.fd, name, hostsys.RENAME_NOREPLACE)
            return result
        except BaseException as e:
            if isinstance(result, int):
                os.close(result)
            try:
                remove(tmp, dir_fd=p.fd)
            except OSError:
                pass
            if not (isinstance(e, OSError) and e.errno == errno.EINVAL):
                raise
        result = self._create_as_caller(ctx, p, lambda: make(name))
        try:
            self._label(ctx, result if isinstance(result, int)
                        else f"{inodes.PROC_SELF_FD}/{p.fd}/{name.decode('utf-8', 'surrogateescape')}")
        except BaseException:
            if isinstance(result, int):
                os.close(result)
            remove(name, dir_fd=p.fd)
            raise
        return result

    def _new_entry(self, parent: Inode, name: bytes, wanted_mode: int | None) -> Entry:
        """After a create-type op: look the new name up (+1); restore mode bits the
        daemon's process umask stripped."""
        entry = self._lookup_in(parent, name)
        if wanted_mode is not None and wanted_mode & self._proc_umask and not self._default_acl(parent):
            inode = self.inodes.get(entry.nodeid)
            if inode.ftype != stat.S_IFLNK:
                os.chmod(inode.proc_path, wanted_mode)
                entry.attr.mode = stat_fd(inode.fd).mode
        return entry

    # --- session -------------------------------------------------------------------------
    def init(self, capable: int) -> int:
        want = 0
        if self.posix_lock:
            want |= api.INIT_POSIX_LOCKS
        if self.flock_enabled:
            want |= api.INIT_FLOCK_LOCKS
        if self.posix_acl:
            want |= api.INIT_POSIX_ACL
        if self.xattr:
            want |= api.INIT_SETXATTR_EXT
        if self.killpriv_v2:
            want |= api.INIT_HANDLE_KILLPRIV_V2
        if self.announce_submounts:
            want |= api.INIT_SUBMOUNTS
        if self.writeback and not self.readonly:
            want |= api.INIT_WRITEBACK_CACHE
        if self.allow_mmap:
            want |= api.INIT_DIRECT_IO_ALLOW_MMAP
        if self.creds.enabled:
            want |= api.INIT_CREATE_SUPP_GROUP
        if self.security_label:
            want |= api.INIT_SECURITY_CTX
        # With FUSE_CREATE_SUPP_GROUP the kernel sends the group that matters itself.
        self.create_supp_group = bool(capable & api.INIT_CREATE_SUPP_GROUP and self.creds.enabled)
        self.writeback_on = bool(want & capable & api.INIT_WRITEBACK_CACHE)
        return want

    def init_disable(self) -> int:
        return 0 if self.readdirplus_enabled else (api.INIT_DO_READDIRPLUS
                                                   | api.INIT_READDIRPLUS_AUTO)

    def node_type(self, nodeid: int) -> int | None:
        inode = self.inodes.find_id(nodeid)
        return inode.ftype if inode is not None else None

    def destroy(self) -> None:
        self.handles.clear()
        self.inodes.clear()

    # --- names and inodes ----------------------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        return self._lookup_in(self._dir(parent), name, ctx)

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.inodes.forget(nodeid, nlookup)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[Attr, float]:
        inode = self.inodes.get(nodeid)
        return self._attr(stat_fd(inode.fd)), self.timeout

    def setattr(self, ctx: Context, nodeid: int, a: SetAttr) -> tuple[Attr, float]:
        inode = self.inodes.get(nodeid)
        v = a.valid
        if v & (api.FATTR_MODE | api.FATTR_UID | api.FATTR_GID | api.FATTR_SIZE
                | api.FATTR_ATIME | api.FATTR_MTIME):
            self._writable()
        hfd = self.handles.file(a.fh).fd if v & api.FATTR_FH else None
        if v & api.FATTR_SIZE and v & api.FATTR_KILL_SUIDGID and inode.ftype == stat.S_IFREG:
            # The server's part of KILLPRIV_V2, done for the caller (who need not own
            # the file to truncate it), before the truncation itself.
            self._kill_suidgid(inode, hfd)
        extra = []
        if self._switches(ctx) and not ctx.groups:
            # The guest kernel already decided what this caller may do with the file's
            # group (it cleared S_ISGID from the mode if the caller is not in it, and
            # refused a chgrp to a group the caller is not in), and FUSE carries no
            # supplementary groups: give the host the file's group and the new one, so
            # it neither strips S_ISGID silently nor refuses that chgrp.
            extra = [g for g in dict.fromkeys(
                (stat_fd(inode.fd).gid,
                 *((self.gidmap.to_host(a.gid),) if v & api.FATTR_GID else ())))
                if self._claimable_gid(g)]
        if ctx is None:
            self._setattr_as_caller(inode, hfd, a)
        else:
            with self._as_caller(ctx, extra):
                self._setattr_as_caller(inode, hfd, a)
        return self._attr(stat_fd(inode.fd)), self.timeout

    def _setattr_as_caller(self, inode: Inode, hfd: int | None, a: SetAttr) -> None:
        """SETATTR's changes in the kernel's order (mode, owner, size, times); the
        host checks each with the caller's credentials (ownership for chmod/chown and
        explicit times, write permission for truncate and UTIME_NOW)."""
        v = a.valid
        if v & api.FATTR_MODE:
            if inode.ftype == stat.S_IFLNK:
                raise OSError(errno.EOPNOTSUPP, "chmod of a symlink")
            if hfd is not None:
                os.fchmod(hfd, a.mode & 0o7777)
            else:
                os.chmod(inode.proc_path, a.mode & 0o7777)
        if v & (api.FATTR_UID | api.FATTR_GID):
            uid = self.uidmap.to_host(a.uid) if v & api.FATTR_UID else 0xFFFFFFFF
            gid = self.gidmap.to_host(a.gid) if v & api.FATTR_GID else 0xFFFFFFFF
            hostsys.fchownat(inode.fd, b"", uid, gid, _STATX_NOFOLLOW)
        if v & api.FATTR_SIZE:
            if inode.ftype == stat.S_IFDIR:
                raise OSError(errno.EISDIR, "truncate of a directory")
            if inode.ftype != stat.S_IFREG:
                raise OSError(errno.EINVAL, "truncate of a special file")
            if a.size > (1 << 63) - 1:
                raise OSError(errno.EFBIG, "size out of range")
            if hfd is not None:
                os.ftruncate(hfd, a.size)
            else:
                os.truncate(inode.proc_path, a.size)
        if v & (api.FATTR_ATIME | api.FATTR_MTIME | api.FATTR_ATIME_NOW | api.FATTR_MTIME_NOW):
            times = []
            for now, given, sec, nsec in ((api.FATTR_ATIME_NOW, api.FATTR_ATIME, a.atime, a.atimensec),
                                          (api.FATTR_MTIME_NOW, api.FATTR_MTIME, a.mtime, a.mtimensec)):
                if v & now:
                    times.append((0, hostsys.UTIME_NOW))
                elif v & given:
                    times.append((_signed64(sec), nsec))
                else:
                    times.append((0, hostsys.UTIME_OMIT))
            self._writable()
            hostsys.utimensat(inode.fd, b"", times[0], times[1], _STATX_NOFOLLOW)

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        inode = self.inodes.get(nodeid)
        if inode.ftype != stat.S_IFLNK:
            raise OSError(errno.EINVAL, "not a symlink")
        return os.readlink(b"", dir_fd=inode.fd)

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        p = self._dir(parent)
        self._writable()
        self._plain_name(name)
        if not target or b"\0" in target:
            raise OSError(errno.EINVAL, "invalid symlink target")
        self._create_named(ctx, p, name, lambda n: os.symlink(target, n, dir_fd=p.fd), os.unlink)
        return self._new_entry(p, name, None)

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int) -> Entry:
        p = self._dir(parent)
        self._writable()
        self._plain_name(name)
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK, 0):
            raise OSError(errno.EINVAL, "bad file type")
        # Device nodes: created when the host permits (the caller's credentials: guest
        # root maps to the daemon's CAP_MKNOD; a nodev mount refuses opening them, and
        # the daemon never opens special files itself).  rdev is the kernel's
        # new_encode_dev() u32.
        dev = os.makedev(((rdev >> 8) & 0xFFF), (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)) \
            if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        perm = mode & 0o7777 & ~self._umask_for(ctx, p)
        self._create_named(
            ctx, p, name, lambda n: os.mknod(n, (kind or stat.S_IFREG) | perm, dev, dir_fd=p.fd),
            os.unlink)
        return self._new_entry(p, name, perm)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int) -> Entry:
        p = self._dir(parent)
        self._writable()
        self._plain_name(name)
        perm = mode & 0o7777 & ~self._umask_for(ctx, p)
        self._create_named(ctx, p, name, lambda n: os.mkdir(n, perm, dir_fd=p.fd), os.rmdir)
        return self._new_entry(p, name, perm)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        p = self._dir(parent)
        self._writable()
        self._plain_name(name)
        self._as_caller_do(ctx, lambda: os.unlink(name, dir_fd=p.fd),
                           self._gids(p))

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        p = self._dir(parent)
        self._writable()
        self._plain_name(name)
        self._as_caller_do(ctx, lambda: os.rmdir(name, dir_fd=p.fd),
                           self._gids(p))

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        p, np = self._dir(parent), self._dir(newparent)
        self._writable()
        self._plain_name(name)
        self._plain_name(newname)
        if flags & ~_RENAME_FLAGS:
            raise OSError(errno.EINVAL, "unknown rename flags")
        if flags:
            def move():
                hostsys.renameat2(p.fd, name, np.fd, newname, flags)
        else:
            def move():
                os.rename(name, newname, src_dir_fd=p.fd, dst_dir_fd=np.fd)
        self._as_caller_do(ctx, move, self._gids(p, np))

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        inode = self.inodes.get(nodeid)
        np = self._dir(newparent)
        self._writable()
        self._plain_name(newname)
        if inode.ftype == stat.S_IFDIR:
            raise OSError(errno.EPERM, "hard link to a directory")
        # linkat(AT_SYMLINK_FOLLOW) through the magic link links the inode itself
        # (a symlink inode included); no path is resolved by name.
        # The caller's credentials: write on the new parent, and the host's
        # protected_hardlinks rule (owner, or read+write access) on the file.
        self._as_caller_do(
            ctx, lambda: os.link(inode.proc_path, newname, dst_dir_fd=np.fd, follow_symlinks=True),
            self._gids(np, inode), errnos=(errno.EACCES, errno.EPERM))
        return self._lookup_in(np, newname)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        inode = self.inodes.get(nodeid)
        if mask & ~(os.R_OK | os.W_OK | os.X_OK):
            raise OSError(errno.EINVAL, "bad access mask")
        if mask & os.W_OK and self.readonly:
            raise OSError(errno.EROFS, "read-only share")
        if inode.ftype == stat.S_IFLNK or mask == os.F_OK:
            return
        def check():
            if not os.access(inode.proc_path, mask, effective_ids=True):
                raise OSError(errno.EACCES, "access denied")
        self._as_caller_do(ctx, check, self._gids(inode))

    def statfs(self, ctx: Context, nodeid: int) -> StatFs:
        s = os.fstatvfs(self.inodes.get(nodeid).fd)
        return StatFs(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize,
                      s.f_namemax, s.f_frsize)

    # --- files ---------------------------------------------------------------------------
    def _open_flags(self, flags: int) -> int:
        if flags & os.O_ACCMODE == os.O_ACCMODE:
            raise OSError(errno.EINVAL, "bad access mode")
        if self.readonly and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
            raise OSError(errno.EROFS, "read-only share")
        out = (flags & self._pass_flags) | os.O_CLOEXEC
        if getattr(self, "writeback_on", False):
            # The guest page cache writes back whole pages through any handle (it may
            # read first) and positions appends itself: O_WRONLY becomes O_RDWR and
            # O_APPEND is dropped (pwrite on an O_APPEND fd would ignore the offset).
            if out & os.O_ACCMODE == os.O_WRONLY:
                out = (out & ~os.O_ACCMODE) | os.O_RDWR
            out &= ~os.O_APPEND
        return out

    def _reopen(self, ctx: Context, inode: Inode, flags: int) -> int:
        if inode.ftype == stat.S_IFLNK:
            raise OSError(errno.ELOOP, "symlinks are not opened")
        if inode.ftype == stat.S_IFDIR:
            raise OSError(errno.EISDIR, "is a directory")
        if inode.ftype != stat.S_IFREG:
            raise OSError(errno.EACCES, "special files are not opened on the host")
        host = self._open_flags(flags)
        path = inode.proc_path
        gids = self._gids(inode)
        try:
            return self._as_caller_do(ctx, lambda: os.open(path, host), gids)
        except PermissionError:
            if not (host & os.O_ACCMODE == os.O_RDWR and flags & os.O_ACCMODE == os.O_WRONLY):
                raise
        # --writeback made an O_WRONLY open O_RDWR (the guest page cache may read
        # through any handle) and the caller may not read: the caller's own O_WRONLY
        # open decides, then the daemon opens it O_RDWR (as virtiofsd does).
        wronly = (host & ~(os.O_ACCMODE | os.O_TRUNC)) | os.O_WRONLY
        os.close(self._as_caller_do(ctx, lambda: os.open(path, wronly), gids))
        return os.open(path, host)

    def open(self, ctx: Context, nodeid: int, flags: int) -> tuple[int, int]:
        inode = self.inodes.get(nodeid)
        fd = self._reopen(ctx, inode, flags)
        if ctx.kill_suidgid and flags & os.O_TRUNC:
            try:
                self._kill_suidgid(inode, fd)
            except BaseException:
                os.close(fd)
                raise
        return self.handles.add(FileHandle(fd, inode, flags)), self._open_reply_flags(flags)

    def _open_reply_flags(self, flags: int) -> int:
        out = self._file_open_flags
        if flags & os.O_DIRECT and self.allow_direct_io:
            out |= FOPEN_DIRECT_IO
        return out

    def _kill_suidgid(self, inode: Inode, fd: int | None) -> None:
        """KILLPRIV_V2: clear setuid, and setgid when group-exec is set (setgid without
        group-exec marks mandatory locking and stays), as the kernel's
        should_remove_suid() does for a caller without CAP_FSETID."""
        mode = stat_fd(inode.fd).mode
        kill = mode & stat.S_ISUID
        if mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP:
            kill |= stat.S_ISGID
        if kill and stat.S_ISREG(mode):
            new = mode & 0o7777 & ~kill
            if fd is not None:
                os.fchmod(fd, new)
            else:
                os.chmod(inode.proc_path, new)

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int
               ) -> tuple[Entry, int, int]:
        p = self._dir(parent)
        self._writable()
        self._plain_name(name)
        host_flags = self._open_flags(flags) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        perm = mode & 0o7777 & ~self._umask_for(ctx, p)
        try:
            fd = self._create_named(
                ctx, p, name, lambda n: os.open(n, host_flags, perm, dir_fd=p.fd), os.unlink)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            # Existing name: open it like LOOKUP + OPEN (never opens symlinks/FIFOs).
            entry = self._lookup_in(p, name)
            try:
                fh, open_flags = self.open(ctx, entry.nodeid, flags & ~os.O_CREAT)
            except BaseException:
                self.inodes.forget(entry.nodeid, 1)
                raise
            return entry, fh, open_flags
        try:
            if perm & self._proc_umask and not self._default_acl(p):
                os.fchmod(fd, perm)
        except BaseException:
            os.close(fd)
            raise
        return self._adopt_new_file(fd, flags, flags)

    def _adopt_new_file(self, fd: int, handle_flags: int, open_flags: int
                        ) -> tuple[Entry, int, int]:
        """Register a file this request just created and opened as ``fd`` (CREATE,
        TMPFILE): one lookup reference on its inode and a handle.  The inode's O_PATH fd
        comes from the open fd's magic link, so the name is never resolved again (the
        guest may have renamed it meanwhile).  Closes ``fd`` on failure."""
        try:
            path_fd = os.open(f"{inodes.PROC_SELF_FD}/{fd}", os.O_PATH | os.O_CLOEXEC)
            try:
                st = stat_fd(path_fd)
            except BaseException:
                os.close(path_fd)
                raise
            inode = self.inodes.add_ref(path_fd, st)
        except BaseException:
            os.close(fd)
            raise
        fh = self.handles.add(FileHandle(fd, inode, handle_flags))
        return self._entry(inode, st), fh, self._open_reply_flags(open_flags)

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int,
             sink: ReadSink) -> int:
        return sink.read_from_fd(self.handles.file(fh).fd, size, offset)

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int,
              source: WriteSource, write_flags: int) -> int:
        h = self.handles.file(fh)
        if h.flags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "handle not open for writing")
        if write_flags & api.WRITE_KILL_SUIDGID:
            self._kill_suidgid(h.inode, h.fd)
        return source.write_to_fd(h.fd, size, offset)

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        # close() of a duplicate gives the host the close-time semantics (e.g. NFS
        # write-back, POSIX lock release) without closing our handle.
        h = self.handles.file(fh)
        # The guest closed one of its descriptors: POSIX releases the owner's locks.
        self.posix_locks.release_owner(h.inode, lock_owner)
        os.close(os.dup(h.fd))

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int, release_flags: int,
                lock_owner: int) -> None:
        h = self.handles.file(fh)
        if release_flags & api.RELEASE_FLOCK_UNLOCK:
            fcntl.flock(h.fd, fcntl.LOCK_UN)
        self.handles.remove(fh, FileHandle)  # fd closes when no request still uses it

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        fd = self.handles.file(fh).fd
        (os.fdatasync if datasync else os.fsync)(fd)

    # --- locks ---------------------------------------------------------------------------
    def _lock_target(self, nodeid: int, fh: int) -> tuple[Inode, FileHandle | None]:
        inode = self.inodes.get(nodeid)
        if inode.ftype != stat.S_IFREG:
            raise OSError(errno.EINVAL, "locks are served for regular files only")
        try:
            return inode, self.handles.file(fh, nodeid)
        except OSError:
            return inode, None

    def getlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: api.FileLock
              ) -> api.FileLock:
        inode, h = self._lock_target(nodeid, fh)
        return self.posix_locks.getlk(inode, owner, lock, h.fd if h is not None else None)

    def setlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: api.FileLock,
              *, flock: bool, sleep: bool) -> None:
        inode, h = self._lock_target(nodeid, fh)
        if flock:
            if h is None:
                raise OSError(errno.EBADF, f"unknown file handle {fh}")
            locks.flock(h.fd, lock, sleep, ctx.cancel)
            return
        accmode = h.flags & os.O_ACCMODE if h is not None else os.O_RDONLY
        self.posix_locks.setlk(inode, owner, lock, accmode, sleep, ctx.cancel)

    # --- directories ---------------------------------------------------------------------
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> tuple[int, int]:
        inode = self._dir(nodeid)
        fd = self._as_caller_do(
            ctx, lambda: os.open(inode.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC),
            self._gids(inode))
        return self.handles.add(DirHandle(fd, inode)), self._dir_open_flags

    def _dot_ino(self, h: DirHandle, name: bytes, ino: int) -> int:
        """'..' of the shared root reports the root itself: never reveal what lies above."""
        if name == b".." and h.inode is self.inodes.root:
            return stat_fd(h.inode.fd).ino
        return ino

    def _dtype_at(self, h: DirHandle, name: bytes) -> int:
        """d_type for a filesystem that reports DT_UNKNOWN."""
        try:
            return stat.S_IFMT(os.stat(name, dir_fd=h.fd, follow_symlinks=False).st_mode) >> 12
        except OSError:
            return DT_UNKNOWN

    # READDIR(PLUS) walk the handle's linux_dirent64 records inline (no call per entry):
    # ``pos``/``next_off`` advance only past emitted (or vanished) entries and are stored
    # back on the handle whatever happens, so an entry that did not fit comes first next time.
    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int, sink: DirSink) -> None:
        h = self.handles.dir(fh)
        with h.lock:
            h.seek(offset)
            data, pos, next_off = h.data, h.pos, h.next_off
            try:
                while True:
                    if pos >= len(data):
                        data, pos = h.fill(), 0
                        if not data:
                            break
                    ino, off, reclen, dtype = DIRENT64_UNPACK(data, pos)
                    end = pos + reclen
                    name = data[pos + DIRENT64_NAME:data.index(0, pos + DIRENT64_NAME, end)]
                    if not sink.fits(name):
                        break  # left pending: the next READDIR at next_off starts with it
                    if name in _DOTS:
                        ino = self._dot_ino(h, name, ino)
                    elif dtype == DT_UNKNOWN:
                        dtype = self._dtype_at(h, name)
                    off &= _U64  # the kernel's s64 cookie, as the u64 the guest hands back
                    sink.add(name, ino, dtype, off)
                    pos, next_off = end, off
            finally:
                h.pos, h.next_off = pos, next_off

    def readdirplus(self, ctx: Context, nodeid: int, fh: int, offset: int, sink: DirSink) -> None:
        h = self.handles.dir(fh)
        parent = h.inode
        emitted = 0
        with h.lock:
            h.seek(offset)
            data, pos, next_off = h.data, h.pos, h.next_off
            try:
                while True:
                    if pos >= len(data):
                        data, pos = h.fill(), 0
                        if not data:
                            break
                    ino, off, reclen, dtype = DIRENT64_UNPACK(data, pos)
                    end = pos + reclen
                    name = data[pos + DIRENT64_NAME:data.index(0, pos + DIRENT64_NAME, end)]
                    if not sink.fits(name):
                        break
                    off &= _U64
                    if name in _DOTS:  # nodeid 0: the kernel neither links nor counts it
                        ino = self._dot_ino(h, name, ino)
                        attr = Attr(ino, 0, 0, 0, 0, 0, 0, 0, 0, DT_DIR << 12, 0, 0, 0, 0, 0)
                        sink.add(name, ino, DT_DIR, off, Entry(0, 0, attr, 0.0, 0.0))
                        pos, next_off = end, off
                        emitted += 1
                        continue
                    try:
                        entry = self._lookup_in(parent, name)
                    except OSError as e:
                        if e.errno == errno.ENOENT:
                            pos, next_off = end, off  # removed since getdents64 read it
                            continue
                        if emitted:
                            break  # reply with what we have; the counts already given stand
                        raise
                    sink.add(name, entry.attr.ino, stat.S_IFMT(entry.attr.mode) >> 12, off, entry)
                    pos, next_off = end, off
                    emitted += 1
            finally:
                h.pos, h.next_off = pos, next_off

    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        self.handles.remove(fh, DirHandle)

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        fd = self.handles.dir(fh).fd
        (os.fdatasync if datasync else os.fsync)(fd)
