"""Tiny real guests for tests: Debian's stock kernel plus a busybox initramfs of our making."""

from __future__ import annotations

import contextlib
import lzma
import os
import re
import select
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hatchery.qemu.kernel import write_vmlinux
from hatchery_lab import REPO
from hatchery_lab.cpio_writer import Entry, write_newc

KERNEL_DIR = REPO / ".cache" / "guest-kernel" / "current"
ARM64_DIR = REPO / ".cache" / "arm64-guest" / "current"
BUSYBOX = Path("/bin/busybox")

# Debian builds virtio-net as modules; they must be loaded in this order (MACHINE-NOTES).
VIRTIO_NET_MODULES = (
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "drivers/net/virtio_net",
)


@dataclass(frozen=True, slots=True)
class GuestKernel:
    vmlinuz: Path
    modules: Path

    def vmlinux(self) -> Path:
        """The uncompressed ELF beside the bzImage, made once and kept."""
        out = self.vmlinuz.with_name("vmlinux")
        if not out.exists():
            write_vmlinux(self.vmlinuz, out)
        return out

    def module(self, rel: str) -> Path:
        base = self.modules / "kernel" / rel
        for suffix in (".ko", ".ko.xz", ".ko.zst"):
            candidate = base.with_name(base.name + suffix)
            if candidate.exists():
                return candidate
        raise FileNotFoundError(f"module {rel} not in {self.modules}")


@dataclass(frozen=True, slots=True)
class Arm64Guest:
    """What tools/fetch-arm64-guest.sh unpacks: Debian's arm64 kernel (the bare ``Image``, an
    EFI executable), a static arm64 busybox and systemd's arm64 EFI stub."""

    image: Path
    busybox: Path
    stub: Path


def find_arm64_guest() -> Arm64Guest | None:
    """The arm64 guest in .cache (``make arm64-guest``), or None."""
    found = Arm64Guest(*(ARM64_DIR / n for n in ("Image", "busybox", "linuxaa64.efi.stub")))
    if not all(p.exists() for p in (found.image, found.busybox, found.stub)):
        return None
    return Arm64Guest(found.image.resolve(), found.busybox.resolve(), found.stub.resolve())


def find_guest_kernel() -> GuestKernel | None:
    vmlinuz = KERNEL_DIR / "vmlinuz"
    if not vmlinuz.exists():
        return None
    return GuestKernel(vmlinuz.resolve(), (KERNEL_DIR / "modules").resolve())


def busybox_initramfs(
    init: str, *, modules: Sequence[Path] = (), files: Sequence[Entry] = (),
    busybox: Path = BUSYBOX,
) -> bytes:  # fmt: skip
    """A newc archive: static busybox, ``init`` as ``/init``, modules as ``/lib/mods/NN-*.ko``.
    ``busybox``: the binary to put in (the host's by default; an arm64 one for arm64 guests)."""
    entries = [
        Entry.directory("bin"),
        Entry.directory("dev"),
        Entry.char_device("dev/console", 5, 1),
        Entry.directory("proc"),
        Entry.directory("sys"),
        Entry.directory("tmp", 0o1777),
        Entry.directory("etc"),
        Entry.directory("lib"),
        Entry.directory("lib/mods"),
        Entry.file("bin/busybox", busybox.read_bytes(), 0o755),
        Entry.symlink("bin/sh", "busybox"),
        Entry.file("init", init.encode(), 0o755),
    ]
    for index, module in enumerate(modules):
        data = module.read_bytes()
        if module.suffix == ".xz":
            data = lzma.decompress(data)
        name = module.name.split(".ko")[0]
        entries.append(Entry.file(f"lib/mods/{index:02d}-{name}.ko", data))
    entries.extend(files)
    return write_newc(entries)


INIT_PRELUDE = """#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in /lib/mods/*.ko; do [ -e "$m" ] && insmod "$m"; done
"""


@dataclass
class RunningGuest:
    process: subprocess.Popen[bytes]
    started: float
    output: bytearray

    def wait_for(self, marker: bytes | re.Pattern[bytes], timeout: float) -> float:
        """Read the serial console until ``marker`` (bytes, or a pattern to search for);
        return seconds since QEMU started."""
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()

        def seen() -> bool:
            if isinstance(marker, bytes):
                return marker in self.output
            return marker.search(self.output) is not None

        while not seen():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"no {marker!r} within {timeout}s; console tail:\n"
                    + self.output[-3000:].decode(errors="replace")
                )
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(
                        f"QEMU exited ({self.process.wait()}) before {marker!r}:\n"
                        + self.output[-3000:].decode(errors="replace")
                    )
                self.output += chunk
        return time.monotonic() - self.started


@contextlib.contextmanager
def run_guest(argv: list[str]) -> Iterator[RunningGuest]:
    """Start QEMU with the serial console on stdout; always kill it (by PID) afterwards."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield RunningGuest(proc, started, bytearray())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
