#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <linux/openat2.h>

struct vhs_statx {
    uint32_t mask;
    uint32_t blksize;
    uint64_t attributes;
    uint32_t nlink;
    uint32_t uid;
    uint32_t gid;
    uint32_t mode;
    uint64_t ino;
    uint64_t size;
    uint64_t blocks;
    int64_t atime_sec;
    uint32_t atime_nsec;
    int64_t mtime_sec;
    uint32_t mtime_nsec;
    int64_t ctime_sec;
    uint32_t ctime_nsec;
    uint64_t rdev;
    uint64_t dev;
    uint64_t mnt_id;
};

#define VHS_STATX_BASIC_STATS 0x7ff
#define VHS_STATX_MNT_ID 0x1000
#define VHS_RESOLVE_NO_XDEV 0x01
#define VHS_RESOLVE_NO_MAGICLINKS 0x02
#define VHS_RESOLVE_NO_SYMLINKS 0x04
#define VHS_RESOLVE_BENEATH 0x08
#define VHS_RESOLVE_IN_ROOT 0x10
#define VHS_RENAME_NOREPLACE 1
#define VHS_RENAME_EXCHANGE 2
#define VHS_RENAME_WHITEOUT 4
#define VHS_UTIME_NOW 1073741823
#define VHS_UTIME_OMIT 1073741822

#ifndef SYS_openat2
#define SYS_openat2 437
#endif

int vhs_statx(int dirfd, const char *path, int flags, unsigned int mask, struct vhs_statx *out)
{
    struct statx stx;
    memset(&stx, 0, sizeof(stx));
    if (syscall(SYS_statx, dirfd, path, flags, mask, &stx) < 0)
        return -1;
    out->mask = stx.stx_mask;
    out->blksize = stx.stx_blksize;
    out->attributes = stx.stx_attributes;
    out->nlink = stx.stx_nlink;
    out->uid = stx.stx_uid;
    out->gid = stx.stx_gid;
    out->mode = stx.stx_mode;
    out->ino = stx.stx_ino;
    out->size = stx.stx_size;
    out->blocks = stx.stx_blocks;
    out->atime_sec = stx.stx_atime.tv_sec;
    out->atime_nsec = stx.stx_atime.tv_nsec;
    out->mtime_sec = stx.stx_mtime.tv_sec;
    out->mtime_nsec = stx.stx_mtime.tv_nsec;
    out->ctime_sec = stx.stx_ctime.tv_sec;
    out->ctime_nsec = stx.stx_ctime.tv_nsec;
    out->rdev = makedev(stx.stx_rdev_major, stx.stx_rdev_minor);
    out->dev = makedev(stx.stx_dev_major, stx.stx_dev_minor);
    /* stx_mnt_id follows stx_dev_minor in struct statx (Linux 5.8+). */
    out->mnt_id = (stx.stx_mask & VHS_STATX_MNT_ID) ? stx.stx_mnt_id : 0;
    return 0;
}

int vhs_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode, uint64_t resolve)
{
    struct open_how how;
    memset(&how, 0, sizeof(how));
    how.flags = flags;
    how.mode = mode;
    how.resolve = resolve;
    return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
}

int vhs_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags)
{
    return (int)syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, flags);
}

int vhs_utimensat(int dirfd, const char *path, int64_t atime_sec, long atime_nsec,
                  int64_t mtime_sec, long mtime_nsec, int flags)
{
    struct timespec ts[2];
    ts[0].tv_sec = atime_sec;
    ts[0].tv_nsec = atime_nsec;
    ts[1].tv_sec = mtime_sec;
    ts[1].tv_nsec = mtime_nsec;
    return (int)syscall(SYS_utimensat, dirfd, path, ts, flags);
}

int vhs_fchownat(int dirfd, const char *path, uint32_t uid, uint32_t gid, int flags)
{
    return (int)syscall(SYS_fchownat, dirfd, path, uid, gid, flags);
}

/* setfsuid/setfsgid act on the calling thread only when issued as raw
 * syscalls (glibc's setresuid broadcasts to every thread; these do not).
 * They return the previous value and never fail visibly: the caller checks
 * the result with a second call. */
int vhs_setfsuid(uint32_t uid)
{
    return (int)syscall(SYS_setfsuid, uid);
}

int vhs_setfsgid(uint32_t gid)
{
    return (int)syscall(SYS_setfsgid, gid);
}
