/* vhostfs conformance suite: runs INSIDE the booted guest, on the virtio-fs mount.
 *
 *   conformance [--user UID:GID[:SUPP]] [--entries N] [--escape-token TOKEN] WORKDIR [TEST...]
 *   conformance --list | --hold-locks FILE
 *
 * Each test prints exactly one line: "ok NAME", "not ok NAME: why" or
 * "skip NAME: why" (a skip is only for a test that cannot apply to this caller, e.g.
 * a root-only test under --user).  With --user the process drops to that uid/gid (and
 * supplementary group) first and runs every test that needs no root.  Tests that need
 * a second, unprivileged caller while running as root fork one (uid 1000, gid 1000,
 * supplementary group 1001).  Built static (gcc -static) so the busybox guest runs it.
 * The host side (tests/guest/test_conformance.py) checks from the host what the guest
 * did (owners, modes, locks seen by host processes, escape markers untouched).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define USER_UID 1000
#define USER_GID 1000
#define SUPP_GID 1001
#define OTHER_GID 2000

static const char *workdir;
static const char *escape_token = "";
static int is_root;
static char failbuf[512];

#define FAIL(...) do { snprintf(failbuf, sizeof failbuf, __VA_ARGS__); return 1; } while (0)
#define CHECK(cond, ...) do { if (!(cond)) FAIL(__VA_ARGS__); } while (0)
#define SYS(call) do { if ((call) < 0) FAIL("%s: %s (line %d)", #call, strerror(errno), __LINE__); } while (0)
#define SKIP(...) do { snprintf(failbuf, sizeof failbuf, __VA_ARGS__); return 2; } while (0)
#define EXPECT_ERR(call, err) do { errno = 0; long _r = (long)(call); \
    if (_r != -1 || errno != (err)) FAIL("%s: expected %s, got %ld (%s) (line %d)", #call, \
        strerrorname_np(err), _r, errno ? strerrorname_np(errno) : "no error", __LINE__); } while (0)

/* --- helpers ------------------------------------------------------------------------ */
static void path(char *out, const char *test, const char *name)
{
    snprintf(out, 4096, "%s/%s%s%s", workdir, test, name ? "/" : "", name ? name : "");
}

static int write_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int put_file(const char *p, const char *data, mode_t mode)
{
    int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, mode);
    if (fd < 0)
        return -1;
    int r = write_all(fd, data, strlen(data));
    close(fd);
    return r;
}

static ssize_t get_file(const char *p, char *buf, size_t n)
{
    int fd = open(p, O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t r = read(fd, buf, n - 1);
    close(fd);
    if (r >= 0)
        buf[r] = 0;
    return r;
}

static int drop_to(uid_t uid, gid_t gid, int nsupp, const gid_t *supp)
{
    if (setgroups(nsupp, supp) < 0 || setresgid(gid, gid, gid) < 0 || setresuid(uid, uid, uid) < 0)
        return -1;
    return 0;
}

/* Run fn in a child as USER_UID/USER_GID (+ SUPP_GID when supp); returns fn's result
 * (0 ok, 1 fail with message in failbuf via a pipe). */
typedef int (*userfn)(void *);
static int as_user(int supp, userfn fn, void *arg)
{
    int pfd[2];
    if (pipe(pfd) < 0)
        FAIL("pipe: %s", strerror(errno));
    pid_t pid = fork();
    if (pid == 0) {
        close(pfd[0]);
        gid_t g = SUPP_GID;
        int r;
        if (drop_to(USER_UID, USER_GID, supp ? 1 : 0, &g) < 0) {
            snprintf(failbuf, sizeof failbuf, "drop privileges: %s", strerror(errno));
            r = 1;
        } else {
            failbuf[0] = 0;
            r = fn(arg);
        }
        if (write(pfd[1], failbuf, strlen(failbuf)) < 0)
            _exit(3);
        _exit(r);
    }
    close(pfd[1]);
    char msg[sizeof failbuf];
    ssize_t n = read(pfd[0], msg, sizeof msg - 1);
    close(pfd[0]);
    int st;
    waitpid(pid, &st, 0);
    msg[n > 0 ? n : 0] = 0;
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        snprintf(failbuf, sizeof failbuf, "as uid %d: %s", USER_UID, msg);
        return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
    }
    return 0;
}

