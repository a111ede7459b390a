#include <stdint.h>

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
