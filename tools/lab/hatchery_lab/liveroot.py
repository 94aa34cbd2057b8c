"""The hypervisor's root kept compressed in RAM: mkosi's root repacked as a squashfs image
inside a small initrd, mounted read-only under a tmpfs overlay at boot.

Why: booted from mkosi's cpio, the kernel unpacks the whole root (478 MB) into a tmpfs that
VMs can never have back. Kept as a squashfs image (zstd), the same root holds ~95 MB of RAM
plus what the node writes (the overlay's tmpfs) and what the page cache keeps, which the
kernel can reclaim. Debian live-boot's ``toram``, dracut's dmsquash-live and Talos do the same.

The initrd is two newc cpio archives back to back, which the kernel unpacks one after the
other (as it does an early-microcode cpio before the main one), so every boot path (direct
boot, iPXE, UEFI HTTP Boot's UKI, kexec) still loads just a kernel and an initrd, and the
artefact keeps its name (``hypervisor.cpio.zst``):

1. a plain cpio of one member, ``root.squashfs``: the root, already compressed. Plain, it lies
   in the initrd file as one run of bytes, so an upgrade mounts it where the image store
   keeps the file (``hatchery.upgrade.rootimage.mounted_in_place``) instead of copying it;
2. a zstd-compressed cpio of the rest:

- ``init``: a busybox shell script (``INIT``): loads the modules, mounts ``root.squashfs``
  read-only at ``/run/hatchery/root``, a tmpfs at ``/run/hatchery/rw``, the overlay of both
  at ``/sysroot``, moves ``/dev``, ``/proc``, ``/sys`` and ``/run`` into it and switches to
  systemd. ``/run`` is already a mount when systemd starts, so systemd keeps it, and the two
  layers stay visible on the node under ``/run/hatchery``.
- ``bin/busybox``: the image's own static busybox (package ``busybox-static``, in the lock),
  moved here out of the root: nothing on a booted node runs it, and in both places it would
  cost 0.9 MB of every download.
- ``lib/modules/``: loop, squashfs and overlay and what they depend on (``modules.dep``), from
  the image's own kernel, with ``load-order``.

Measured on the 478 MB root (docs/images.md, "The live root"): squashfs zstd level 15 with
128 KiB blocks is 132 MB and reads the whole tree cold in 1.6 s on the host; level 19 with
1 MiB blocks is 119 MB but 4.0 s (each small file read decompresses a whole block); EROFS
with lz4hc (the only compressors of bookworm's erofs-utils) is 204-228 MB. On the 320 MB
root of 2026-12-05, 256 KiB blocks at level 17 are 84.9 MB against 88.8 MB for 128 KiB at
15, read the tree cold as fast (0.96 against 1.08 s) and boot a node no slower under TCG
(medians of 3 interleaved boots with level 19, 23.6 against 24.4 s; the level does not
change decoding); level 19 saves 0.2 MB more for 11 s more of each build.
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import zstandard

from hatchery.cpio import MAGIC as CPIO_MAGIC
from hatchery.cpio import next_member, skip_data
from hatchery.upgrade.archive import ZSTD_MAGIC
from hatchery.upgrade.rootimage import ROOT_IMAGE
from hatchery.upgrade.rootindex import INDEX_PATH, index_tree
from hatchery_lab.cpio_writer import Entry, write_newc

#: What /init needs before the root is mounted (names as in modules.dep, without .ko).
INIT_MODULES = ("loop", "squashfs", "overlay")
SQUASHFS_ARGS = ("-comp", "zstd", "-Xcompression-level", "17", "-b", "256K")
#: The kernel's own copies in the root (``linux-image``'s ``/boot/vmlinuz-*`` and the one
#: ``usr/lib/modules/<version>/``): a node boots the kernel shipped beside the initrd
#: (``hypervisor.vmlinuz``) and upgrades stage theirs from the store, so inside the root they
#: would only cost 8 MB of RAM and of every download. mkosi copies the kernel out of the tree
#: after its own RemoveFiles= step, so they are dropped here.
KERNEL_COPIES = ("boot/vmlinuz-*", "usr/lib/modules/*/vmlinuz")
#: zstd level of the second cpio (init, busybox, modules: ~3 MB).
OUTER_LEVEL = 3

INIT = """#!/bin/busybox sh
# Hatchery's live root (tools/lab/hatchery_lab/liveroot.py): the root file system stays
# compressed in RAM as root.squashfs, with a tmpfs over it for writes; then systemd.
/bin/busybox --install -s /bin
export PATH=/bin
fail() {
  echo "hatchery-init: $*; the kernel panics and reboots (panic= on the command line)" >/dev/console
  exit 1
}
mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs devtmpfs /dev \\
  || fail "cannot mount /proc, /sys or /dev"
