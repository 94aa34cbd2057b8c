#!/usr/bin/env bash
# Fetch the next QEMU (bookworm-backports: QEMU 10 beside the host's 7.2) for the tests and
# the bench that move a guest from one QEMU version to another, without installing it: the
# .debs of the binary, its data files and the SeaBIOS it asks for are unpacked into
# .cache/qemu-next/, with a launcher .cache/qemu-next/qemu-system-x86_64 that points the
# unpacked binary at its own data (-L) before the host's (its built-in search list is the
# host's /usr/share/qemu, the 7.2 files). iPXE's ROMs are the host's (backports has none).
# Idempotent: does nothing when the version is unpacked already.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
dest=$here/.cache/qemu-next
suite=bookworm-backports
packages=(qemu-system-x86 qemu-system-data seabios)

version=$(apt-cache madison qemu-system-x86 2>/dev/null |
  awk -F'|' -v s="$suite" '$3 ~ s"/" {gsub(/ /, "", $2); print $2; exit}')
[ -n "$version" ] || { echo "fetch-qemu-next: no qemu-system-x86 in $suite (run make setup)" >&2; exit 1; }
if [ -x "$dest/qemu-system-x86_64" ] && [ "$(cat "$dest/version" 2>/dev/null)" = "$version" ]; then
  exit 0
fi

mkdir -p "$(dirname "$dest")"
work=$(mktemp -d "$dest.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "==> downloading ${packages[*]} from $suite (QEMU $version)"
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root -t "$suite" "${packages[@]}" >/dev/null)
mkdir -p "$work/out"
for deb in "$work"/*.deb; do
  dpkg-deb -x "$deb" "$work/out"
done
missing=$(ldd "$work/out/usr/bin/qemu-system-x86_64" | awk '/not found/ {print $1}')
[ -z "$missing" ] || { echo "fetch-qemu-next: libraries the host lacks: $missing" >&2; exit 1; }
cat >"$work/out/qemu-system-x86_64" <<'EOF'
#!/bin/sh
# The unpacked QEMU with its own data files first (written by tools/fetch-qemu-next.sh).
here=$(dirname "$(readlink -f "$0")")
export QEMU_MODULE_DIR="$here/usr/lib/x86_64-linux-gnu/qemu"
exec "$here/usr/bin/qemu-system-x86_64" -L "$here/usr/share/qemu" -L "$here/usr/share/seabios" "$@"
EOF
chmod 0755 "$work/out/qemu-system-x86_64"
echo "$version" >"$work/out/version"
rm -rf "$dest"
mv "$work/out" "$dest"
chmod 0755 "$dest"
echo "==> QEMU $("$dest/qemu-system-x86_64" --version | head -1) in $dest (launcher: $dest/qemu-system-x86_64)"
