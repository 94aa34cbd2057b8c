#!/usr/bin/env bash
# Fetch Debian's stock kernel (the linux-image-amd64 dependency) for test guests, without
# installing it on the host: unpack the .deb into .cache/guest-kernel/<version>/ and link
# .cache/guest-kernel/current to it. Idempotent: does nothing when the version is present.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
dest=$here/.cache/guest-kernel
mkdir -p "$dest"

pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$pkg" ] || { echo "fetch-guest-kernel: cannot resolve linux-image-amd64 (run make setup)" >&2; exit 1; }
version=${pkg#linux-image-}
if [ -f "$dest/$version/vmlinuz" ]; then
  ln -sfn "$version" "$dest/current"
  exit 0
fi

work=$(mktemp -d "$dest/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "==> downloading $pkg"
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >/dev/null)
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/root"
mkdir -p "$work/out"
cp "$work/root/boot/vmlinuz-$version" "$work/out/vmlinuz"
mv "$work/root/lib/modules/$version" "$work/out/modules"
rm -rf "${dest:?}/$version"
mv "$work/out" "$dest/$version"
ln -sfn "$version" "$dest/current"
echo "==> guest kernel $version in $dest/current"