while read -r module; do
  insmod "/lib/modules/$module" || fail "cannot load $module"
done < /lib/modules/load-order
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run || fail "cannot mount /run"
mkdir -p /run/hatchery/root /run/hatchery/rw /sysroot
mount -t squashfs -o loop,ro /root.squashfs /run/hatchery/root || fail "cannot mount the root image"
mount -t tmpfs -o mode=0755 tmpfs /run/hatchery/rw || fail "cannot mount the overlay's tmpfs"
mkdir /run/hatchery/rw/upper /run/hatchery/rw/work
mount -t overlay overlay \\
  -o lowerdir=/run/hatchery/root,upperdir=/run/hatchery/rw/upper,workdir=/run/hatchery/rw/work \\
  /sysroot || fail "cannot mount the overlay root"
for api in dev proc sys run; do
  mount --move "/$api" "/sysroot/$api" || fail "cannot move /$api"
done
exec switch_root /sysroot /usr/lib/systemd/systemd "$@"
"""


class LiveRootError(Exception):
    """The root cannot be repacked; the message says which step failed."""


def plain_length(f: BinaryIO) -> int:
    """How many bytes at the start of ``f`` are a plain newc cpio (through its trailer and the
    zero padding after it); 0 when ``f`` starts with anything else (a zstd frame)."""
    start = f.tell()
    if f.read(6) != CPIO_MAGIC:
        f.seek(start)
        return 0
    f.seek(start)
    while (member := next_member(f, one_archive=True)) is not None:
        skip_data(f, member.size)
    end = f.tell()
    while f.read(4) == b"\0\0\0\0":
        end += 4
    f.seek(start)
    return end - start


def unpack_cpio(archive: Path, dest: Path) -> Path:
    """Unpack an initrd with the real tools, as the kernel would see it: its plain cpio first
    if it has one (cpio), then its zstd-compressed one (zstd | cpio); owners, modes, device
    nodes and hard links kept (run as root)."""
    dest.mkdir(parents=True, exist_ok=True)
    cpio = ["cpio", "-idm", "--quiet", "--no-absolute-filenames"]
    with archive.open("rb") as f:
        plain = plain_length(f)
    if plain:
        with subprocess.Popen(["head", "-c", str(plain), str(archive)],
                              stdout=subprocess.PIPE) as head:  # fmt: skip
            subprocess.run(cpio, cwd=dest, stdin=head.stdout, check=True)
    if archive.stat().st_size > plain:
        with subprocess.Popen(["tail", "-c", f"+{plain + 1}", str(archive)],
                              stdout=subprocess.PIPE) as tail,\
                subprocess.Popen(["zstd", "-qdc"], stdin=tail.stdout,
                                 stdout=subprocess.PIPE) as zstd:  # fmt: skip
            subprocess.run(cpio, cwd=dest, stdin=zstd.stdout, check=True)
    return dest


def is_live_initrd(initrd: Path) -> bool:
    """Whether an initrd is the live-root layout: its first member is the root image, as
    upgrades tell it (hatchery.upgrade.archive)."""
    with initrd.open("rb") as f, contextlib.ExitStack() as stack:
        stream: BinaryIO = f
        if f.read(4) == ZSTD_MAGIC:  # the layout before the plain first segment
            f.seek(0)
            stream = stack.enter_context(zstandard.ZstdDecompressor().stream_reader(f))
        else:
            f.seek(0)
        first = next_member(stream)
        return first is not None and first.path == ROOT_IMAGE


def unpack_root(initrd: Path, dest: Path) -> Path:
    """The root file system an initrd boots, in ``dest``: the cpio itself for mkosi's layout,
    the squashfs image inside it for the live root (``unsquashfs``, owners kept)."""
    if not is_live_initrd(initrd):
        return unpack_cpio(initrd, dest)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        outer = unpack_cpio(initrd, Path(tmp) / "initrd")
        argv = ["unsquashfs", "-quiet", "-no-progress", "-d", str(dest), str(outer / ROOT_IMAGE)]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return dest


def module_load_order(modules_dep: str, wanted: tuple[str, ...]) -> list[str]:
    """Paths (relative to the release's folder) of ``wanted`` and everything they depend on,
    each after its dependencies, from a ``modules.dep`` text. Built-in modules are absent
    from modules.dep and need nothing.

    :raise LiveRootError: a wanted module is neither there nor built in (the caller passes
        the built-in list's names as present).
    """
    deps: dict[str, list[str]] = {}
    for line in modules_dep.splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            deps[path] = rest.split()
    by_name = {_module_name(path): path for path in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name not in by_name:
            raise LiveRootError(f"module {name} is not in modules.dep (not built, or built in)")
        visit(by_name[name])
    return order


def _module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


def _builtin(release: Path) -> set[str]:
    text = (
        (release / "modules.builtin").read_text() if (release / "modules.builtin").exists() else ""
    )
    return {_module_name(line) for line in text.splitlines()}


def plain_module(path: Path) -> bytes:
    """A module file's ELF: newer Debian kernels ship them compressed (``.ko.xz``, 6.12 from
    backports), which busybox's insmod cannot load; the initrd carries them uncompressed."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.zst"):
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=64 << 20)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if not path.name.endswith(".ko"):
        raise LiveRootError(f"{path.name}: not a kernel module file")
    return data


