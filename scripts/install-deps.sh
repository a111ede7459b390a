#!/usr/bin/env bash
# Install the system packages vhostfs's guest tests and demo need, only if missing.
# Idempotent: when everything is present it changes nothing and needs no network.
# Uses the apt sources already configured on the machine (no host names here).
set -euo pipefail

# systemd: systemd-socket-activate and systemd-analyze for tests/guest/test_systemd.py.
PACKAGES=(qemu-system-x86 linux-image-amd64 busybox-static cpio attr acl xz-utils zstd libseccomp2 systemd)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all present (${PACKAGES[*]})"
    exit 0
fi

echo "install-deps: installing ${missing[*]}"
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install-deps: need root (or sudo) to install ${missing[*]}" >&2; exit 1; }
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"

# The guest kernel must come with its modules (virtio-fs is a module on Debian).
ls /boot/vmlinuz-* >/dev/null
test -x /usr/lib/qemu/virtiofsd || echo "install-deps: note: QEMU's C virtiofsd not found" >&2
