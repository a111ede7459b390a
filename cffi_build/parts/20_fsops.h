/* More syscalls Python's os module lacks (issue 3): fallocate with every mode, syncfs,
 * per-thread setgroups (the raw syscall: glibc's setgroups() broadcasts to every
 * thread), and file handles (name_to_handle_at / open_by_handle_at).  Each returns -1
 * with errno set on failure. */
int vhs_fallocate(int fd, int mode, int64_t offset, int64_t len);
int vhs_syncfs(int fd);
int vhs_setgroups_thread(int n, const uint32_t *groups);
int vhs_set_fscreds(uint32_t fsuid, uint32_t fsgid, int n, const uint32_t *groups);
int vhs_name_to_handle(int dirfd, const char *path, int flags, unsigned char *buf,
                       unsigned int bufsize, int *handle_type, int *mount_id);
int vhs_open_by_handle(int mount_fd, const unsigned char *buf, unsigned int size,
                       int handle_type, int flags);
