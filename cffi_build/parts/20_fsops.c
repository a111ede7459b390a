#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

int vhs_fallocate(int fd, int mode, int64_t offset, int64_t len)
{
    return (int)syscall(SYS_fallocate, fd, mode, (off_t)offset, (off_t)len);
}

int vhs_syncfs(int fd)
{
    return (int)syscall(SYS_syncfs, fd);
}

/* gid_t is 32 bits on every Linux ABI we build for; SYS_setgroups is the 32-bit-gid
 * variant on x86_64/aarch64. Acts on the calling thread only. */
int vhs_setgroups_thread(int n, const uint32_t *groups)
{
    return (int)syscall(SYS_setgroups, (size_t)n, groups);
}

/* One request's credential switch in one call (issue 7: six Python-level cffi calls
 * cost ~13 us per request): the supplementary groups (when n >= 0), then fsgid, then
 * fsuid -- fsuid last, because leaving fsuid 0 drops the filesystem capabilities and
 * the group changes need CAP_SETGID (kept: it is not a filesystem capability).  Each
 * id is verified (setfsuid/setfsgid report failure only by not taking effect).
 * 0, or -errno; on failure the thread's ids are whatever took effect and the caller
 * restores the daemon's. */
int vhs_set_fscreds(uint32_t fsuid, uint32_t fsgid, int n, const uint32_t *groups)
{
    if (n >= 0 && syscall(SYS_setgroups, (size_t)n, groups) < 0)
        return -errno;
    syscall(SYS_setfsgid, fsgid);
    if ((uint32_t)syscall(SYS_setfsgid, (uint32_t)-1) != fsgid)
        return -EPERM;
    syscall(SYS_setfsuid, fsuid);
    if ((uint32_t)syscall(SYS_setfsuid, (uint32_t)-1) != fsuid)
        return -EPERM;
    return 0;
}

/* struct file_handle = {u32 handle_bytes; int handle_type; u8 f_handle[]} */
int vhs_name_to_handle(int dirfd, const char *path, int flags, unsigned char *buf,
                       unsigned int bufsize, int *handle_type, int *mount_id)
{
    struct { unsigned int bytes; int type; unsigned char h[128]; } fh;
    if (bufsize > sizeof fh.h)
        bufsize = sizeof fh.h;
    fh.bytes = bufsize;
    fh.type = 0;
    if (syscall(SYS_name_to_handle_at, dirfd, path, &fh, mount_id, flags) < 0)
        return -1;
    memcpy(buf, fh.h, fh.bytes);
    *handle_type = fh.type;
    return (int)fh.bytes;
}

int vhs_open_by_handle(int mount_fd, const unsigned char *buf, unsigned int size,
                       int handle_type, int flags)
{
    struct { unsigned int bytes; int type; unsigned char h[128]; } fh;
    if (size > sizeof fh.h) {
        errno = EINVAL;
        return -1;
    }
    fh.bytes = size;
    fh.type = handle_type;
    memcpy(fh.h, buf, size);
    return (int)syscall(SYS_open_by_handle_at, mount_fd, &fh, flags);
}
