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
command -v apt-get >/dev/null || { echo "fetch-qemu-backports: apt-get is needed" >&2; exit 1; }
command -v dpkg-deb >/dev/null || { echo "fetch-qemu-backports: dpkg-deb is needed" >&2; exit 1; }
mkdir -p "$cache/lists/partial" "$cache/archives/partial" "$cache/debs" "$cache/root"
mirror=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n 1)
[ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || { echo "fetch-qemu-backports: no Debian mirror configured in apt" >&2; exit 1; }
mirror=${mirror%% *}
printf 'deb %s bookworm main\ndeb %s bookworm-backports main\n' "$mirror" "$mirror" > "$cache/sources.list"
apt_opts="-o Dir::Etc::SourceList=$cache/sources.list -o Dir::Etc::SourceParts=/dev/null \
-o Dir::State::Lists=$cache/lists -o Dir::Cache=$cache -o Debug::NoLocking=1 -o APT::Sandbox::User=root"
apt-get $apt_opts update -qq >&2
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
