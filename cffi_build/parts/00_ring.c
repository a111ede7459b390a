#include <stdint.h>
#include <string.h>
#include <endian.h>

uint16_t vhs_load_acquire_u16(uintptr_t addr)
{
    return __atomic_load_n((const uint16_t *)addr, __ATOMIC_ACQUIRE);
}

void vhs_store_release_u16(uintptr_t addr, uint16_t value)
{
    __atomic_store_n((uint16_t *)addr, value, __ATOMIC_RELEASE);
}

void vhs_fence_seq_cst(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

uintptr_t vhs_buffer_address(char *buf)
{
    return (uintptr_t)buf;
}

/* ---- descriptor chain walk (virtio 1.2 2.7.4, 2.7.5; rules in virtqueue/chain.py) ----
 * struct vhs_region, struct vhs_walker and VHS_CHAIN_* are in 00_ring.h. */

#define VHS_F_NEXT 1
#define VHS_F_WRITE 2
#define VHS_F_INDIRECT 4

/* The region holding gpa, or -1.  Binary search over the sorted, disjoint regions. */
static int vhs_region_at(const struct vhs_walker *w, uint64_t gpa)
{
    uint32_t lo = 0, hi = w->nregions;
    while (lo < hi) {   /* first region whose start is > gpa */
        uint32_t mid = lo + (hi - lo) / 2;
        if (w->regions[mid].gpa <= gpa)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return -1;
    const struct vhs_region *r = &w->regions[lo - 1];
    return gpa - r->gpa < r->size ? (int)(lo - 1) : -1;
}

/* Append [gpa, gpa+len) (len > 0) as segments.  Returns 0, VHS_CHAIN_MEMORY or
 * VHS_CHAIN_FULL.  Like GuestMemory.translate: a range past 2^64 or touching any byte
 * outside the regions fails. */
static int vhs_add_range(struct vhs_walker *w, uint64_t gpa, uint64_t len, uint32_t first_of_kind)
{
    if (gpa && len > UINT64_MAX - gpa + 1)  /* gpa + len > 2^64 */
        goto bad;
    uint64_t addr = gpa, left = len;
    while (left) {
        int i = vhs_region_at(w, addr);
        if (i < 0)
            goto bad;
        const struct vhs_region *r = &w->regions[i];
        uint64_t off = addr - r->gpa;
        uint64_t n = r->size - off < left ? r->size - off : left;
        uint32_t k = w->nsegs;
        uint64_t *prev = k > first_of_kind ? &w->segs[3 * (k - 1)] : NULL;
        if (prev && prev[0] == (uint64_t)i && prev[1] + prev[2] == off) {
            prev[2] += n;       /* contiguous with the previous piece: one view */
        } else {
            if (k >= w->cap)
                return VHS_CHAIN_FULL;
            w->segs[3 * k] = (uint64_t)i;
            w->segs[3 * k + 1] = off;
            w->segs[3 * k + 2] = n;
            w->nsegs = k + 1;
        }
        addr += n;   /* may wrap to 0 exactly at the end of the address space */
        left -= n;
    }
    return 0;
bad:
    w->err_a = gpa;
    w->err_b = len;
    return VHS_CHAIN_MEMORY;
}

/* The host address of an indirect table: in place if it lies in one region, else copied
 * once into scratch (it may straddle two adjacent regions).  NULL: outside memory. */
static const unsigned char *vhs_indirect_table(struct vhs_walker *w, uint64_t gpa, uint32_t len)
{
    int i = vhs_region_at(w, gpa);
    if (i < 0)
        return NULL;
    const struct vhs_region *r = &w->regions[i];
    uint64_t off = gpa - r->gpa;
    if (r->size - off >= len)
        return (const unsigned char *)(r->host + off);
    /* Spans regions: copy piece by piece; every byte must be in guest memory. */
    uint64_t addr = gpa;
    uint32_t done = 0;
    while (done < len) {
        if (addr == 0 && done)      /* wrapped past 2^64 */
            return NULL;
        i = vhs_region_at(w, addr);
        if (i < 0)
            return NULL;
        r = &w->regions[i];
        off = addr - r->gpa;
        uint64_t n = r->size - off < (uint64_t)(len - done) ? r->size - off : (uint64_t)(len - done);
        memcpy(w->scratch + done, (const void *)(r->host + off), n);
        done += (uint32_t)n;
        addr += n;
    }
    return w->scratch;
}

int vhs_walk_chain(struct vhs_walker *w, uint32_t head)
{
    const unsigned char *table = (const unsigned char *)w->desc;
    uint32_t limit = w->size, count = 0, index = head;
    int in_indirect = 0, seen_write = 0, rc;
    uint64_t rlen = 0, wlen = 0;

    w->nsegs = 0;
    w->nreadable = 0;
    for (;;) {
        if (index >= limit) {
            w->err_a = index;
            w->err_b = limit;
            w->err_c = in_indirect;
            return VHS_CHAIN_NEXT_RANGE;
        }
        if (++count > limit) {   /* more descriptors than the table holds: a loop */
            w->err_b = limit;
            w->err_c = in_indirect;
            return VHS_CHAIN_TOO_LONG;
        }
        /* Read the descriptor once, into locals (the guest may rewrite it meanwhile):
         * volatile so the compiler cannot re-load a field after it was checked. */
        const volatile unsigned char *d = table + ((size_t)index << 4);
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
        unsigned char raw[16];
        for (int b = 0; b < 16; b++)
            raw[b] = d[b];
        memcpy(&addr, raw, 8);
        memcpy(&len, raw + 8, 4);
        memcpy(&flags, raw + 12, 2);
        memcpy(&next, raw + 14, 2);
        addr = le64toh(addr);
        len = le32toh(len);
        flags = le16toh(flags);
        next = le16toh(next);

        if (flags & VHS_F_INDIRECT) {   /* 2.7.5.3 */
            if (in_indirect)
                return VHS_CHAIN_NESTED;
            if (flags & VHS_F_NEXT)
                return VHS_CHAIN_INDIRECT_NEXT;
            if (len == 0 || (len & 15) || len > VHS_MAX_INDIRECT * 16) {
                w->err_a = len;
                return VHS_CHAIN_INDIRECT_LEN;
            }
            table = vhs_indirect_table(w, addr, len);
            if (!table) {
                w->err_a = addr;
                w->err_b = len;
                return VHS_CHAIN_MEMORY;
            }
            limit = len >> 4;
            in_indirect = 1;
            count = 0;
            index = 0;
            continue;
        }
        if (flags & VHS_F_WRITE) {
            if (!seen_write) {
                seen_write = 1;
                w->nreadable = w->nsegs;
            }
            if (len) {
                wlen += len;
                if ((rc = vhs_add_range(w, addr, len, w->nreadable)))
                    return rc;
            }
        } else {
            if (seen_write)     /* 2.7.4.2 */
                return VHS_CHAIN_READ_AFTER_WRITE;
            if (len) {
                rlen += len;
                if ((rc = vhs_add_range(w, addr, len, 0)))
                    return rc;
            }
        }
        if (!(flags & VHS_F_NEXT))
            break;
        index = next;
    }
    if (!seen_write)
        w->nreadable = w->nsegs;
    w->readable_len = rlen;
    w->writable_len = wlen;
    if (rlen + wlen > 0xFFFFFFFFull) {  /* 2.7.5.2 */
        w->err_a = rlen + wlen;
        return VHS_CHAIN_TOTAL;
    }
    return VHS_CHAIN_OK;
}