static int mkdir_test(const char *test, mode_t mode)
{
    char p[4096];
    path(p, test, NULL);
    return mkdir(p, mode);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* --- permissions and ownership ------------------------------------------------------ */
static char g_p1[4096], g_p2[4096], g_p3[4096];

static int user_eacces(void *arg)
{
    (void)arg;
    EXPECT_ERR(open(g_p1, O_RDONLY), EACCES);          /* 0600 root file */
    EXPECT_ERR(open(g_p1, O_WRONLY), EACCES);
    EXPECT_ERR(access(g_p1, R_OK), EACCES);
    EXPECT_ERR(open(g_p3, O_WRONLY | O_CREAT, 0644), EACCES);   /* in a 0755 root dir */
    EXPECT_ERR(mkdir(g_p3, 0755), EACCES);
    EXPECT_ERR(unlink(g_p2), EACCES);                  /* a root file in the root dir */
    EXPECT_ERR(rename(g_p2, g_p3), EACCES);
    EXPECT_ERR(truncate(g_p2, 0), EACCES);             /* 0644 root file: not writable */
    return 0;
}

static int t_perm_eacces(void)
{
    if (!is_root)
        SKIP("sets up root-owned files");
    SYS(mkdir_test("perm_eacces", 0755));
    path(g_p1, "perm_eacces", "secret");
    path(g_p2, "perm_eacces", "pub");
    path(g_p3, "perm_eacces", "new");
    SYS(put_file(g_p1, "s", 0600));
    SYS(put_file(g_p2, "p", 0644));
    return as_user(0, user_eacces, NULL);
}

static int user_eperm(void *arg)
{
    (void)arg;
    struct timespec ts[2] = {{1000, 0}, {2000, 0}};
    EXPECT_ERR(chmod(g_p2, 0666), EPERM);              /* not the owner */
    EXPECT_ERR(chown(g_p1, 0, -1), EPERM);             /* give away own file */
    EXPECT_ERR(chown(g_p1, -1, OTHER_GID), EPERM);     /* group we are not in */
    EXPECT_ERR(utimensat(AT_FDCWD, g_p2, ts, 0), EPERM); /* explicit times: owner only */
    EXPECT_ERR(utimensat(AT_FDCWD, g_p2, NULL, 0), EACCES); /* now: needs write access */
    EXPECT_ERR(link(g_p1, g_p3), EACCES);              /* root dir not writable */
    CHECK(chown(g_p1, -1, USER_GID) == 0, "chgrp to own group: %s", strerror(errno));
    return 0;
}

static int t_perm_eperm(void)
{
    if (!is_root)
        SKIP("sets up root-owned files");
    SYS(mkdir_test("perm_eperm", 0777));
    path(g_p1, "perm_eperm", "mine");
    path(g_p2, "perm_eperm", "roots");
    path(g_p3, "perm_eperm", "..");
    SYS(put_file(g_p1, "m", 0644));
    SYS(chown(g_p1, USER_UID, USER_GID));
    SYS(put_file(g_p2, "r", 0644));
    char d[4096];
    path(d, "perm_eperm", "rootdir");
    SYS(mkdir(d, 0755));
    path(g_p3, "perm_eperm", "rootdir/link");
    return as_user(0, user_eperm, NULL);
}

static int user_owner(void *arg)
{
    (void)arg;
    char p[4096];
    struct stat st;
    path(p, "owner", "file");
    SYS(put_file(p, "x", 0640));
    SYS(lstat(p, &st));
    CHECK(st.st_uid == USER_UID && st.st_gid == USER_GID, "file owned by %d:%d", st.st_uid, st.st_gid);
    CHECK((st.st_mode & 07777) == 0640, "file mode %o", st.st_mode & 07777);
    path(p, "owner", "dir");
    SYS(mkdir(p, 0750));
    SYS(lstat(p, &st));
    CHECK(st.st_uid == USER_UID && st.st_gid == USER_GID, "dir owned by %d:%d", st.st_uid, st.st_gid);
    path(p, "owner", "fifo");
    SYS(mkfifo(p, 0600));
    SYS(lstat(p, &st));
    CHECK(S_ISFIFO(st.st_mode) && st.st_uid == USER_UID, "fifo %o uid %d", st.st_mode, st.st_uid);
    path(p, "owner", "sym");
    SYS(symlink("file", p));
    SYS(lstat(p, &st));
    CHECK(S_ISLNK(st.st_mode) && st.st_uid == USER_UID && st.st_gid == USER_GID, "symlink %d:%d", st.st_uid, st.st_gid);
    /* umask applies */
    umask(077);
    path(p, "owner", "masked");
    SYS(put_file(p, "x", 0666));
    SYS(lstat(p, &st));
    CHECK((st.st_mode & 0777) == 0600, "umask 077: mode %o", st.st_mode & 0777);
    return 0;
}

static int t_owner(void)
{
    /* host side checks the owners too (test_conformance.py) */
    SYS(mkdir_test("owner", 0777));
    char p[4096];
    path(p, "owner", NULL);
    SYS(chmod(p, 0777));
    if (is_root)
        return as_user(0, user_owner, NULL);
    return user_owner(NULL);
}

static int user_sgid(void *arg)
{
    (void)arg;
    char p[4096];
    struct stat st;
    path(p, "sgid_dir", "d/f");
    SYS(put_file(p, "x", 0644));
    SYS(stat(p, &st));
    CHECK(st.st_gid == OTHER_GID, "file in setgid dir has gid %d, want %d", st.st_gid, OTHER_GID);
    path(p, "sgid_dir", "d/sub");
    SYS(mkdir(p, 0755));
    SYS(stat(p, &st));
    CHECK(st.st_gid == OTHER_GID && (st.st_mode & S_ISGID), "subdir gid %d mode %o", st.st_gid, st.st_mode);
    return 0;
}

static int t_sgid_dir(void)
{
    if (!is_root)
        SKIP("needs chown to another group");
    char p[4096];
    SYS(mkdir_test("sgid_dir", 0755));
    path(p, "sgid_dir", "d");
    SYS(mkdir(p, 0777));
    SYS(chown(p, 0, OTHER_GID));
    SYS(chmod(p, 02777));
    return as_user(0, user_sgid, NULL);
}

static int user_supp(void *arg)
{
    (void)arg;
    char buf[64];
    CHECK(get_file(g_p1, buf, sizeof buf) == 5 && !strcmp(buf, "group"), "read via supplementary group: %s", strerror(errno));
    CHECK(put_file(g_p2, "y", 0644) == 0, "create in a dir writable via supplementary group: %s", strerror(errno));
    struct stat st;
    SYS(stat(g_p2, &st));
    CHECK(st.st_uid == USER_UID && st.st_gid == USER_GID, "created %d:%d", st.st_uid, st.st_gid);
    return 0;
}

static int user_nosupp(void *arg)
{
    (void)arg;
    EXPECT_ERR(open(g_p1, O_RDONLY), EACCES);
    EXPECT_ERR(open(g_p3, O_WRONLY | O_CREAT, 0644), EACCES);
    return 0;
}

static int t_supp_groups(void)
{
    if (!is_root)
        SKIP("needs chown to another group");
    char d[4096];
    SYS(mkdir_test("supp_groups", 0755));
    path(g_p1, "supp_groups", "groupfile");
    SYS(put_file(g_p1, "group", 0640));
    SYS(chown(g_p1, 0, SUPP_GID));
    path(d, "supp_groups", "groupdir");
    SYS(mkdir(d, 0770));
    SYS(chown(d, 0, SUPP_GID));
    SYS(chmod(d, 0770));
    path(g_p2, "supp_groups", "groupdir/bysupp");
    path(g_p3, "supp_groups", "groupdir/nosupp");
    if (as_user(0, user_nosupp, NULL))
        return 1;
    return as_user(1, user_supp, NULL);
}

/* --- renames and links ---------------------------------------------------------------- */
static int t_rename_noreplace(void)
{
    char a[4096], b[4096], c[4096], buf[16];
    SYS(mkdir_test("rename_noreplace", 0755));
    path(a, "rename_noreplace", "a");
    path(b, "rename_noreplace", "b");
    path(c, "rename_noreplace", "c");
    SYS(put_file(a, "A", 0644));
    SYS(put_file(b, "B", 0644));
    EXPECT_ERR(renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_NOREPLACE), EEXIST);
    CHECK(get_file(b, buf, sizeof buf) == 1 && buf[0] == 'B', "target changed by a refused rename");
    SYS(renameat2(AT_FDCWD, a, AT_FDCWD, c, RENAME_NOREPLACE));
    EXPECT_ERR(access(a, F_OK), ENOENT);
    CHECK(get_file(c, buf, sizeof buf) == 1 && buf[0] == 'A', "renamed content");
    return 0;
}

static int t_rename_exchange(void)
{
    char f[4096], d[4096], buf[16], x[4096];
    struct stat st;
    SYS(mkdir_test("rename_exchange", 0755));
    path(f, "rename_exchange", "f");
    path(d, "rename_exchange", "d");
    SYS(put_file(f, "F", 0644));
    SYS(mkdir(d, 0755));
    path(x, "rename_exchange", "d/inside");
    SYS(put_file(x, "I", 0644));
    SYS(renameat2(AT_FDCWD, f, AT_FDCWD, d, RENAME_EXCHANGE));
    SYS(lstat(f, &st));
    CHECK(S_ISDIR(st.st_mode), "f is not the directory after exchange");
    SYS(lstat(d, &st));
    CHECK(S_ISREG(st.st_mode), "d is not the file after exchange");
    CHECK(get_file(d, buf, sizeof buf) == 1 && buf[0] == 'F', "d content");
    path(x, "rename_exchange", "f/inside");
    CHECK(get_file(x, buf, sizeof buf) == 1 && buf[0] == 'I', "f/inside content");
    path(x, "rename_exchange", "missing");
    EXPECT_ERR(renameat2(AT_FDCWD, f, AT_FDCWD, x, RENAME_EXCHANGE), ENOENT);
    return 0;
}

static int t_rename_dirs(void)
{
    char a[4096], b[4096], c[4096], f[4096], x[4096];
    struct stat st;
    SYS(mkdir_test("rename_dirs", 0755));
    path(a, "rename_dirs", "a");
    path(b, "rename_dirs", "b");
    path(c, "rename_dirs", "c");
    path(f, "rename_dirs", "f");
    SYS(mkdir(a, 0755));
    SYS(mkdir(b, 0755));
    SYS(mkdir(c, 0755));
    path(x, "rename_dirs", "c/child");
    SYS(put_file(x, "c", 0644));
    SYS(put_file(f, "f", 0644));
    SYS(rename(a, b));                                /* over an empty dir */
    EXPECT_ERR(lstat(a, &st), ENOENT);
    errno = 0;
    CHECK(rename(b, c) == -1 && (errno == ENOTEMPTY || errno == EEXIST), "over a non-empty dir: %s", strerror(errno));
    EXPECT_ERR(rename(f, c), EISDIR);                 /* file over dir */
    EXPECT_ERR(rename(b, f), ENOTDIR);                /* dir over file */
    path(x, "rename_dirs", "b/sub");
    EXPECT_ERR(rename(b, x), EINVAL);                 /* into itself */
    return 0;
}

