/* Ring index accesses with the memory ordering the virtio spec requires
 * (virtio 1.2, 2.7.13 / 2.7.14: the driver publishes descriptors before the
 * index, the device reads the index before the ring entries, writes the used
 * element before the used index, and must read used_event/avail flags only
 * after the used index store is visible). addr is a host virtual address
 * inside a mapped guest memory region. */
uint16_t vhs_load_acquire_u16(uintptr_t addr);
void vhs_store_release_u16(uintptr_t addr, uint16_t value);
void vhs_fence_seq_cst(void);
uintptr_t vhs_buffer_address(char *buf);

/* Descriptor chain walk + guest-physical -> region translation in one call
 * (vhostfs/virtqueue/chain.py documents the rules; walk_chain there is the reference).
 * regions: sorted by gpa, disjoint (a GuestMemory snapshot).  Segments are written to
 * segs[] as (region index, offset in region, length) triples of u64, readable ones
 * first; adjacent pieces of one region are merged.  Returns 0, or a VHS_CHAIN_* error
 * with the values the message needs in w->err_*. */
struct vhs_region {
    uint64_t gpa;
    uint64_t size;
    uintptr_t host;
};

struct vhs_walker {
    const struct vhs_region *regions;
    uint32_t nregions;
    uint32_t size;            /* queue size: descriptors in the table at desc */
    uintptr_t desc;           /* host address of the descriptor table */
    unsigned char *scratch;   /* VHS_MAX_INDIRECT * 16 bytes: a table split across regions */
    uint64_t *segs;           /* 3 * cap u64 */
    uint32_t cap;
    /* results */
    uint32_t nreadable;
    uint32_t nsegs;
    uint64_t readable_len;
    uint64_t writable_len;
    uint64_t err_a;
    uint64_t err_b;
    uint64_t err_c;
};

#define VHS_MAX_INDIRECT 4096
#define VHS_CHAIN_OK 0
#define VHS_CHAIN_NEXT_RANGE 1      /* a=index b=limit c=in_indirect */
#define VHS_CHAIN_TOO_LONG 2        /* b=limit c=in_indirect */
#define VHS_CHAIN_NESTED 3
#define VHS_CHAIN_INDIRECT_NEXT 4
#define VHS_CHAIN_INDIRECT_LEN 5    /* a=len */
#define VHS_CHAIN_MEMORY 6          /* a=gpa b=len */
#define VHS_CHAIN_READ_AFTER_WRITE 7
#define VHS_CHAIN_TOTAL 8           /* a=total */
#define VHS_CHAIN_FULL 9            /* more segments than cap: use the Python walk */

int vhs_walk_chain(struct vhs_walker *w, uint32_t head);
