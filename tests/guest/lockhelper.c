/*
 * lockhelper: fcntl(F_SETLKW) and flock(LOCK_EX) waits for the concurrency guest tests.
 * Built at test time with `gcc -static` (the guest has busybox only), never committed
 * as a binary.
 *
 *   lockhelper hold  MODE FILE READY RELEASE
 *       take the lock (MODE: fcntl = write lock on bytes 0..99, flock = LOCK_EX), create
 *       READY, wait until RELEASE exists, unlock explicitly (so the unlock is a request
 *       of its own, queued behind the waiters), exit 0.
 *   lockhelper wait  MODE FILE ID INSIDE LOG
 *       block until the lock is granted, then prove exclusivity: create INSIDE with
 *       O_EXCL (fails if another holder is inside), hold 20 ms, remove it, append
 *       "got ID" to LOG, unlock, exit 0.
 *
 * Exit status: 0 ok, 2 usage, 3 open, 4 lock, 5 two holders at once, 6 other I/O.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void nap_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

static int lock(int fd, const char *mode, int type, int wait)
{
    if (strcmp(mode, "flock") == 0) {
        int op = type == F_UNLCK ? LOCK_UN : LOCK_EX;
        return flock(fd, op | (wait ? 0 : LOCK_NB));
    }
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = 0;
    fl.l_len = 100;
    int r;
    do {
        r = fcntl(fd, wait ? F_SETLKW : F_SETLK, &fl);
    } while (r == -1 && errno == EINTR);
    return r;
}

static int exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

int main(int argc, char **argv)
{
    if (argc < 5)
        return 2;
    const char *what = argv[1], *mode = argv[2], *file = argv[3];
    if (strcmp(mode, "fcntl") && strcmp(mode, "flock"))
        return 2;
    int fd = open(file, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        perror("open");
        return 3;
    }
    if (strcmp(what, "hold") == 0 && argc == 6) {
        if (lock(fd, mode, F_WRLCK, 1)) {
            perror("lock");
            return 4;
        }
        int r = open(argv[4], O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (r < 0)
            return 6;
        close(r);
        while (!exists(argv[5]))
            nap_ms(10);
        if (lock(fd, mode, F_UNLCK, 0)) {
            perror("unlock");
            return 4;
        }
        close(fd);
        return 0;
    }
    if (strcmp(what, "wait") == 0 && argc == 7) {
        if (lock(fd, mode, F_WRLCK, 1)) {
            perror("lock");
            return 4;
        }
        int in = open(argv[5], O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (in < 0) {
            fprintf(stderr, "waiter %s: another holder is inside\n", argv[4]);
            return 5;
        }
        close(in);
        nap_ms(20);
        if (unlink(argv[5]))
            return 6;
        int log = open(argv[6], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (log < 0)
            return 6;
        char line[64];
        int n = snprintf(line, sizeof line, "got %s\n", argv[4]);
        if (write(log, line, n) != n)
            return 6;
        close(log);
        if (lock(fd, mode, F_UNLCK, 0)) {
            perror("unlock");
            return 4;
        }
        close(fd);
        return 0;
    }
    return 2;
}
