#!/usr/bin/env bash
# Demo: serve a host directory to a booted QEMU guest through `vhostfs guest-run` and show
# the share working both ways (ls, write, read back, sha256sum on both sides), then a
# clean shutdown.  Usage: scripts/demo.sh [PYTHON]   (backend: $VHOSTFS_GUEST_BACKEND)
set -euo pipefail
PY="${1:-python3}"
BACKEND="${VHOSTFS_GUEST_BACKEND:-vhostfs}"
DEMO="$(mktemp -d /tmp/vhostfs-demo.XXXXXX)"
trap 'rm -rf "$DEMO"' EXIT

echo "== host: preparing $DEMO"
echo "hello from the host" > "$DEMO/hello.txt"
head -c 4194304 /dev/urandom > "$DEMO/host-blob.bin"
mkdir "$DEMO/docs"
( cd "$DEMO" && sha256sum host-blob.bin )

echo "== guest: booting (backend: $BACKEND), running the script on the share at /mnt"
set +e
"$PY" -m vhostfs guest-run --share "$DEMO" --backend "$BACKEND" --timeout 300 -- '
set -e
echo "guest kernel $(uname -r); share: $(grep virtiofs /proc/mounts)"
ls -l
cat hello.txt
sha256sum host-blob.bin
echo "hello from the guest" > docs/from-guest.txt
head -c 3000001 /dev/urandom > guest-blob.bin
sync
sha256sum guest-blob.bin
' | tee "$DEMO/.guest-output"
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 0 ] || { echo "demo: guest run failed with status $status" >&2; exit "$status"; }

echo "== host: checking what the guest wrote"
cat "$DEMO/docs/from-guest.txt"
host_sum_guest_blob=$(cd "$DEMO" && sha256sum guest-blob.bin)
host_sum_host_blob=$(cd "$DEMO" && sha256sum host-blob.bin)
echo "$host_sum_guest_blob"
grep -qxF "$host_sum_guest_blob" "$DEMO/.guest-output" || { echo "demo: guest-blob.bin differs between guest and host" >&2; exit 1; }
grep -qxF "$host_sum_host_blob" "$DEMO/.guest-output" || { echo "demo: host-blob.bin read wrongly in the guest" >&2; exit 1; }
[ "$(stat -c %s "$DEMO/guest-blob.bin")" -eq 3000001 ]
echo "== demo OK: same bytes on both sides; the guest unmounted the share and powered off (exit 0)"