def take_busybox(tree: Path) -> bytes:
    """The root's static busybox, removed from the root: /init is its only user."""
    busybox = tree / "usr/bin/busybox"
    if not busybox.is_file():
        raise LiveRootError("the image has no /usr/bin/busybox (package busybox-static)")
    data = busybox.read_bytes()
    busybox.unlink()
    return data


def initrd_entries(tree: Path, image: bytes, busybox: bytes) -> list[Entry]:
    """The live initrd's members: the root image, init, ``busybox``, the modules in load
    order (from ``tree``, the root)."""
    (release,) = [p for p in (tree / "usr/lib/modules").iterdir() if p.is_dir()]
    builtin = _builtin(release)
    needed = tuple(m for m in INIT_MODULES if m not in builtin)
    order = module_load_order((release / "modules.dep").read_text(), needed)
    # The root image first: upgrades tell the layout from the first member's name
    # (hatchery.upgrade.archive) and read nothing else of this initrd as the root.
    entries = [Entry.file(ROOT_IMAGE, image, 0o400)]
    entries += [Entry.directory(d) for d in ("bin", "dev", "proc", "sys", "run", "sysroot", "lib",
                                             "lib/modules")]  # fmt: skip
    entries += [Entry.file("init", INIT.encode(), 0o755),
                Entry.file("bin/busybox", busybox, 0o755)]  # fmt: skip
    names = [Path(path).name.split(".ko")[0] + ".ko" for path in order]
    entries += [Entry.file(f"lib/modules/{name}", plain_module(release / path))
                for name, path in zip(names, order, strict=True)]  # fmt: skip
    entries.append(Entry.file("lib/modules/load-order", "".join(f"{n}\n" for n in names).encode()))
    return entries


def drop_kernel_copies(tree: Path) -> list[Path]:
    """Remove ``KERNEL_COPIES`` from an unpacked root; the paths removed."""
    found = sorted(p for pattern in KERNEL_COPIES for p in tree.glob(pattern))
    for path in found:
        path.unlink()
    return found


def write_index(tree: Path) -> Path:
    """Write the root's index (``hatchery.upgrade.rootindex``) into it: upgrades then compare
    roots without hashing them."""
    index = tree / INDEX_PATH
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_bytes(index_tree(tree))
    index.chmod(0o644)
    return index


def repack(mkosi_cpio: Path, initrd: Path, epoch: int, say: Callable[[str], None]) -> None:
    """Write ``initrd`` (the live-root layout) from mkosi's root cpio; reproducible: the
    squashfs is made with ``-reproducible`` and every time set to ``epoch``, the cpio around
    it has fixed owners and times and a fixed member order (hatchery_lab.cpio_writer)."""
    with tempfile.TemporaryDirectory(dir=initrd.parent, prefix=".liveroot.") as tmp:
        tree = unpack_cpio(mkosi_cpio, Path(tmp) / "root")
        drop_kernel_copies(tree)
        busybox = take_busybox(tree)
        write_index(tree)
        image = Path(tmp) / ROOT_IMAGE
        argv = ["mksquashfs", str(tree), str(image), *SQUASHFS_ARGS, "-noappend", "-no-xattrs",
                "-reproducible", "-mkfs-time", str(epoch), "-all-time", str(epoch),
                "-no-progress", "-quiet"]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise LiveRootError(f"mksquashfs failed: {result.stderr.strip()[-2000:]}")
        say(f"root image {image.stat().st_size / 1e6:.1f} MB (squashfs, zstd)")
        root, *rest = initrd_entries(tree, image.read_bytes(), busybox)
        plain = write_newc([root])
        plain += bytes(-len(plain) % 4)  # the kernel finds the next archive 4-byte aligned
        params = zstandard.ZstdCompressionParameters.from_level(OUTER_LEVEL, threads=0)
        packed = zstandard.ZstdCompressor(compression_params=params).compress(write_newc(rest))
        partial = initrd.with_name(initrd.name + ".part")
        partial.write_bytes(plain + packed)
        os.replace(partial, initrd)
