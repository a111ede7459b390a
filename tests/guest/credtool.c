/* Guest-side helper for test_credentials.py (built static on the host).
 *
 *   credtool as UID GID SUPP[,SUPP...]|- PROG [ARG...]
 *       run PROG with those real/effective ids and exactly those supplementary
 *       groups (busybox has no setpriv --reuid / su without a passwd database)
 *   credtool noatime PATH
 *       FS_IOC_FSGETXATTR, then FS_IOC_FSSETXATTR with FS_XFLAG_NOATIME added: the
 *       guest's FUSE client sends the latter as FUSE_IOCTL (fuse_fileattr_set)
 *   credtool projid PATH N
 *       FS_IOC_FSSETXATTR with fsx_projid = N (must be refused: a host quota account)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static int fsx(const char *path, int projid, int set_noatime)
{
    struct fsxattr fa;
    int fd = open(path, O_RDONLY);
    if (fd < 0 || ioctl(fd, FS_IOC_FSGETXATTR, &fa) < 0) {
        printf("fsgetxattr %s: %s\n", path, strerror(errno));
        return 1;
    }
    if (set_noatime)
        fa.fsx_xflags |= FS_XFLAG_NOATIME;
    if (projid >= 0)
        fa.fsx_projid = (unsigned)projid;
    if (ioctl(fd, FS_IOC_FSSETXATTR, &fa) < 0) {
        printf("fssetxattr %s: %s\n", path, strerror(errno));
        return 1;
    }
    if (ioctl(fd, FS_IOC_FSGETXATTR, &fa) < 0) {
        printf("fsgetxattr again %s: %s\n", path, strerror(errno));
        return 1;
    }
    printf("xflags %#x projid %u\n", fa.fsx_xflags, fa.fsx_projid);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 6 && !strcmp(argv[1], "as")) {
        gid_t groups[64];
        int n = 0;
        if (strcmp(argv[4], "-")) {
            for (char *s = strtok(argv[4], ","); s && n < 64; s = strtok(NULL, ","))
                groups[n++] = (gid_t)atoi(s);
        }
        gid_t gid = (gid_t)atoi(argv[3]);
        uid_t uid = (uid_t)atoi(argv[2]);
        if (setgroups(n, groups) < 0 || setresgid(gid, gid, gid) < 0 || setresuid(uid, uid, uid) < 0) {
            perror("credtool: dropping privileges");
            return 126;
        }
        execvp(argv[5], argv + 5);
        perror("credtool: exec");
        return 127;
    }
    if (argc == 3 && !strcmp(argv[1], "noatime"))
        return fsx(argv[2], -1, 1);
    if (argc == 4 && !strcmp(argv[1], "projid"))
        return fsx(argv[2], atoi(argv[3]), 0);
    fprintf(stderr, "usage: credtool as UID GID SUPP|- PROG [ARG...] | noatime PATH | projid PATH N\n");
    return 2;
}
