"""A real guest boots: Debian's stock kernel, our initramfs, the accelerator the helper chose."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hatchery.qemu.accel import choose_accel
from hatchery.qemu.cmdline import DirectKernel, GuestSpec, build_argv
from hatchery_lab.guest import INIT_PRELUDE, busybox_initramfs, find_guest_kernel, run_guest
from tests.conftest import missing

MARKER = "HATCHERY-GUEST-UP"


@pytest.fixture
def guest_kernel(require_tool: Callable[[str], str]):
    require_tool("qemu-system-x86_64")
    kernel = find_guest_kernel()
    if kernel is None:
        missing("no guest kernel in .cache (make guest-kernel)")
    return kernel


@pytest.mark.parametrize("form", ["vmlinux", "vmlinuz"])
def test_direct_kernel_boot_reaches_init(guest_kernel, tmp_path: Path, form: str) -> None:
    init = INIT_PRELUDE + f'echo "{MARKER} release=$(uname -r) END"\npoweroff -f\n'
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(init))
    kernel = guest_kernel.vmlinux() if form == "vmlinux" else guest_kernel.vmlinuz
    spec = GuestSpec(
        name=f"test-{form}",
        accel=choose_accel(),
        boot=DirectKernel(kernel, initrd, "console=ttyS0 panic=-1 quiet"),
        extra=("-no-reboot",),
    )
    with run_guest(build_argv(spec)) as guest:
        guest.wait_for(f"{MARKER} release={guest_kernel.vmlinuz.parent.name} END".encode(), 120)
        assert guest.process.wait(timeout=60) == 0
