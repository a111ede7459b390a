/* Guest-side load for tests/guest/test_migration.py (built with gcc -static).
 *
 *   mighelper DIR
 *
 * chdir(DIR) (the cwd the guest holds across the migration), opens data.bin (the open
 * file) and maps mapped.bin MAP_SHARED (the mmap), keeps held.bin open without using
 * it (the test may delete it on the host), then loops until the file "stop"
 * appears in the cwd (looked up relative to the cwd):
 *   - pwrite block i of data.bin (BLK bytes, pattern(i, 0));
 *   - write page i % MAPPAGES of the mapping (pattern(i, 1)), msync every 8 iterations;
 *   - read 128 KiB of src.bin at a rotating offset after POSIX_FADV_DONTNEED, so that
 *     vhostfs keeps writing read replies into guest memory, and list the cwd (readdir);
 *   - O_DIRECT-read 64 KiB of src.bin into the next slot of a 4 MiB buffer: FUSE hands
 *     the buffer's own pages to vhostfs, which writes them, and the guest CPU never
 *     touches them again until the end.  Such a page, written by vhostfs after QEMU
 *     copied it and not marked in the dirty log, is stale after migration: nothing
 *     else would make QEMU send it again;
 *   - after READY_AT iterations create "ready".
 * Then msync + fsync, read data.bin back through the same descriptor and compare, hash
 * src.bin through its descriptor, compare every O_DIRECT slot with what it last read
 * (dbad: slots whose content is not what vhostfs wrote there), and print
 * "RESULT n=N bad=B dbad=D src=HASH cwd=PATH".
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define BLK 4096
#define MAPPAGES 16
#define READY_AT 20
#define CHUNK (128 * 1024)
#define DSLOT (64 * 1024)
#define DSLOTS 64

static void pattern(uint64_t i, uint64_t kind, unsigned char *buf) {
    uint64_t *w = (uint64_t *)buf;
    for (uint64_t j = 0; j < BLK / 8; j++)
        w[j] = (i << 32) ^ (kind << 63) ^ (j * 0x9E3779B97F4A7C15ull);
}

static void die(const char *what) { perror(what); exit(2); }

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: mighelper DIR\n"); return 2; }
    if (chdir(argv[1])) die("chdir");
    int fd = open("data.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) die("open data.bin");
    int mfd = open("mapped.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (mfd < 0) die("open mapped.bin");
    if (ftruncate(mfd, MAPPAGES * BLK)) die("ftruncate");
    unsigned char *map = mmap(NULL, MAPPAGES * BLK, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (map == MAP_FAILED) die("mmap");
    close(mfd);                         /* the mapping alone keeps the file open */
    int held = open("held.bin", O_RDWR | O_CREAT, 0644);
    if (held < 0) die("open held.bin");
    int sfd = open("src.bin", O_RDONLY);
    if (sfd < 0) die("open src.bin");
    struct stat sst;
    if (fstat(sfd, &sst)) die("fstat src.bin");
    static unsigned char buf[BLK], rbuf[CHUNK];
    int dfd = open("src.bin", O_RDONLY | O_DIRECT);
    if (dfd < 0) die("open src.bin O_DIRECT");
    unsigned char *dbuf;
    if (posix_memalign((void **)&dbuf, 4096, DSLOT * DSLOTS)) die("posix_memalign");
    memset(dbuf, 0, DSLOT * DSLOTS);
    static off_t dsrc[DSLOTS];
    for (int k = 0; k < DSLOTS; k++) dsrc[k] = -1;
    uint64_t i = 0;
    off_t roff = 0;
    for (;; i++) {
        pattern(i, 0, buf);
        if (pwrite(fd, buf, BLK, (off_t)i * BLK) != BLK) die("pwrite");
        pattern(i, 1, map + (i % MAPPAGES) * BLK);
        if (i % 8 == 7 && msync(map, MAPPAGES * BLK, MS_SYNC)) die("msync");
        posix_fadvise(sfd, 0, 0, POSIX_FADV_DONTNEED);
        if (pread(sfd, rbuf, CHUNK, roff) < 0) die("pread src");
        roff = (roff + CHUNK) % (sst.st_size - CHUNK);
        int slot = i % DSLOTS;
        off_t doff = ((off_t)(i * 7) * DSLOT) % (sst.st_size - DSLOT);
        doff -= doff % 4096;
        if (pread(dfd, dbuf + (size_t)slot * DSLOT, DSLOT, doff) != DSLOT) die("O_DIRECT pread");
        dsrc[slot] = doff;
        DIR *d = opendir(".");
        if (!d) die("opendir");
        while (readdir(d)) {}
        closedir(d);
        if (i == READY_AT) {
            int r = open("ready", O_WRONLY | O_CREAT, 0644);
            if (r < 0) die("create ready");
            close(r);
        }
        if (i > READY_AT && access("stop", F_OK) == 0) { i++; break; }
    }
    if (msync(map, MAPPAGES * BLK, MS_SYNC)) die("final msync");
    if (fsync(fd)) die("fsync");
    uint64_t bad = 0;
    for (uint64_t k = 0; k < i; k++) {
        if (pread(fd, rbuf, BLK, (off_t)k * BLK) != BLK) die("read back");
        pattern(k, 0, buf);
        if (memcmp(rbuf, buf, BLK)) bad++;
    }
    uint64_t dbad = 0;
    for (int k = 0; k < DSLOTS; k++) {
        if (dsrc[k] < 0) continue;
        if (pread(sfd, rbuf, DSLOT, dsrc[k]) != DSLOT) die("pread slot check");
        if (memcmp(rbuf, dbuf + (size_t)k * DSLOT, DSLOT)) dbad++;
    }
    uint64_t h = 1469598103934665603ull;          /* FNV-1a of src.bin via its fd */
    for (off_t off = 0; off < sst.st_size; off += CHUNK) {
        posix_fadvise(sfd, off, CHUNK, POSIX_FADV_DONTNEED);
        ssize_t n = pread(sfd, rbuf, CHUNK, off);
        if (n < 0) die("hash src");
        for (ssize_t k = 0; k < n; k++) { h ^= rbuf[k]; h *= 1099511628211ull; }
    }
    char cwd[4096];
    if (!getcwd(cwd, sizeof cwd)) die("getcwd");
    printf("RESULT n=%llu bad=%llu dbad=%llu src=%016llx cwd=%s\n", (unsigned long long)i,
           (unsigned long long)bad, (unsigned long long)dbad, (unsigned long long)h, cwd);
    return bad || dbad ? 1 : 0;
}
