#include <errno.h>
#include <stdint.h>
#include <unistd.h>
#include <sys/syscall.h>

long vhs_getdents64(int fd, unsigned char *buf, unsigned int size)
{
    long n = syscall(SYS_getdents64, fd, buf, size);
    return n < 0 ? -(long)errno : n;
}

int64_t vhs_dir_seek(int fd, int64_t off)
{
    off_t r = lseek(fd, (off_t)off, SEEK_SET);
    return r < 0 ? -(int64_t)errno : (int64_t)r;
}