static int t_rename_cross_dir(void)
{
    char d1[4096], d2[4096], a[4096], b[4096], sd[4096], sd2[4096], buf[16];
    struct stat st1, st2, st;
    SYS(mkdir_test("rename_cross", 0755));
    path(d1, "rename_cross", "d1");
    path(d2, "rename_cross", "d2");
    SYS(mkdir(d1, 0755));
    SYS(mkdir(d2, 0755));
    path(a, "rename_cross", "d1/f");
    path(b, "rename_cross", "d2/g");
    SYS(put_file(a, "X", 0644));
    SYS(stat(a, &st));
    SYS(rename(a, b));
    EXPECT_ERR(access(a, F_OK), ENOENT);
    CHECK(get_file(b, buf, sizeof buf) == 1 && buf[0] == 'X', "content after cross-dir rename");
    SYS(stat(b, &st1));
    CHECK(st1.st_ino == st.st_ino, "inode changed by rename");
    path(sd, "rename_cross", "d1/sub");
    path(sd2, "rename_cross", "d2/sub");
    SYS(mkdir(sd, 0755));
    SYS(stat(d1, &st1));
    SYS(stat(d2, &st2));
    CHECK(st1.st_nlink == 3 && st2.st_nlink == 2, "nlink before: %lu %lu", st1.st_nlink, st2.st_nlink);
    SYS(rename(sd, sd2));
    SYS(stat(d1, &st1));
    SYS(stat(d2, &st2));
    CHECK(st1.st_nlink == 2 && st2.st_nlink == 3, "parent nlink after dir move: %lu %lu", st1.st_nlink, st2.st_nlink);
    return 0;
}

static int t_link_counts(void)
{
    char a[4096], b[4096], c[4096], d[4096];
    struct stat st;
    SYS(mkdir_test("links", 0755));
    path(a, "links", "a");
    path(b, "links", "b");
    path(c, "links", "c");
    SYS(put_file(a, "L", 0644));
    SYS(link(a, b));
    SYS(link(a, c));
    SYS(stat(a, &st));
    CHECK(st.st_nlink == 3, "nlink after 2 links: %lu", st.st_nlink);
    SYS(unlink(b));
    SYS(stat(c, &st));
    CHECK(st.st_nlink == 2, "nlink after unlink: %lu", st.st_nlink);
    EXPECT_ERR(link(a, c), EEXIST);
    path(d, "links", "dir");
    SYS(mkdir(d, 0755));
    EXPECT_ERR(link(d, b), EPERM);
    SYS(stat(d, &st));
    CHECK(st.st_nlink == 2, "empty dir nlink %lu", st.st_nlink);
    path(b, "links", "dir/s1");
    SYS(mkdir(b, 0755));
    SYS(stat(d, &st));
    CHECK(st.st_nlink == 3, "dir nlink with a subdir %lu", st.st_nlink);
    SYS(rmdir(b));
    SYS(stat(d, &st));
    CHECK(st.st_nlink == 2, "dir nlink after rmdir %lu", st.st_nlink);
    return 0;
}

static int t_unlink_open(void)
{
    char a[4096], buf[32];
    struct stat st;
    SYS(mkdir_test("unlink_open", 0755));
    path(a, "unlink_open", "f");
    int fd = open(a, O_RDWR | O_CREAT, 0644);
    SYS(fd);
    SYS(write_all(fd, "hello", 5));
    SYS(unlink(a));
    EXPECT_ERR(access(a, F_OK), ENOENT);
    SYS(pwrite(fd, " world", 6, 5));
    CHECK(pread(fd, buf, sizeof buf, 0) == 11 && !memcmp(buf, "hello world", 11), "read after unlink");
    SYS(fstat(fd, &st));
    CHECK(st.st_nlink == 0 && st.st_size == 11, "fstat after unlink: nlink %lu size %ld", st.st_nlink, st.st_size);
    SYS(ftruncate(fd, 3));
    SYS(fstat(fd, &st));
    CHECK(st.st_size == 3, "ftruncate after unlink");
    close(fd);
    return 0;
}

static int t_timestamps(void)
{
    char a[4096];
    struct stat st, st2;
    SYS(mkdir_test("times", 0755));
    path(a, "times", "f");
    SYS(put_file(a, "t", 0644));
    struct timespec ts[2] = {{1000000000, 123456789}, {1100000000, 987654321}};
    SYS(utimensat(AT_FDCWD, a, ts, 0));
    SYS(stat(a, &st));
    CHECK(st.st_atim.tv_sec == 1000000000 && st.st_atim.tv_nsec == 123456789, "atime %ld.%09ld", st.st_atim.tv_sec, st.st_atim.tv_nsec);
    CHECK(st.st_mtim.tv_sec == 1100000000 && st.st_mtim.tv_nsec == 987654321, "mtime %ld.%09ld", st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
    struct timespec omit[2] = {{0, UTIME_OMIT}, {1200000000, 5}};
    SYS(utimensat(AT_FDCWD, a, omit, 0));
    SYS(stat(a, &st));
    CHECK(st.st_atim.tv_sec == 1000000000 && st.st_atim.tv_nsec == 123456789, "UTIME_OMIT changed atime");
    CHECK(st.st_mtim.tv_sec == 1200000000 && st.st_mtim.tv_nsec == 5, "mtime with atime omitted");
    struct timespec nw[2] = {{0, UTIME_NOW}, {0, UTIME_OMIT}};
    time_t t0 = time(NULL);
    SYS(utimensat(AT_FDCWD, a, nw, 0));
    SYS(stat(a, &st));
    CHECK(st.st_atim.tv_sec >= t0 - 2 && st.st_atim.tv_sec <= t0 + 2, "UTIME_NOW atime %ld vs %ld", st.st_atim.tv_sec, t0);
    CHECK(st.st_mtim.tv_sec == 1200000000, "UTIME_OMIT mtime changed");
    /* a write updates mtime and ctime */
    SYS(stat(a, &st));
    int fd = open(a, O_WRONLY);
    SYS(fd);
    SYS(write_all(fd, "more", 4));
    SYS(fsync(fd));
    close(fd);
    SYS(stat(a, &st2));
    CHECK(st2.st_mtim.tv_sec >= t0 - 2, "write did not update mtime (%ld)", st2.st_mtim.tv_sec);
    /* symlink times without following */
    char l[4096];
    path(l, "times", "l");
    SYS(symlink("f", l));
    SYS(utimensat(AT_FDCWD, l, ts, AT_SYMLINK_NOFOLLOW));
    SYS(lstat(l, &st));
    CHECK(st.st_mtim.tv_sec == 1100000000, "symlink mtime %ld", st.st_mtim.tv_sec);
    SYS(stat(a, &st));
    CHECK(st.st_mtim.tv_sec != 1100000000, "AT_SYMLINK_NOFOLLOW changed the target");
    return 0;
}

/* --- sparse files, fallocate, copy_file_range ------------------------------------------ */
static int t_sparse_seek(void)
{
    char a[4096], buf[4096];
    memset(buf, 'd', sizeof buf);
    SYS(mkdir_test("sparse", 0755));
    path(a, "sparse", "f");
    int fd = open(a, O_RDWR | O_CREAT | O_TRUNC, 0644);
    SYS(fd);
    SYS(pwrite(fd, buf, sizeof buf, 0));
    SYS(pwrite(fd, buf, sizeof buf, 1 << 20));
    SYS(ftruncate(fd, 2 << 20));
    SYS(fsync(fd));
    off_t d0 = lseek(fd, 0, SEEK_DATA);
    off_t h0 = lseek(fd, 0, SEEK_HOLE);
    off_t d1 = lseek(fd, 8192, SEEK_DATA);
    off_t h1 = lseek(fd, 1 << 20, SEEK_HOLE);
    CHECK(d0 == 0, "SEEK_DATA(0) = %ld", (long)d0);
    CHECK(h0 >= 4096 && h0 < (1 << 20), "SEEK_HOLE(0) = %ld, want a hole before 1 MiB", (long)h0);
    CHECK(d1 == (1 << 20), "SEEK_DATA(8192) = %ld, want 1 MiB", (long)d1);
    CHECK(h1 > (1 << 20) && h1 < (2 << 20), "SEEK_HOLE(1 MiB) = %ld", (long)h1);
    EXPECT_ERR(lseek(fd, (1 << 20) + 65536, SEEK_DATA), ENXIO);
    EXPECT_ERR(lseek(fd, 3 << 20, SEEK_HOLE), ENXIO);
    struct stat st;
    SYS(fstat(fd, &st));
    CHECK(st.st_blocks * 512 < (1 << 20), "sparse file allocates %ld bytes", (long)st.st_blocks * 512);
    close(fd);
    return 0;
}

static int t_fallocate(void)
{
    char a[4096];
    static char buf[1 << 20], rd[1 << 20];
    memset(buf, 'x', sizeof buf);
    SYS(mkdir_test("fallocate", 0755));
    path(a, "fallocate", "f");
    int fd = open(a, O_RDWR | O_CREAT | O_TRUNC, 0644);
    SYS(fd);
    SYS(fallocate(fd, 0, 0, 1 << 20));                 /* mode 0 extends */
    struct stat st;
    SYS(fstat(fd, &st));
    CHECK(st.st_size == (1 << 20) && st.st_blocks * 512 >= (1 << 20), "after fallocate: size %ld blocks %ld", (long)st.st_size, (long)st.st_blocks);
    SYS(fallocate(fd, FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20));
    SYS(fstat(fd, &st));
    CHECK(st.st_size == (1 << 20), "KEEP_SIZE changed the size to %ld", (long)st.st_size);
    SYS(pwrite(fd, buf, sizeof buf, 0));
    SYS(fsync(fd));
    SYS(fstat(fd, &st));
    blkcnt_t before = st.st_blocks;
    SYS(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 65536, 262144));
    SYS(fstat(fd, &st));
    CHECK(st.st_size == (1 << 20), "punch hole changed the size");
    CHECK(st.st_blocks < before, "punch hole freed nothing (%ld -> %ld blocks)", (long)before, (long)st.st_blocks);
    CHECK(pread(fd, rd, sizeof rd, 0) == sizeof rd, "read back");
    for (int i = 0; i < (1 << 20); i++) {
        char want = (i >= 65536 && i < 65536 + 262144) ? 0 : 'x';
        CHECK(rd[i] == want, "byte %d is %d after punch hole", i, rd[i]);
    }
    CHECK(lseek(fd, 65536, SEEK_HOLE) == 65536, "punched range is not a hole for SEEK_HOLE");
    SYS(fallocate(fd, FALLOC_FL_ZERO_RANGE, 0, 4096));
    CHECK(pread(fd, rd, 4096, 0) == 4096 && rd[0] == 0 && rd[4095] == 0, "zero range");
    EXPECT_ERR(fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, 4096), EOPNOTSUPP); /* needs KEEP_SIZE */
    close(fd);
    return 0;
}

