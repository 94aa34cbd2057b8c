"""Direct kernel boot: the uncompressed vmlinux ELF (PVH entry) against Debian's bzImage.

Same kernel, same initramfs, same machine and accelerator; time from QEMU start to a marker
printed by /init. Median of 5 each, interleaved so machine noise hits both alike.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.report import median, table, write_section
from hatchery.qemu.accel import choose_accel
from hatchery.qemu.cmdline import DirectKernel, GuestSpec, build_argv
from hatchery_lab.guest import INIT_PRELUDE, busybox_initramfs, find_guest_kernel, run_guest

RUNS = 5
MARKER = b"BENCH-INIT-REACHED"


def _boot_seconds(kernel: Path, initrd: Path, machine: str) -> float:
    spec = GuestSpec(
        name="bench",
        accel=choose_accel(),
        machine=machine,
        boot=DirectKernel(kernel, initrd, "console=ttyS0 panic=-1 quiet"),
        extra=("-no-reboot",),
    )
    with run_guest(build_argv(spec)) as guest:
        return guest.wait_for(MARKER, timeout=180)


def run() -> None:
    kernel = find_guest_kernel()
    if kernel is None:
        raise SystemExit("no guest kernel: run make guest-kernel")
    accel = choose_accel()
    with tempfile.TemporaryDirectory() as tmp:
        initrd = Path(tmp) / "initrd"
        initrd.write_bytes(busybox_initramfs(INIT_PRELUDE + f"echo {MARKER.decode()}\n"))
        cases = {
            "vmlinux (ELF, PVH), q35": (kernel.vmlinux(), "q35"),
            "vmlinuz (bzImage), q35": (kernel.vmlinuz, "q35"),
            "vmlinuz (bzImage), pc": (kernel.vmlinuz, "pc"),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(RUNS):
            for name, (path, machine) in cases.items():
                times[name].append(_boot_seconds(path, initrd, machine))
    base = median(times["vmlinuz (bzImage), pc"])
    rows = [
        (name, f"{median(t):.2f}", f"{min(t):.2f}", f"{max(t):.2f}", f"{base / median(t):.2f}x")
        for name, t in times.items()
    ]
    body = (
        f"Kernel {kernel.vmlinuz.parent.name}, busybox initramfs, accelerator {accel.accel} "
        f"({accel.reason}). Seconds from QEMU start to /init's marker, {RUNS} runs each.\n\n"
        + table(
            ["kernel, machine", "median s", "min s", "max s", "speed-up vs bzImage on pc"], rows
        )
    )
    write_section("kernel-boot", "Direct kernel boot: vmlinux vs bzImage", body)
    print(body)
