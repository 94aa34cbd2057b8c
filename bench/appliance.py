"""Appliance VM boot: our kernel (tinyconfig, everything built in) against Debian's stock one
and a SmallStack-style baseline, QEMU start → DHCP lease, interleaved, side by side.

Variants, all with the appliance image's initrd and the same dnsmasq on a private bridge:

* **ours**: ``appliance-vm.vmlinux`` (images/appliance-vm/kernel.config, PVH entry), ``q35``,
  ``-nodefaults``: what the agent runs;
* **stock vmlinux**: Debian's kernel as a PVH ELF, same machine: what the appliance ran before;
* **baseline**: the stock bzImage, ``pc``, QEMU's default devices (the SmallStack paper's way);
* **microvm**: our kernel on QEMU's ``microvm`` machine (virtio-mmio), to decide between it and
  q35 by the numbers.

Also QEMU's resident memory a second after the lease (``VmRSS`` of the QEMU process).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from bench.proc import rss_mib
from bench.report import median, table, write_section
from hatchery.qemu.accel import choose_accel
from hatchery_lab.guest import run_guest
from hatchery_lab.images import (
    APPLIANCE_MAC,
    LEASE_MARKER,
    ApplianceLan,
    appliance_argv,
    appliance_lan,
    build_images,
)

RUNS = int(os.environ.get("BENCH_APPLIANCE_RUNS", "20"))
UPTIME = re.compile(rb"HATCHERY-APPLIANCE: (init|lease) .*?uptime=([0-9.]+)")
LEASE_LINE = re.compile(rb"HATCHERY-APPLIANCE: lease .*?uptime=[0-9.]+\r?\n")


def _microvm_argv(images: Path, lan: ApplianceLan) -> list[str]:
    """Our kernel on ``microvm`` (ACPI for the power button, virtio-mmio for the NIC). QEMU's
    defaults stay: with ``-nodefaults`` microvm's serial console stays silent."""
    image = images / "appliance-vm"
    accel = choose_accel()
    return lan.wrap(
        ["qemu-system-x86_64", "-M", "microvm,acpi=on", *accel.qemu_args(), "-m", "256",
         "-smp", "1", "-no-user-config", "-display", "none", "-serial", "stdio",
         "-kernel", str(image / "appliance-vm.vmlinux"),
         "-append", "console=ttyS0 quiet panic=-1",  # no noapictimer: microvm has no HPET
         "-initrd", str(image / "appliance-vm.cpio.lz4"),
         "-netdev", f"tap,id=net0,ifname={lan.tap},script=no,downscript=no",
         "-device", f"virtio-net-device,netdev=net0,mac={APPLIANCE_MAC}", "-no-reboot"]
    )  # fmt: skip


def _argv(variant: str, images: Path, lan: ApplianceLan) -> list[str]:
    if variant == "ours":
        return appliance_argv(images, lan)
    if variant == "stock vmlinux":
        return appliance_argv(images, lan, kernel="stock-vmlinux")
    if variant == "baseline":
        return appliance_argv(images, lan, kernel="vmlinuz", machine="pc", default_devices=True)
    return _microvm_argv(images, lan)


def _boot(
    images: Path, lan_factory: Callable[[Path], AbstractContextManager[ApplianceLan]], variant: str
) -> dict[str, float]:
    """Seconds from QEMU start to the lease (None-free: a boot that fails raises), the guest's
    uptime at /init and at the lease, QEMU's RSS once ready."""
    with tempfile.TemporaryDirectory() as tmp, lan_factory(Path(tmp)) as lan:
        with run_guest(_argv(variant, images, lan)) as guest:
            # 30 s: the slowest variant (baseline) leases in about 5; a hang is a failed boot
            lease = guest.wait_for(LEASE_MARKER, 30)
            # The guest's own uptime stamp on the lease line, and QEMU's RSS a second later
            # (the metadata step that follows waits ~20 s for a service this LAN lacks).
            guest.wait_for(LEASE_LINE, 10)
            time.sleep(1)
            result = {"lease": lease, "rss": rss_mib(guest.process.pid)}
            for step, uptime in UPTIME.findall(bytes(guest.output)):
                result[f"uptime_{step.decode()}"] = float(uptime)
    return result


def run() -> None:
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    images = build_images("appliance-vm")  # no-op when up to date; the hypervisor is not needed
    load_before = os.getloadavg()

    def lan_factory(tmp: Path) -> AbstractContextManager[ApplianceLan]:
        return appliance_lan(dnsmasq, tmp)

    variants = ("ours", "stock vmlinux", "baseline", "microvm")
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    failed: dict[str, int] = {v: 0 for v in variants}
    for index in range(RUNS):
        # Rotated each round: a boot's position after the one before it moved its time by
        # up to 0.1 s on this shared machine; rotating spreads that over every variant.
        for variant in variants[index % len(variants) :] + variants[: index % len(variants)]:
            try:
                runs[variant].append(_boot(images, lan_factory, variant))
            except (TimeoutError, RuntimeError) as exc:
                failed[variant] += 1
                print(f"{variant}: boot {index + 1} failed: {str(exc)[:200]}", flush=True)
        print(f"run {index + 1}/{RUNS}: "
              + ", ".join(f"{v} {runs[v][-1]['lease']:.2f}" for v in variants if runs[v]),
              flush=True)  # fmt: skip
    load_after = os.getloadavg()

    def med(variant: str, key: str) -> float:
        values = [r[key] for r in runs[variant] if key in r]
        return median(values) if values else float("nan")

    base = med("baseline", "lease")
    rows = [
        (
            v,
            f"{med(v, 'lease'):.2f}",
            f"{min(r['lease'] for r in runs[v]):.2f} / {max(r['lease'] for r in runs[v]):.2f}"
            if runs[v]
            else "-",
            f"{med(v, 'uptime_init'):.2f}",
            f"{med(v, 'uptime_lease'):.2f}",
            f"{base / med(v, 'lease'):.2f}x",
            f"{med(v, 'rss'):.0f}",
            f"{failed[v]} of {RUNS}",
        )
        for v in variants
    ]
    body = (
        f"Accelerator {choose_accel().accel}; QEMU start → the appliance's DHCP lease "
        f"(host clock), median of {RUNS} interleaved runs (order rotated each round); load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after. Ours: "
        "`appliance-vm.vmlinux`, built by `make images` from Debian's kernel source with "
        "`tinyconfig` plus images/appliance-vm/kernel.config (no modules). Stock: Debian's "
        "kernel (the same version) as a PVH ELF. Baseline (SmallStack-style): the stock "
        "bzImage, `pc`, QEMU's default devices. Same initrd and dnsmasq for all.\n\n"
        + table(
            [
                "variant",
                "lease s",
                "min / max",
                "uptime at /init",
                "uptime at lease",
                "vs baseline",
                "QEMU RSS MiB",
                "failed",
            ],
            rows,
        )  # fmt: skip
        + "\n\nGoals (issue 20): ≥ 6x the baseline and ≤ 0.8 s; QEMU RSS ≤ 64 MiB."
    )
    write_section("appliance", "Appliance VM boot: our kernel vs stock vs baseline", body)
    print(body)