static int t_copy_file_range(void)
{
    char a[4096], b[4096];
    static char buf[300000], rd[300000];
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (char)(i * 7 + 3);
    SYS(mkdir_test("copy_range", 0755));
    path(a, "copy_range", "src");
    path(b, "copy_range", "dst");
    int in = open(a, O_RDWR | O_CREAT | O_TRUNC, 0644);
    int out = open(b, O_RDWR | O_CREAT | O_TRUNC, 0644);
    SYS(in);
    SYS(out);
    SYS(write_all(in, buf, sizeof buf));
    loff_t off_in = 1000, off_out = 5;
    size_t want = sizeof buf - 1000, done = 0;
    while (done < want) {
        ssize_t n = copy_file_range(in, &off_in, out, &off_out, want - done, 0);
        CHECK(n > 0, "copy_file_range: %zd %s", n, strerror(errno));
        done += (size_t)n;
    }
    CHECK(off_in == (loff_t)sizeof buf && off_out == (loff_t)(5 + want), "offsets %ld %ld", (long)off_in, (long)off_out);
    CHECK(pread(out, rd, sizeof rd, 0) == (ssize_t)(5 + want), "dst size");
    CHECK(!memcmp(rd + 5, buf + 1000, want), "copied bytes differ");
    close(in);
    close(out);
    return 0;
}

static int t_syncfs(void)
{
    char a[4096];
    SYS(mkdir_test("syncfs", 0755));
    path(a, "syncfs", "f");
    int fd = open(a, O_RDWR | O_CREAT, 0644);
    SYS(fd);
    SYS(write_all(fd, "s", 1));
    SYS(syncfs(fd));
    SYS(fdatasync(fd));
    int dfd = open(workdir, O_RDONLY | O_DIRECTORY);
    SYS(dfd);
    SYS(fsync(dfd));                                   /* FSYNCDIR */
    close(dfd);
    close(fd);
    return 0;
}

static int t_tmpfile(void)
{
    char d[4096], a[4096], pp[64], buf[16];
    struct stat st;
    SYS(mkdir_test("tmpfile", 0755));
    path(d, "tmpfile", NULL);
    int fd = open(d, O_TMPFILE | O_RDWR, 0640);
    CHECK(fd >= 0, "open(O_TMPFILE): %s", strerror(errno));
    SYS(write_all(fd, "tmp", 3));
    SYS(fstat(fd, &st));
    CHECK(st.st_nlink == 0 && S_ISREG(st.st_mode) && (st.st_mode & 0777) == 0640, "tmpfile nlink %lu mode %o", st.st_nlink, st.st_mode);
    DIR *dir = opendir(d);
    int n = 0;
    for (struct dirent *e; (e = readdir(dir));)
        n += e->d_name[0] != '.';
    closedir(dir);
    CHECK(n == 0, "O_TMPFILE left a name in the directory");
    path(a, "tmpfile", "linked");
    snprintf(pp, sizeof pp, "/proc/self/fd/%d", fd);
    SYS(linkat(AT_FDCWD, pp, AT_FDCWD, a, AT_SYMLINK_FOLLOW));
    CHECK(get_file(a, buf, sizeof buf) == 3 && !memcmp(buf, "tmp", 3), "linked tmpfile content");
    SYS(fstat(fd, &st));
    CHECK(st.st_nlink == 1, "nlink after linkat %lu", st.st_nlink);
    close(fd);
    fd = open(d, O_TMPFILE | O_RDWR | O_EXCL, 0600);
    SYS(fd);
    EXPECT_ERR(linkat(AT_FDCWD, pp, AT_FDCWD, a, AT_SYMLINK_FOLLOW), EEXIST);
    close(fd);
    return 0;
}

/* --- xattrs and ACLs ---------------------------------------------------------------- */
static int t_xattr(void)
{
    char a[4096], buf[256];
    SYS(mkdir_test("xattr", 0755));
    path(a, "xattr", "f");
    SYS(put_file(a, "x", 0644));
    CHECK(setxattr(a, "user.vhostfs", "value1", 6, 0) == 0, "setxattr: %s", strerror(errno));
    CHECK(getxattr(a, "user.vhostfs", buf, sizeof buf) == 6 && !memcmp(buf, "value1", 6), "getxattr");
    CHECK(getxattr(a, "user.vhostfs", NULL, 0) == 6, "getxattr size query");
    EXPECT_ERR(getxattr(a, "user.vhostfs", buf, 2), ERANGE);
    EXPECT_ERR(setxattr(a, "user.vhostfs", "v", 1, XATTR_CREATE), EEXIST);
    EXPECT_ERR(setxattr(a, "user.nope", "v", 1, XATTR_REPLACE), ENODATA);
    SYS(setxattr(a, "user.second", "", 0, 0));
    ssize_t n = listxattr(a, buf, sizeof buf);
    CHECK(n > 0, "listxattr: %s", strerror(errno));
    int found1 = 0, found2 = 0;
    for (char *p = buf; p < buf + n; p += strlen(p) + 1) {
        found1 |= !strcmp(p, "user.vhostfs");
        found2 |= !strcmp(p, "user.second");
    }
    CHECK(found1 && found2, "listxattr misses names");
    CHECK(listxattr(a, NULL, 0) == n, "listxattr size query");
    SYS(removexattr(a, "user.vhostfs"));
    EXPECT_ERR(getxattr(a, "user.vhostfs", buf, sizeof buf), ENODATA);
    EXPECT_ERR(removexattr(a, "user.vhostfs"), ENODATA);
    /* on a directory and a symlink (user.* not allowed on symlinks) */
    SYS(setxattr(workdir, "user.dirattr", "d", 1, 0));
    CHECK(getxattr(workdir, "user.dirattr", buf, sizeof buf) == 1, "dir xattr");
    SYS(removexattr(workdir, "user.dirattr"));
    char l[4096];
    path(l, "xattr", "l");
    SYS(symlink("f", l));
    EXPECT_ERR(lsetxattr(l, "user.x", "v", 1, 0), EPERM);
    return 0;
}

