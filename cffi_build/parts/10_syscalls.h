/* Syscalls Python's os module lacks (Linux). Each returns -1 and sets errno on
 * failure, like the syscall itself; hostsys.py turns that into OSError. */
#define VHS_STATX_BASIC_STATS 0x7ff
#define VHS_STATX_MNT_ID 0x1000
#define VHS_STATX_BTIME 0x800
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

int vhs_statx_fields(int dirfd, const char *path, int flags, unsigned int mask, uint64_t *out);
int vhs_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode, uint64_t resolve);
int vhs_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags);
int vhs_utimensat(int dirfd, const char *path, int64_t atime_sec, long atime_nsec,
                  int64_t mtime_sec, long mtime_nsec, int flags);
int vhs_fchownat(int dirfd, const char *path, uint32_t uid, uint32_t gid, int flags);
int vhs_setfsuid(uint32_t uid);
int vhs_setfsgid(uint32_t gid);
