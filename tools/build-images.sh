#!/usr/bin/env bash
# `make images`: build the appliance-vm and hypervisor images with mkosi, one after the other,
# each skipped when its inputs have not changed. Outputs in build/images/<name>/.
#   make images VERSION=v2       set the image version (os-release IMAGE_VERSION)
#   make images LOCKED=1         fail if the packages differ from images/<name>/packages.lock
#                                (default: one warning line per differing package)
#   make images UPDATE_LOCK=1    record the packages built into images/<name>/packages.lock
#   make images REFRESH=1        sync the package metadata now (otherwise when older than 24 h)
#   make images ROOT_LAYOUT=cpio the hypervisor's root unpacked whole into RAM (the layout before
#                                the live root; default squashfs), for side-by-side benchmarks
# Arguments are passed on: tools/build-images.sh --help. See docs/images.md.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${VENV:-$here/.venv}/bin/python
[ -x "$py" ] || { echo "build-images: no venv at $py (run make setup)" >&2; exit 1; }
exec "$py" -m hatchery_lab.imagebuild build "$@"
