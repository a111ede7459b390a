/* Directory streams read in place (READDIR/READDIRPLUS): getdents64 into a caller buffer
 * of struct linux_dirent64 {u64 d_ino; s64 d_off; u16 d_reclen; u8 d_type; char d_name[]}
 * records, and lseek with the full signed 64-bit cookie.  Both return -errno on failure
 * (not -1 with errno). */
long vhs_getdents64(int fd, unsigned char *buf, unsigned int size);
int64_t vhs_dir_seek(int fd, int64_t off);
