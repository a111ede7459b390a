#include <errno.h>
#include <stdint.h>
#include <sys/uio.h>

/* ---- I/O straight over a walked chain's segments (05_segio.h) ---- */

int64_t vhs_segs_io(int fd, uint64_t offset, const struct vhs_region *regions,
                    uint32_t nregions, const uint64_t *segs, uint32_t first, uint32_t n,
                    uint64_t skip, uint64_t count, int to_guest)
{
    const uint64_t *s = segs + 3 * (uint64_t)first;
    for (uint32_t k = 0; k < n; k++) {
        uint64_t r = s[3 * k], off = s[3 * k + 1], len = s[3 * k + 2];
        if (r >= nregions || off > regions[r].size || len > regions[r].size - off)
            return -EFAULT;
    }
    /* cursor: segment i, byte `at` inside it */
    uint32_t i = 0;
    uint64_t at = skip;
    while (i < n && at >= s[3 * i + 2]) {
        at -= s[3 * i + 2];
        i++;
    }
    uint64_t done = 0;
    while (done < count && i < n) {
        struct iovec iov[VHS_SEGIO_BATCH];
        int k = 0;
        uint64_t want = 0;
        uint32_t j = i;
        uint64_t o = at;
        while (k < VHS_SEGIO_BATCH && j < n && want < count - done) {
            uint64_t avail = s[3 * j + 2] - o;
            uint64_t take = count - done - want < avail ? count - done - want : avail;
            iov[k].iov_base = (void *)(regions[s[3 * j]].host + s[3 * j + 1] + o);
            iov[k].iov_len = take;
            k++;
            want += take;
            j++;
            o = 0;
        }
        ssize_t got = to_guest ? preadv(fd, iov, k, (off_t)(offset + done))
                               : pwritev(fd, iov, k, (off_t)(offset + done));
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return done ? (int64_t)done : -(int64_t)errno;
        }
        if (got == 0)
            break;
        done += (uint64_t)got;
        /* advance the cursor by `got` bytes */
        uint64_t left = (uint64_t)got;
        while (left && i < n) {
            uint64_t rest = s[3 * i + 2] - at;
            if (left < rest) {
                at += left;
                left = 0;
            } else {
                left -= rest;
                i++;
                at = 0;
            }
        }
    }
    return (int64_t)done;
}
