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