/* ACL xattr: struct posix_acl_xattr_header {u32 version=2} + entries {u16 tag, u16 perm, u32 id} */
static size_t make_acl(char *buf, int user_perm)
{
    struct { uint16_t tag, perm; uint32_t id; } __attribute__((packed)) e[] = {
        {0x01, 6, 0xFFFFFFFF},          /* ACL_USER_OBJ rw- */
        {0x02, (uint16_t)user_perm, USER_UID}, /* ACL_USER 1000 */
        {0x04, 0, 0xFFFFFFFF},          /* ACL_GROUP_OBJ --- */
        {0x10, (uint16_t)user_perm, 0xFFFFFFFF}, /* ACL_MASK */
        {0x20, 0, 0xFFFFFFFF},          /* ACL_OTHER --- */
    };
    uint32_t version = 2;
    memcpy(buf, &version, 4);
    memcpy(buf + 4, e, sizeof e);
    return 4 + sizeof e;
}

static int user_acl_read(void *arg)
{
    char buf[16];
    (void)arg;
    CHECK(get_file(g_p1, buf, sizeof buf) == 3, "read granted by ACL: %s", strerror(errno));
    EXPECT_ERR(open(g_p1, O_WRONLY), EACCES);
    return 0;
}

static int user_acl_denied(void *arg)
{
    (void)arg;
    EXPECT_ERR(open(g_p1, O_RDONLY), EACCES);
    return 0;
}

static int t_posix_acl(void)
{
    if (!is_root)
        SKIP("sets up a root-owned file");
    char acl[64], back[64];
    struct stat st;
    SYS(mkdir_test("acl", 0755));
    path(g_p1, "acl", "f");
    SYS(put_file(g_p1, "acl", 0600));
    if (as_user(0, user_acl_denied, NULL))
        return 1;
    size_t n = make_acl(acl, 4);
    CHECK(setxattr(g_p1, "system.posix_acl_access", acl, n, 0) == 0, "set ACL: %s", strerror(errno));
    SYS(stat(g_p1, &st));
    CHECK((st.st_mode & 0777) == 0640, "mode after ACL %o (group bits = mask)", st.st_mode & 0777);
    ssize_t m = getxattr(g_p1, "system.posix_acl_access", back, sizeof back);
    CHECK(m == (ssize_t)n && !memcmp(back, acl, n), "ACL read back (%zd bytes)", m);
    if (as_user(0, user_acl_read, NULL))
        return 1;
    /* default ACL on a directory is inherited */
    char d[4096], f[4096];
    path(d, "acl", "dir");
    SYS(mkdir(d, 0755));
    CHECK(setxattr(d, "system.posix_acl_default", acl, n, 0) == 0, "set default ACL: %s", strerror(errno));
    path(f, "acl", "dir/inherits");
    SYS(put_file(f, "i", 0666));
    m = getxattr(f, "system.posix_acl_access", back, sizeof back);
    CHECK(m == (ssize_t)n, "default ACL not inherited (%zd: %s)", m, strerror(errno));
    SYS(removexattr(g_p1, "system.posix_acl_access"));
    return as_user(0, user_acl_denied, NULL);
}

/* --- locks, mmap, append ------------------------------------------------------------- */
static int wait_child(pid_t pid)
{
    int st;
    if (waitpid(pid, &st, 0) < 0)
        return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static int t_flock(void)
{
    char a[4096];
    SYS(mkdir_test("flock", 0755));
    path(a, "flock", "f");
    SYS(put_file(a, "f", 0666));
    int fd = open(a, O_RDWR);
    SYS(fd);
    SYS(flock(fd, LOCK_EX));
    pid_t pid = fork();
    if (pid == 0) {
        int cfd = open(a, O_RDWR);
        if (cfd < 0) _exit(10);
        if (flock(cfd, LOCK_SH | LOCK_NB) == 0 || errno != EWOULDBLOCK) _exit(11);
        double t0 = now();
        if (flock(cfd, LOCK_EX) < 0) _exit(12);          /* waits for the parent */
        if (now() - t0 < 0.3) _exit(13);
        _exit(0);
    }
    usleep(600000);
    SYS(flock(fd, LOCK_UN));
    int rc = wait_child(pid);
    CHECK(rc == 0, "second process: exit %d (10 open, 11 not refused, 12 wait failed, 13 did not wait)", rc);
    /* a second open file of the same process conflicts too; a dup does not */
    int fd2 = open(a, O_RDWR);
    SYS(fd2);
    SYS(flock(fd, LOCK_EX));
    EXPECT_ERR(flock(fd2, LOCK_EX | LOCK_NB), EWOULDBLOCK);
    int dup1 = dup(fd);
    SYS(flock(dup1, LOCK_EX | LOCK_NB));
    close(dup1);
    close(fd);                                       /* last reference: released */
    SYS(flock(fd2, LOCK_EX | LOCK_NB));
    close(fd2);
    return 0;
}

static int t_fcntl_locks(void)
{
    char a[4096];
    SYS(mkdir_test("fcntl_locks", 0755));
    path(a, "fcntl_locks", "f");
    SYS(put_file(a, "0123456789", 0666));
    int fd = open(a, O_RDWR);
    SYS(fd);
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 100};
    SYS(fcntl(fd, F_SETLK, &fl));
    pid_t parent = getpid();
    int pfd[2];
    SYS(pipe(pfd));
    pid_t pid = fork();
    if (pid == 0) {
        close(pfd[1]);
        int cfd = open(a, O_RDWR);
        if (cfd < 0) _exit(10);
        struct flock c = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 50, .l_len = 10};
        if (fcntl(cfd, F_SETLK, &c) == 0 || (errno != EAGAIN && errno != EACCES)) _exit(11);
        struct flock g = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 10, .l_len = 0};
        if (fcntl(cfd, F_GETLK, &g) < 0) _exit(12);
        if (g.l_type != F_WRLCK || g.l_start != 0 || g.l_len != 100) _exit(13);
        if (g.l_pid != parent) _exit(14);
        struct flock free_range = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 100, .l_len = 10};
        if (fcntl(cfd, F_SETLK, &free_range) < 0) _exit(15);   /* disjoint range */
        char go;
        if (read(pfd[0], &go, 1) != 1) _exit(16);
        double t0 = now();
        if (fcntl(cfd, F_SETLKW, &c) < 0) _exit(17);           /* waits for the parent's close */
        if (now() - t0 < 0.3) _exit(18);
        _exit(0);
    }
    close(pfd[0]);
    SYS(write(pfd[1], "g", 1));
    usleep(600000);
    /* the child's disjoint lock is held: the parent conflicts with it */
    struct flock g = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 100, .l_len = 1};
    SYS(fcntl(fd, F_GETLK, &g));
    int child_lock_seen = g.l_type == F_WRLCK && g.l_pid == pid;
    close(fd);                                        /* releases the parent's locks */
    int rc = wait_child(pid);
    close(pfd[1]);
    CHECK(rc == 0, "second process: exit %d (11 not refused, 13 bad GETLK range, 14 bad l_pid, 17/18 SETLKW)", rc);
    CHECK(child_lock_seen, "parent's F_GETLK did not see the child's lock (type %d pid %d)", g.l_type, g.l_pid);
    return 0;
}

