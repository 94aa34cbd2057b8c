#!/usr/bin/env bash
# Fetch what an arm64 test guest boots, without installing it or adding arm64 to the host's
# dpkg architectures: Debian's arm64 kernel (the linux-image-arm64 dependency), busybox-static
# (arm64, for the guest's initrd) and systemd's arm64 EFI stub (systemd-boot-efi), through a
# private apt state under .cache/apt-arm64 (the host's own sources list, arm64 package lists).
# Unpacked into .cache/arm64-guest/<kernel version>/:
#   Image                    the kernel: an EFI executable (PE/COFF) itself
#   busybox                  the static arm64 busybox
#   linuxaa64.efi.stub       the unified kernel image's stub
# and .cache/arm64-guest/current links to it. Idempotent: does nothing when present.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
dest=$here/.cache/arm64-guest
state=$here/.cache/apt-arm64
mkdir -p "$dest" "$state/lists/partial" "$state/cache/archives/partial"
apt_arm64=(-q -o APT::Sandbox::User=root -o APT::Architecture=arm64 -o APT::Architectures::=arm64
           -o Dir::State::Lists="$state/lists" -o Dir::Cache="$state/cache"
           -o Dir::State::status=/dev/null)

resolve() { apt-cache "${apt_arm64[@]}" depends linux-image-arm64 2>/dev/null |
            awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
pkg=$(resolve || true)
if [ -z "$pkg" ] || [ -n "${REFRESH:-}" ]; then
  echo "==> arm64 package lists (private apt state in $state)"
  apt-get "${apt_arm64[@]}" update >/dev/null
  pkg=$(resolve)
fi
[ -n "$pkg" ] || { echo "fetch-arm64-guest: cannot resolve linux-image-arm64 for arm64" >&2; exit 1; }
pkg=${pkg%:arm64}
version=${pkg#linux-image-}
if [ -f "$dest/$version/Image" ] && [ -f "$dest/$version/busybox" ] &&
   [ -f "$dest/$version/linuxaa64.efi.stub" ]; then
  ln -sfn "$version" "$dest/current"
  exit 0
fi

work=$(mktemp -d "$dest/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "==> downloading $pkg busybox-static systemd-boot-efi (arm64)"
(cd "$work" && apt-get "${apt_arm64[@]}" download "$pkg" busybox-static systemd-boot-efi >/dev/null)
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
mkdir -p "$work/out"
# Bookworm's signed arm64 vmlinuz is the Image itself (a PE/COFF executable through the
# kernel's EFI stub); the unsigned build's is gzip-compressed, which firmware cannot run, so
# it is decompressed: the unified kernel image must carry the bare Image.
vmlinuz=$work/root/boot/vmlinuz-$version
if [ "$(head -c2 "$vmlinuz" | od -An -tx1 | tr -d ' ')" = 1f8b ]; then
  gzip -dc "$vmlinuz" > "$work/out/Image"
else
  cp "$vmlinuz" "$work/out/Image"
fi
[ "$(head -c2 "$work/out/Image")" = MZ ] || { echo "fetch-arm64-guest: $pkg's kernel is not a PE Image" >&2; exit 1; }
cp "$work/root/bin/busybox" "$work/out/busybox"
cp "$work/root/usr/lib/systemd/boot/efi/linuxaa64.efi.stub" "$work/out/"
rm -rf "${dest:?}/$version"
mv "$work/out" "$dest/$version"
ln -sfn "$version" "$dest/current"
echo "==> arm64 guest ($version) in $dest/current"
