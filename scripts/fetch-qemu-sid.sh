#!/bin/sh
# Fetches QEMU 11.1 (Debian sid's qemu-system-x86) into a private cache folder, with the sid
# C library and the libraries it needs kept beside it (../shared/design/dax.md §3.1), and
# prints the path of a wrapper that runs it.  Nothing is installed system-wide; the Debian
# mirror is the one this machine's apt already uses, with the suite swapped for sid.
#   usage: scripts/fetch-qemu-sid.sh [CACHE_DIR]   (default: $VHOSTFS_QEMU_SID_CACHE or
#                                                   $HOME/.cache/vhostfs/qemu-sid)
#   then:  "$(scripts/fetch-qemu-sid.sh)" -machine q35,accel=tcg ...
# The wrapper adds -L for the system's firmware (bookworm's SeaBIOS works with 11.1).
set -eu
cache=${1:-${VHOSTFS_QEMU_SID_CACHE:-${HOME:-/tmp}/.cache/vhostfs/qemu-sid}}
wrapper=$cache/qemu-system-x86_64
if [ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1; then echo "$wrapper"; exit 0; fi
. "$(dirname "$0")/private-apt.sh"
private_apt_setup "$cache" fetch-qemu-sid sid
# qemu itself, then the sid libraries it links (dax.md §3.1; qemu-system-data is not needed).
pkgs="qemu-system-x86 qemu-system-common libaio1t64 libbpf1 libc6 libcapstone5 libfdt1 libfuse3-4
libglib2.0-0t64 libgmp10 libgnutls30t64 libhogweed6t64 libibverbs1 libjpeg62-turbo libnettle8t64
libnuma1 libpixman-1-0 libpmem1 libpng16-16t64 librdmacm1t64 libsasl2-2 libseccomp2 libslirp0
libudev1 liburing2 libvdeplug2t64 libzstd1 zlib1g libunistring5 libidn2-0 libtasn1-6 libp11-kit0
libffi8 libpcre2-8-0 libmount1 libselinux1 libblkid1 libelf1t64 libnl-3-200 libnl-route-3-200
libndctl6 libdaxctl1 libkmod2 libuuid1 libgcc-s1 libcap2 liblzma5 libsasl2-modules-db libdb5.3t64
libssl3t64 libcrypt1"
cd "$cache/debs"
# shellcheck disable=SC2086
apt-get $apt_opts download $pkgs >&2
for deb in *.deb; do dpkg-deb -x "$deb" "$cache/root"; done
lib=$cache/root/usr/lib/x86_64-linux-gnu
loader=$lib/ld-linux-x86-64.so.2
[ -e "$loader" ] || loader=$cache/root/usr/lib64/ld-linux-x86-64.so.2
cat > "$wrapper.tmp" <<WRAP
#!/bin/sh
exec "$loader" --library-path "$lib" "$cache/root/usr/bin/qemu-system-x86_64" -L /usr/share/qemu -L /usr/share/seabios "\$@"
WRAP
chmod +x "$wrapper.tmp"
mv "$wrapper.tmp" "$wrapper"
"$wrapper" --version >&2
echo "$wrapper"