/* POSIX fcntl(2): "If a deadlock is detected, EDEADLK".  Two processes: A holds [0,10),
 * B holds [10,20); A asks for B's range with F_SETLKW, then (0.5 s later) B asks for A's.
 * B's request closes the cycle and must fail with EDEADLK (A's, should the TCG guest
 * deliver it late); that side backs off (unlocks its range) and the other side must then
 * be granted.  After 30 s the driver reports a hang: neither a signal nor SIGKILL ends a
 * SETLKW the guest has sent (virtio-fs sends no FUSE_INTERRUPT and a sent request is
 * waited out), so the stuck processes are killed but not waited for. */
static int deadlock_side(const char *p, off_t mine, off_t theirs, int up, int down)
{
    int fd = open(p, O_RDWR);
    if (fd < 0)
        return 10;
    struct flock m = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = mine, .l_len = 10};
    if (fcntl(fd, F_SETLK, &m) < 0)
        return 11;
    char go;
    if (write(up, "h", 1) != 1 || read(down, &go, 1) != 1)
        return 12;
    struct flock w = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = theirs, .l_len = 10};
    if (fcntl(fd, F_SETLKW, &w) == 0)
        return 0;                                /* granted (exit releases it) */
    if (errno != EDEADLK)
        return 2;
    m.l_type = F_UNLCK;                          /* back off: the other side goes on */
    return fcntl(fd, F_SETLK, &m) == 0 ? 1 : 3;
}

static int t_fcntl_deadlock(void)
{
    char a[4096];
    SYS(mkdir_test("fcntl_deadlock", 0755));
    path(a, "fcntl_deadlock", "f");
    SYS(put_file(a, "01234567890123456789", 0666));
    int up[2], down[2][2];
    SYS(pipe(up));
    SYS(pipe(down[0]));
    SYS(pipe(down[1]));
    pid_t pid[2];
    for (int i = 0; i < 2; i++) {
        pid[i] = fork();
        SYS(pid[i]);
        if (pid[i] == 0)
            _exit(deadlock_side(a, i ? 10 : 0, i ? 0 : 10, up[1], down[i][0]));
    }
    close(up[1]);                                /* a child's early exit ends the wait */
    char h[2];
    struct pollfd pf = {.fd = up[0], .events = POLLIN};
    int ready = poll(&pf, 1, 30000) == 1 && read(up[0], h, 1) == 1
             && poll(&pf, 1, 30000) == 1 && read(up[0], h + 1, 1) == 1;
    if (ready && write(down[0][1], "g", 1) == 1) {
        usleep(500000);                          /* A is waiting by now */
        ready = write(down[1][1], "g", 1) == 1;
    }
    int rc[2] = {-1, -1}, left = 2;
    double deadline = now() + 30;
    while (left && now() < deadline) {
        for (int i = 0; i < 2; i++) {
            int st;
            if (rc[i] == -1 && waitpid(pid[i], &st, WNOHANG) == pid[i]) {
                rc[i] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
                left--;
            }
        }
        usleep(20000);
    }
    for (int i = 0; i < 2; i++)
        if (rc[i] == -1)
            kill(pid[i], SIGKILL);   /* not reaped: a sent FUSE request is waited out */
    close(up[0]);
    for (int i = 0; i < 2; i++) {
        close(down[i][0]);
        close(down[i][1]);
    }
    CHECK(ready, "the two processes did not take their first locks (exit %d, %d)", rc[0], rc[1]);
    CHECK((rc[0] == 0 && rc[1] == 1) || (rc[0] == 1 && rc[1] == 0),
          "A exit %d, B exit %d (0 granted, 1 EDEADLK, 2 other error, 3 unlock failed, "
          "-1 still waiting after 30 s, 10 open, 11 first lock, 12 pipe)", rc[0], rc[1]);
    return 0;
}

/* Holds a POSIX write lock on [0,10) and a flock until killed (host checks them). */
static int hold_locks(const char *p)
{
    int fd = open(p, O_RDWR | O_CREAT, 0666);
    if (fd < 0)
        return 1;
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 10};
    if (fcntl(fd, F_SETLK, &fl) < 0)
        return 2;
    int fd2 = open(p, O_RDONLY);
    if (fd2 < 0 || flock(fd2, LOCK_EX) < 0)
        return 3;
    printf("holding\n");
    fflush(stdout);
    pause();
    return 0;
}

static int t_mmap_shared(void)
{
    char a[4096], buf[64];
    SYS(mkdir_test("mmap", 0755));
    path(a, "mmap", "f");
    int fd = open(a, O_RDWR | O_CREAT | O_TRUNC, 0644);
    SYS(fd);
    SYS(ftruncate(fd, 8192));
    char *m = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(m != MAP_FAILED, "mmap shared: %s", strerror(errno));
    memcpy(m + 4000, "through the map", 15);
    SYS(msync(m, 8192, MS_SYNC));
    int fd2 = open(a, O_RDONLY);
    SYS(fd2);
    CHECK(pread(fd2, buf, 15, 4000) == 15 && !memcmp(buf, "through the map", 15), "read() does not see the mmap write");
    SYS(pwrite(fd, "by write", 8, 100));
    CHECK(!memcmp(m + 100, "by write", 8), "the map does not see write()");
    munmap(m, 8192);
    close(fd2);
    close(fd);
    return 0;
}

static int t_append_two_writers(void)
{
    char a[4096];
    enum { N = 400, REC = 16 };
    SYS(mkdir_test("append", 0755));
    path(a, "append", "log");
    SYS(put_file(a, "", 0666));
    pid_t kids[2];
    for (int k = 0; k < 2; k++) {
        kids[k] = fork();
        if (kids[k] == 0) {
            int fd = open(a, O_WRONLY | O_APPEND);
            if (fd < 0) _exit(1);
            char rec[REC + 1];
            for (int i = 0; i < N; i++) {
                snprintf(rec, sizeof rec, "%c%014d\n", 'A' + k, i);
                if (write(fd, rec, REC) != REC) _exit(2);
            }
            close(fd);
            _exit(0);
        }
    }
    for (int k = 0; k < 2; k++)
        CHECK(wait_child(kids[k]) == 0, "writer %d failed", k);
    struct stat st;
    SYS(stat(a, &st));
    CHECK(st.st_size == 2 * N * REC, "size %ld, want %d: appends overwrote each other", (long)st.st_size, 2 * N * REC);
    static char all[2 * N * REC];
    int fd = open(a, O_RDONLY);
    SYS(fd);
    CHECK(read(fd, all, sizeof all) == (ssize_t)sizeof all, "read back");
    close(fd);
    int next[2] = {0, 0};
    for (int r = 0; r < 2 * N; r++) {
        char *rec = all + r * REC;
        int k = rec[0] - 'A';
        CHECK((k == 0 || k == 1) && rec[REC - 1] == '\n', "record %d torn", r);
        CHECK(atoi(rec + 1) == next[k], "writer %d: record %d out of order", k, next[k]);
        next[k]++;
    }
    return 0;
}

static int readdir_entries = 10000;   /* --entries N (at most 10000) */

