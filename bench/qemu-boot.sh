#!/usr/bin/env bash
# Boot time of a twinroot host under QEMU/TCG, against the kernel's own floor, in the same run.
#
#   baseline  : same kernel (PVH vmlinux), an initramfs whose /init is busybox printing one line
#               (no modules, no disk): what any initramfs pays before userspace.
#   twinroot  : twinroot initramfs (modules, boot selector, GPT slot table, squashfs root, STATE
#               ext4, switch_root) up to the root image's "twinroot: booted version" line.
#   bzImage   : the same twinroot boot from the compressed bzImage (in-guest decompression).
#   fallback  : staged slot B whose init panics: B boots, panics, the kernel reboots (panic=1),
#               the selector falls back to A: time until "booted version 1.0.0 slot a".
#
# Wall time from QEMU start to the line; median of ROUNDS (default 5). Prints a Markdown table.
set -euo pipefail
ROUNDS=${ROUNDS:-5}
cd "$(dirname "$0")/.."
cargo build --release -q -p twinroot-qemu --bins
Q=$PWD/target/release/twinroot-qemu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/base/bin" "$work/base/dev" "$work/base/proc"
cp /bin/busybox "$work/base/bin/busybox"
ln -s busybox "$work/base/bin/sh"
printf '#!/bin/sh\necho "baseline: userspace up"\n/bin/busybox poweroff -f\n' >"$work/base/init"
chmod 755 "$work/base/init"
(cd "$work/base" && find . | cpio -o -H newc --quiet) >"$work/base.cpio"

$Q initramfs --out "$work/initrd.cpio" >/dev/null
$Q rootfs --version 1.0.0 --out "$work/root1" --image "$work/v1.img" >/dev/null
$Q rootfs --version 4.0.0 --panic --out "$work/root4" --image "$work/v4.img" >/dev/null

secs() { sed -n 's/^reached after \([0-9.]*\) s.*/\1/p'; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A t
for ((i = 0; i < ROUNDS; i++)); do
  rm -f "$work/d.disk" "$work/s.disk"
  $Q disk --out "$work/d.disk" --slot-a "$work/v1.img" >/dev/null
  $Q disk --out "$work/s.disk" --slot-a "$work/v1.img" --slot-b "$work/v4.img" >/dev/null
  t[baseline]+="$($Q run --quiet --disk "$work/d.disk" --initrd "$work/base.cpio" --log "$work/l" --until 'baseline: userspace up' | secs) "
  t[twinroot]+="$($Q run --quiet --disk "$work/d.disk" --initrd "$work/initrd.cpio" --log "$work/l" --until 'twinroot: booted version' | secs) "
  t[bzimage]+="$($Q run --quiet --bzimage --disk "$work/d.disk" --initrd "$work/initrd.cpio" --log "$work/l" --until 'twinroot: booted version' | secs) "
  t[fallback]+="$($Q run --quiet --disk "$work/s.disk" --initrd "$work/initrd.cpio" --log "$work/l" --until 'twinroot: booted version 1.0.0 slot a' | secs) "
done

m() { tr ' ' '\n' <<<"${t[$1]}" | grep . | median; }
b=$(m baseline)
echo "| what | median wall time ($ROUNDS rounds) | vs baseline |"
echo "| --- | --- | --- |"
for k in baseline twinroot bzimage fallback; do
  v=$(m "$k")
  echo "| $k | ${v} s | $(awk -v a="$v" -v b="$b" 'BEGIN {printf "%.2fx", a / b}') |"
done
echo
echo "initramfs $(stat -c %s "$work/initrd.cpio") bytes, root image $(stat -c %s "$work/v1.img") bytes; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
