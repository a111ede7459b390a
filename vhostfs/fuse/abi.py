"""FUSE wire ABI, protocol 7.41 (include/uapi/linux/fuse.h). Declarations only.

One module-level ``struct.Struct`` per C struct, named after it (little-endian: virtio
1.x is little-endian).  Sizes are checked against the kernel header by
``tests/unit/test_fuse_abi.py``.
"""
from __future__ import annotations

import enum
import struct

KERNEL_VERSION = 7
#: 7.39 added FUSE_STATX (served) and opt-in INIT flags (DIRECT_IO_ALLOW_MMAP, served;
#: HAS_EXPIRE_ONLY); 7.40 and 7.41 only opt-in flags (PASSTHROUGH, NO_EXPORT_SUPPORT,
#: HAS_RESEND, ALLOW_IDMAP) that vhostfs does not set: no request changes shape, so a
#: 7.41 guest gets 7.41 and a 7.38 one (Linux 6.1) still 7.38.
KERNEL_MINOR_VERSION = 41
ROOT_ID = 1


class Opcode(enum.IntEnum):
    """For names in logs only; dispatch uses the raw integers."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52          # 7.39 (a 6.6+ guest sends it for btime, even to a 7.38 server)


MAX_OPCODE = 52
#: Requests the kernel sends without waiting for a reply (fuse.h: FORGET, BATCH_FORGET;
#: INTERRUPT is answered only by the interrupted request's own reply).
NO_REPLY = frozenset((Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT))

# fuse_init_in/out flags (flags2 carries bits 32..63 when FUSE_INIT_EXT is set)
FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_FILE_OPS = 1 << 2
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_SPLICE_WRITE = 1 << 7
FUSE_SPLICE_MOVE = 1 << 8
FUSE_SPLICE_READ = 1 << 9
FUSE_FLOCK_LOCKS = 1 << 10
FUSE_HAS_IOCTL_DIR = 1 << 11
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_NO_OPEN_SUPPORT = 1 << 17
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_POSIX_ACL = 1 << 20
FUSE_ABORT_ERROR = 1 << 21
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
FUSE_NO_OPENDIR_SUPPORT = 1 << 24
FUSE_EXPLICIT_INVAL_DATA = 1 << 25
FUSE_MAP_ALIGNMENT = 1 << 26
FUSE_SUBMOUNTS = 1 << 27
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
FUSE_SETXATTR_EXT = 1 << 29
FUSE_INIT_EXT = 1 << 30
FUSE_INIT_RESERVED = 1 << 31
FUSE_SECURITY_CTX = 1 << 32
FUSE_HAS_INODE_DAX = 1 << 33
FUSE_CREATE_SUPP_GROUP = 1 << 34        # 7.38 (Linux 6.7): fuse_supp_groups extension
FUSE_HAS_EXPIRE_ONLY = 1 << 35
FUSE_DIRECT_IO_ALLOW_MMAP = 1 << 36     # 7.39 (Linux 6.6)

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

FUSE_GETATTR_FH = 1 << 0
FUSE_RELEASE_FLUSH = 1 << 0
FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1
FUSE_WRITE_CACHE = 1 << 0
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_WRITE_KILL_SUIDGID = 1 << 2
FUSE_READ_LOCKOWNER = 1 << 1
FUSE_OPEN_KILL_SUIDGID = 1 << 0
FUSE_FSYNC_FDATASYNC = 1 << 0
FUSE_LK_FLOCK = 1 << 0
FUSE_SETXATTR_ACL_KILL_SGID = 1 << 0
FUSE_IOCTL_COMPAT = 1 << 0
FUSE_IOCTL_UNRESTRICTED = 1 << 1
FUSE_IOCTL_RETRY = 1 << 2
FUSE_IOCTL_32BIT = 1 << 3
FUSE_IOCTL_DIR = 1 << 4
FUSE_IOCTL_COMPAT_X32 = 1 << 5
FUSE_POLL_SCHEDULE_NOTIFY = 1 << 0
FUSE_ATTR_SUBMOUNT = 1 << 0
FUSE_ATTR_DAX = 1 << 1

FUSE_COMPAT_ENTRY_OUT_SIZE = 120
FUSE_COMPAT_ATTR_OUT_SIZE = 96
FUSE_COMPAT_MKNOD_IN_SIZE = 8
FUSE_COMPAT_WRITE_IN_SIZE = 24
FUSE_COMPAT_STATFS_SIZE = 48
FUSE_COMPAT_INIT_OUT_SIZE = 8
FUSE_COMPAT_22_INIT_OUT_SIZE = 24
FUSE_COMPAT_SETXATTR_IN_SIZE = 8  # fuse_setxattr_in without FUSE_SETXATTR_EXT
FUSE_COMPAT_INIT_IN_SIZE = 16  # fuse_init_in before 7.36 (no flags2/unused)

# --- structs -----------------------------------------------------------------------------
fuse_in_header = struct.Struct("<IIQQIIIHH")          # len opcode unique nodeid uid gid pid total_extlen padding
fuse_out_header = struct.Struct("<IiQ")               # len error unique
fuse_attr = struct.Struct("<QQQQQQIIIIIIIIII")        # ino size blocks atime mtime ctime *nsec x3 mode nlink uid gid rdev blksize flags
fuse_entry_out = struct.Struct("<QQQQII" + fuse_attr.format[1:])
fuse_attr_out = struct.Struct("<QII" + fuse_attr.format[1:])
fuse_forget_in = struct.Struct("<Q")
fuse_forget_one = struct.Struct("<QQ")
fuse_batch_forget_in = struct.Struct("<II")
fuse_getattr_in = struct.Struct("<IIQ")
fuse_setattr_in = struct.Struct("<IIQQQQQQIIIIIIII")  # valid pad fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec mode unused4 uid gid unused5
fuse_mknod_in = struct.Struct("<IIII")                # mode rdev umask padding
fuse_mkdir_in = struct.Struct("<II")                  # mode umask
fuse_rename_in = struct.Struct("<Q")
fuse_rename2_in = struct.Struct("<QII")               # newdir flags padding
fuse_link_in = struct.Struct("<Q")
fuse_open_in = struct.Struct("<II")                   # flags open_flags
fuse_create_in = struct.Struct("<IIII")               # flags mode umask open_flags
fuse_open_out = struct.Struct("<QII")                 # fh open_flags padding
fuse_release_in = struct.Struct("<QIIQ")              # fh flags release_flags lock_owner
fuse_flush_in = struct.Struct("<QIIQ")                # fh unused padding lock_owner
fuse_read_in = struct.Struct("<QQIIQII")              # fh offset size read_flags lock_owner flags padding
fuse_write_in = struct.Struct("<QQIIQII")             # fh offset size write_flags lock_owner flags padding
fuse_write_out = struct.Struct("<II")
fuse_kstatfs = struct.Struct("<QQQQQIIII6I")          # blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
fuse_statfs_out = fuse_kstatfs
fuse_fsync_in = struct.Struct("<QII")                 # fh fsync_flags padding
fuse_access_in = struct.Struct("<II")                 # mask padding
fuse_init_in = struct.Struct("<IIIII11I")             # major minor max_readahead flags flags2 unused[11]
fuse_init_out = struct.Struct("<IIIIHHIIHHI7I")       # major minor max_readahead flags max_background congestion_threshold max_write time_gran max_pages map_alignment flags2 unused[7]
fuse_dirent = struct.Struct("<QQII")                  # ino off namelen type, then name
fuse_direntplus = struct.Struct(fuse_entry_out.format + fuse_dirent.format[1:])
fuse_interrupt_in = struct.Struct("<Q")
fuse_ext_header = struct.Struct("<II")                # size type (request extensions, 7.38)
fuse_supp_groups = struct.Struct("<I")                # nr_groups, then u32 groups[]
FUSE_MAX_NR_SECCTX = 31
FUSE_EXT_GROUPS = 32
fuse_secctx = struct.Struct("<II")                    # size padding, then name\0 + context
fuse_secctx_header = struct.Struct("<II")             # size nr_secctx
fuse_setupmapping_in = struct.Struct("<QQQQQ")        # fh foffset len flags moffset
fuse_removemapping_in = struct.Struct("<I")           # count
fuse_removemapping_one = struct.Struct("<QQ")         # moffset len
FUSE_SETUPMAPPING_FLAG_WRITE = 1 << 0
FUSE_SETUPMAPPING_FLAG_READ = 1 << 1
FUSE_REMOVEMAPPING_MAX_ENTRY = 4096 // fuse_removemapping_one.size   # PAGE_SIZE / 16 = 256
fuse_file_lock = struct.Struct("<QQII")               # start end type pid
fuse_lk_in = struct.Struct("<QQQQIIII")               # fh owner lk(start end type pid) lk_flags padding
fuse_lk_out = fuse_file_lock
fuse_setxattr_in = struct.Struct("<IIII")             # size flags setxattr_flags padding
fuse_setxattr_in_compat = struct.Struct("<II")        # size flags (without FUSE_SETXATTR_EXT)
fuse_getxattr_in = struct.Struct("<II")               # size padding
fuse_getxattr_out = struct.Struct("<II")              # size padding
fuse_fallocate_in = struct.Struct("<QQQII")           # fh offset length mode padding
fuse_lseek_in = struct.Struct("<QQII")                # fh offset whence padding
fuse_lseek_out = struct.Struct("<Q")                  # offset
fuse_copy_file_range_in = struct.Struct("<QQQQQQQ")   # fh_in off_in nodeid_out fh_out off_out len flags
fuse_syncfs_in = struct.Struct("<Q")                  # padding
fuse_ioctl_in = struct.Struct("<QIIQII")              # fh flags cmd arg in_size out_size
fuse_ioctl_out = struct.Struct("<iIII")               # result flags in_iovs out_iovs
fuse_poll_in = struct.Struct("<QQII")                 # fh kh flags events
fuse_poll_out = struct.Struct("<II")                  # revents padding
fuse_bmap_in = struct.Struct("<QII")                  # block blocksize padding
fuse_bmap_out = struct.Struct("<Q")                   # block
# 7.39: FUSE_STATX.  fuse_statx is bit-for-bit the statx(2) layout: times are
# fuse_sx_time {s64 tv_sec, u32 tv_nsec, s32 reserved}.
fuse_statx_in = struct.Struct("<IIQII")               # getattr_flags reserved fh sx_flags sx_mask
fuse_statx = struct.Struct("<IIQIIIH2xQQQQ" + "qIi" * 4 + "IIII112x")  # mask blksize attributes nlink uid gid mode ino size blocks attributes_mask atime btime ctime mtime rdev_major rdev_minor dev_major dev_minor spare2[14]
fuse_statx_out = struct.Struct("<QII16x" + fuse_statx.format[1:])    # attr_valid attr_valid_nsec flags spare[2] stat

FUSE_NAME_OFFSET = fuse_dirent.size
FUSE_NAME_OFFSET_DIRENTPLUS = fuse_direntplus.size