static int t_readdir_10000(void)
{
    enum { MAXN = 10000 };
    const int N = readdir_entries;
    char d[4096], p[4096];
    path(d, "readdir10k", NULL);
    /* The host may have prepared the entries (creating 10,000 files through a TCG guest
     * takes minutes; listing them is what is tested).  Otherwise the guest creates them. */
    int prepared = mkdir(d, 0755) < 0 && errno == EEXIST;
    int dfd = open(d, O_RDONLY | O_DIRECTORY);
    SYS(dfd);
    for (int i = 0; !prepared && i < N; i++) {
        snprintf(p, sizeof p, "entry-%05d", i);
        int fd = openat(dfd, p, O_WRONLY | O_CREAT | O_EXCL, 0644);
        SYS(fd);
        close(fd);
    }
    close(dfd);
    /* drop the guest's caches so the listing comes from the backend */
    int dc = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (dc >= 0) {
        sync();
        if (write(dc, "3", 1) < 0) { /* not root: fine */ }
        close(dc);
    }
    static unsigned char seen[MAXN];
    memset(seen, 0, sizeof seen);
    DIR *dir = opendir(d);
    CHECK(dir, "opendir: %s", strerror(errno));
    int count = 0, dots = 0;
    struct dirent *e;
    errno = 0;
    while ((e = readdir(dir))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) {
            dots++;
            continue;
        }
        int i;
        CHECK(sscanf(e->d_name, "entry-%05d", &i) == 1 && i >= 0 && i < N, "unexpected name %s", e->d_name);
        CHECK(!seen[i], "%s listed twice", e->d_name);
        CHECK(e->d_type == DT_REG, "%s d_type %d", e->d_name, e->d_type);
        seen[i] = 1;
        count++;
    }
    CHECK(errno == 0, "readdir: %s", strerror(errno));
    closedir(dir);
    CHECK(count == N && dots == 2, "listed %d entries and %d dots, want %d and 2", count, dots, N);
    /* every entry's attributes came with it: stat all (served from the entry cache) */
    struct stat st;
    snprintf(p, sizeof p, "%s/entry-%05d", d, N - 1);
    SYS(stat(p, &st));
    return 0;
}

/* --- setuid / setgid clearing (KILLPRIV) ---------------------------------------------- */
static int user_write_kills(void *arg)
{
    (void)arg;
    struct stat st;
    int fd = open(g_p1, O_WRONLY);
    SYS(fd);
    SYS(write_all(fd, "w", 1));
    close(fd);
    SYS(stat(g_p1, &st));
    CHECK(!(st.st_mode & (S_ISUID | S_ISGID)), "write by the owner kept %o", st.st_mode & 07777);
    SYS(truncate(g_p2, 1));
    SYS(stat(g_p2, &st));
    CHECK(!(st.st_mode & S_ISUID), "truncate kept the setuid bit (%o)", st.st_mode & 07777);
    fd = open(g_p3, O_WRONLY);
    SYS(fd);
    SYS(write_all(fd, "w", 1));
    close(fd);
    SYS(stat(g_p3, &st));
    CHECK(st.st_mode & S_ISGID, "setgid without group-exec was cleared (%o)", st.st_mode & 07777);
    return 0;
}

static int t_suid_clear(void)
{
    if (!is_root)
        SKIP("needs files of another owner and chown");
    struct stat st;
    char c[4096];
    SYS(mkdir_test("suid", 0777));
    path(g_p1, "suid", "write");
    path(g_p2, "suid", "trunc");
    path(g_p3, "suid", "sgid_noexec");
    SYS(put_file(g_p1, "x", 0644));
    SYS(put_file(g_p2, "xy", 0644));
    SYS(put_file(g_p3, "x", 0644));
    SYS(chown(g_p1, USER_UID, USER_GID));
    SYS(chown(g_p2, USER_UID, USER_GID));
    SYS(chown(g_p3, USER_UID, USER_GID));
    SYS(chmod(g_p1, 06755));
    SYS(chmod(g_p2, 04755));
    SYS(chmod(g_p3, 02644));
    if (as_user(0, user_write_kills, NULL))
        return 1;
    /* chown clears setuid/setgid (group-exec) even for root */
    path(c, "suid", "chown");
    SYS(put_file(c, "x", 0644));
    SYS(chmod(c, 06755));
    SYS(chown(c, USER_UID, USER_GID));
    SYS(stat(c, &st));
    CHECK(!(st.st_mode & (S_ISUID | S_ISGID)), "chown kept %o", st.st_mode & 07777);
    /* root (CAP_FSETID) writing keeps them */
    SYS(chmod(c, 06755));
    int fd = open(c, O_WRONLY);
    SYS(fd);
    SYS(write_all(fd, "r", 1));
    close(fd);
    SYS(stat(c, &st));
    CHECK((st.st_mode & 07777) == 06755, "root's write cleared bits: %o", st.st_mode & 07777);
    return 0;
}

/* --- special files, submounts, ioctl, poll -------------------------------------------- */
static int t_mknod(void)
{
    char f[4096], s[4096], dv[4096];
    struct stat st;
    SYS(mkdir_test("mknod", 0755));
    path(f, "mknod", "fifo");
    SYS(mknod(f, S_IFIFO | 0644, 0));
    SYS(lstat(f, &st));
    CHECK(S_ISFIFO(st.st_mode), "fifo type");
    pid_t pid = fork();
    if (pid == 0) {
        int w = open(f, O_WRONLY);
        if (w < 0 || write(w, "pipe", 4) != 4) _exit(1);
        _exit(0);
    }
    char buf[8] = {0};
    int r = open(f, O_RDONLY);
    SYS(r);
    CHECK(read(r, buf, 4) == 4 && !memcmp(buf, "pipe", 4), "data through the fifo");
    close(r);
    CHECK(wait_child(pid) == 0, "fifo writer");
    path(s, "mknod", "sock");
    SYS(mknod(s, S_IFSOCK | 0644, 0));
    SYS(lstat(s, &st));
    CHECK(S_ISSOCK(st.st_mode), "socket type");
    if (!is_root)
        return 0;
    path(dv, "mknod", "null");
    CHECK(mknod(dv, S_IFCHR | 0666, makedev(1, 3)) == 0, "mknod char device: %s", strerror(errno));
    SYS(lstat(dv, &st));
    CHECK(S_ISCHR(st.st_mode) && major(st.st_rdev) == 1 && minor(st.st_rdev) == 3, "device %u:%u", major(st.st_rdev), minor(st.st_rdev));
    int fd = open(dv, O_WRONLY);
    CHECK(fd >= 0 && write(fd, "gone", 4) == 4, "write to the guest's /dev/null node");
    close(fd);
    path(dv, "mknod", "blk");
    CHECK(mknod(dv, S_IFBLK | 0600, makedev(7, 200)) == 0, "mknod block device: %s", strerror(errno));
    return 0;
}

static int t_submount(void)
{
    char sub[4096], f[4096];
    struct stat top, st, fst;
    /* "submount/." : stat(2) does not trigger the automount of a final component */
    snprintf(sub, sizeof sub, "%s/../submount/.", workdir);
    if (stat(sub, &st) < 0)
        SKIP("no submount prepared by the host");
    SYS(stat(workdir, &top));
    CHECK(S_ISDIR(st.st_mode), "submount is not a directory");
    CHECK(st.st_dev != top.st_dev, "submount has the same st_dev (%lx) as its parent", (unsigned long)st.st_dev);
    snprintf(f, sizeof f, "%s/../submount/marker", workdir);
    SYS(stat(f, &fst));
    CHECK(fst.st_dev == st.st_dev, "file in the submount has st_dev %lx, its root %lx", (unsigned long)fst.st_dev, (unsigned long)st.st_dev);
    char buf[64];
    CHECK(get_file(f, buf, sizeof buf) > 0 && !strncmp(buf, "submount", 8), "submount marker content");
    return 0;
}

static int t_ioctl_flags(void)
{
    char a[4096];
    SYS(mkdir_test("ioctl", 0755));
    path(a, "ioctl", "f");
    SYS(put_file(a, "i", 0644));
    int fd = open(a, O_RDONLY);
    SYS(fd);
    int flags = -1;
    CHECK(ioctl(fd, FS_IOC_GETFLAGS, &flags) == 0, "FS_IOC_GETFLAGS: %s", strerror(errno));
    int set = flags | FS_NOATIME_FL;
    CHECK(ioctl(fd, FS_IOC_SETFLAGS, &set) == 0, "FS_IOC_SETFLAGS(NOATIME): %s", strerror(errno));
    int back = 0;
    SYS(ioctl(fd, FS_IOC_GETFLAGS, &back));
    CHECK(back & FS_NOATIME_FL, "NOATIME flag did not stick (%x)", back);
    set = back & ~FS_NOATIME_FL;
    SYS(ioctl(fd, FS_IOC_SETFLAGS, &set));
    struct termios tio;
    EXPECT_ERR(ioctl(fd, TCGETS, &tio), ENOTTY);
    close(fd);
    return 0;
}

