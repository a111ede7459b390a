#!/bin/sh
# Fetches QEMU 10.0 (Debian bookworm-backports' qemu-system-x86, the first Debian QEMU with
# vhost-user DEVICE_STATE, needed for virtio-fs live migration) into a private cache folder
# and prints the path of a wrapper that runs it.  Nothing is installed system-wide; the
# Debian mirror is the one this machine's apt already uses, with the suite swapped for
# bookworm-backports.  The backports build links bookworm's own libraries (those of the
# system QEMU 7.2); the script stops with their names if any is missing.
#   usage: scripts/fetch-qemu-backports.sh [CACHE_DIR]   (default: $VHOSTFS_QEMU_BPO_CACHE or
#                                                          $HOME/.cache/vhostfs/qemu-backports)
#   then:  "$(scripts/fetch-qemu-backports.sh)" -machine q35,accel=tcg ...
set -eu
cache=${1:-${VHOSTFS_QEMU_BPO_CACHE:-${HOME:-/tmp}/.cache/vhostfs/qemu-backports}}
wrapper=$cache/qemu-system-x86_64
if [ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1; then echo "$wrapper"; exit 0; fi
. "$(dirname "$0")/private-apt.sh"
private_apt_setup "$cache" fetch-qemu-backports bookworm bookworm-backports
cd "$cache/debs"
# shellcheck disable=SC2086
apt-get $apt_opts download qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports >&2
for deb in *.deb; do dpkg-deb -x "$deb" "$cache/root"; done
bin=$cache/root/usr/bin/qemu-system-x86_64
lib=$cache/root/usr/lib/x86_64-linux-gnu
# The backports build links bookworm's libraries, which the system QEMU 7.2 already pulled in.
missing=$(ldd "$bin" | awk '/not found/ {print $1}')
[ -z "$missing" ] || { echo "fetch-qemu-backports: system libraries missing (apt-get install them): $missing" >&2; exit 1; }
cat > "$wrapper.tmp" <<WRAP
#!/bin/sh
LD_LIBRARY_PATH="$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$bin" -L "$cache/root/usr/share/qemu" -L /usr/share/qemu -L /usr/share/seabios "\$@"
WRAP
chmod +x "$wrapper.tmp"
mv "$wrapper.tmp" "$wrapper"
"$wrapper" --version >&2
echo "$wrapper"
