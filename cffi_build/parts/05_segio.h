/* preadv (to_guest != 0: file -> guest memory) or pwritev (to_guest == 0: guest memory
 * -> file) between fd at `offset` and the guest bytes of segs[first .. first+n) --
 * (region index, offset in region, length) triples as vhs_walk_chain writes them --
 * starting `skip` bytes into those segments and moving at most `count` bytes.  At most
 * VHS_SEGIO_BATCH vectors per system call, looping on short transfers, stopping at EOF
 * (a zero return) or on an error after some bytes moved (like read(2)).  Returns the
 * bytes moved, or -errno when nothing moved.  Every segment is checked against its
 * region first (-EFAULT): only bytes inside the regions are ever touched. */
#define VHS_SEGIO_BATCH 256
int64_t vhs_segs_io(int fd, uint64_t offset, const struct vhs_region *regions,
                    uint32_t nregions, const uint64_t *segs, uint32_t first, uint32_t n,
                    uint64_t skip, uint64_t count, int to_guest);