static int t_poll(void)
{
    char a[4096];
    SYS(mkdir_test("poll", 0755));
    path(a, "poll", "f");
    SYS(put_file(a, "p", 0644));
    int fd = open(a, O_RDWR);
    SYS(fd);
    struct pollfd p = {.fd = fd, .events = POLLIN | POLLOUT};
    CHECK(poll(&p, 1, 1000) == 1 && (p.revents & (POLLIN | POLLOUT)) == (POLLIN | POLLOUT), "poll revents %x", p.revents);
    close(fd);
    return 0;
}

/* --- escapes ---------------------------------------------------------------------- */
/* Whatever the path, reading it must never yield the host's escape token. */
static int reads_token(const char *p)
{
    char buf[256];
    ssize_t n = get_file(p, buf, sizeof buf);
    return n > 0 && escape_token[0] && strstr(buf, escape_token) != NULL;
}

static int t_escape(void)
{
    char p[4096], l[4096], buf[4096];
    SYS(mkdir_test("escape", 0777));
    /* the host put outside-secret beside the share and a symlink to it in the share */
    const char *tries[] = {
        "/../outside-secret", "/../../outside-secret", "/escape/../../outside-secret",
        "/host-abs-link", "/host-rel-link", "/host-abs-link-dir/outside-secret",
    };
    char root[4096];
    snprintf(root, sizeof root, "%s/..", workdir);
    for (size_t i = 0; i < sizeof tries / sizeof *tries; i++) {
        snprintf(p, sizeof p, "%s%s", root, tries[i]);
        CHECK(!reads_token(p), "reached the host file through %s", tries[i]);
    }
    /* guest-made symlinks are resolved by the guest, in the guest */
    const char *targets[] = {"/etc", "../../outside-secret", "/proc/self/root/../outside-secret",
                             "/proc/1/cwd/../outside-secret", "/proc/self/fd/0"};
    for (size_t i = 0; i < sizeof targets / sizeof *targets; i++) {
        snprintf(l, sizeof l, "%s/escape/sym%zu", workdir, i);
        SYS(symlink(targets[i], l));
        CHECK(readlink(l, buf, sizeof buf) == (ssize_t)strlen(targets[i]), "readlink");
        CHECK(!reads_token(l), "reached the host file through a symlink to %s", targets[i]);
        snprintf(p, sizeof p, "%s/escape/sym%zu/outside-secret", workdir, i);
        CHECK(!reads_token(p), "reached the host file below a symlink to %s", targets[i]);
    }
    /* the share's root has no parent the guest can see */
    struct stat a, b;
    snprintf(p, sizeof p, "%s/..", root);
    SYS(stat(p, &a));
    SYS(stat("/", &b));
    CHECK(a.st_dev == b.st_dev && a.st_ino == b.st_ino, "'..' of the mount is not the guest's /");
    /* rename and link out of the share cross a mount: EXDEV */
    char f[4096];
    path(f, "escape", "f");
    SYS(put_file(f, "f", 0644));
    EXPECT_ERR(rename(f, "/tmp/escaped"), EXDEV);
    EXPECT_ERR(link(f, "/tmp/escaped"), EXDEV);
    EXPECT_ERR(renameat2(AT_FDCWD, f, AT_FDCWD, "/tmp/escaped", RENAME_NOREPLACE), EXDEV);
    /* a writable open of the host-made symlink must not create or modify anything outside */
    snprintf(p, sizeof p, "%s/host-abs-link", root);
    int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
        /* the guest created the target in its own namespace (e.g. /tmp/...): fine, as long
         * as the host file is untouched (checked by the host) */
        if (write(fd, "GUEST", 5) < 0) { }
        close(fd);
    }
    return 0;
}

/* --- driver ----------------------------------------------------------------------- */
struct test { const char *name; int (*fn)(void); };
static const struct test TESTS[] = {
    {"perm_eacces", t_perm_eacces},
    {"perm_eperm", t_perm_eperm},
    {"owner", t_owner},
    {"sgid_dir", t_sgid_dir},
    {"supp_groups", t_supp_groups},
    {"rename_noreplace", t_rename_noreplace},
    {"rename_exchange", t_rename_exchange},
    {"rename_dirs", t_rename_dirs},
    {"rename_cross_dir", t_rename_cross_dir},
    {"link_counts", t_link_counts},
    {"unlink_open", t_unlink_open},
    {"timestamps", t_timestamps},
    {"sparse_seek", t_sparse_seek},
    {"fallocate", t_fallocate},
    {"copy_file_range", t_copy_file_range},
    {"syncfs", t_syncfs},
    {"tmpfile", t_tmpfile},
    {"xattr", t_xattr},
    {"posix_acl", t_posix_acl},
    {"flock", t_flock},
    {"fcntl_locks", t_fcntl_locks},
    {"fcntl_deadlock", t_fcntl_deadlock},
    {"mmap_shared", t_mmap_shared},
    {"append_two_writers", t_append_two_writers},
    {"readdir_10000", t_readdir_10000},
    {"suid_clear", t_suid_clear},
    {"mknod", t_mknod},
    {"submount", t_submount},
    {"ioctl_flags", t_ioctl_flags},
    {"poll", t_poll},
    {"escape", t_escape},
};

static int wanted(const char *name, int argc, char **argv, int first)
{
    if (first >= argc)
        return 1;
    for (int i = first; i < argc; i++)
        if (!strcmp(argv[i], name))
            return 1;
    return 0;
}

int main(int argc, char **argv)
{
    int i = 1;
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    if (i + 1 < argc && !strcmp(argv[i], "--hold-locks"))
        return hold_locks(argv[i + 1]);
    if (i < argc && !strcmp(argv[i], "--list")) {
        for (size_t t = 0; t < sizeof TESTS / sizeof *TESTS; t++)
            printf("%s\n", TESTS[t].name);
        return 0;
    }
    const char *user = NULL;
    while (i < argc && argv[i][0] == '-') {
        if (!strcmp(argv[i], "--user") && i + 1 < argc) {
            user = argv[i + 1];
            i += 2;
        } else if (!strcmp(argv[i], "--entries") && i + 1 < argc) {
            readdir_entries = atoi(argv[i + 1]);
            if (readdir_entries < 1 || readdir_entries > 10000)
                readdir_entries = 10000;
            i += 2;
        } else if (!strcmp(argv[i], "--escape-token") && i + 1 < argc) {
            escape_token = argv[i + 1];
            i += 2;
        } else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 64;
        }
    }
    if (i >= argc) {
        fprintf(stderr, "usage: %s [--user UID:GID[:SUPP]] [--entries N] [--escape-token T] WORKDIR [TEST...]\n", argv[0]);
        return 64;
    }
    workdir = argv[i++];
    if (user) {
        unsigned uid, gid, supp;
        int n = sscanf(user, "%u:%u:%u", &uid, &gid, &supp);
        gid_t g = supp;
        if (n < 2 || drop_to(uid, gid, n == 3 ? 1 : 0, &g) < 0) {
            fprintf(stderr, "--user %s: %s\n", user, strerror(errno));
            return 64;
        }
    }
    is_root = geteuid() == 0;
    umask(022);
    int failed = 0;
    for (size_t t = 0; t < sizeof TESTS / sizeof *TESTS; t++) {
        if (!wanted(TESTS[t].name, argc, argv, i))
            continue;
        failbuf[0] = 0;
        umask(022);
        double t0 = now();
        int r = TESTS[t].fn();
        double dt = now() - t0;
        if (r == 0)
            printf("ok %s (%.2fs)\n", TESTS[t].name, dt);
        else if (r == 2)
            printf("skip %s: %s\n", TESTS[t].name, failbuf);
        else {
            printf("not ok %s: %s\n", TESTS[t].name, failbuf);
            failed++;
        }
    }
    return failed ? 1 : 0;
}
