"""Choose the QEMU accelerator: KVM wherever a guest really boots with it, TCG otherwise.

``/dev/kvm`` opening is not enough. Inside some clouds the kernel offers a paravirtual
nested KVM (PVM, module ``kvm_pvm``) that stock Debian kernels cannot boot under (``-cpu
host`` aborts on MSR 0x10a, other CPU models hang), so "auto" rules it out. An operator can
force a choice in the agent's config or with ``HATCHERY_ACCEL=kvm|tcg``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from hatchery.errors import ConfigError

ENV_VAR = "HATCHERY_ACCEL"

#: TCG's translation block cache per guest, MiB: plenty for one guest (the default grows to
#: 1 GiB); counted in its QEMU's memory limit (``vms.limits``)
TCG_CODE_CACHE_MIB = 256


class Accel(StrEnum):
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True, slots=True)
class AccelChoice:
    accel: Accel
    reason: str

    @property
    def cpu_model(self) -> str:
        """``host`` passes the real CPU through under KVM; ``max`` is TCG's fullest model."""
        return "host" if self.accel is Accel.KVM else "max"

    def kernel_args(self, vcpus: int) -> tuple[str, ...]:
        """Words added to a directly booted kernel's command line for this accelerator.

        Under TCG a Linux guest spends boot time measuring timers that QEMU emulates exactly
        (KVM guests skip both: the kernel's KVM guest setup sets ``no_timer_check``, and the
        in-kernel APIC has a TSC-deadline timer that needs no calibration). Measured on the
        appliance (docs/appliance.md):

        - ``no_timer_check``: the IO-APIC timer's delivery test waits several ticks (40 ms);
        - ``noapictimer``, one vCPU only: the local APIC timer's calibration against the PIT
          (0.10 s) is skipped and the HPET is the tick. With more vCPUs the calibration
          stays: a broadcast tick would cost each of them on every interrupt. Both machine
          types the agent runs (q35, pc) have an HPET; microvm has none, and a guest there
          would have no tick at all.
        """
        if self.accel is not Accel.TCG:
            return ()
        return ("no_timer_check", "noapictimer") if vcpus == 1 else ("no_timer_check",)

    @property
    def code_cache_mib(self) -> int:
        """The translation cache QEMU may fill beside the guest's RAM (0 under KVM)."""
        return TCG_CODE_CACHE_MIB if self.accel is Accel.TCG else 0

    def qemu_args(self) -> list[str]:
        args = ["-accel", self.accel.value, "-cpu", self.cpu_model]
        if self.accel is Accel.TCG:
            args[1] = f"tcg,tb-size={TCG_CODE_CACHE_MIB}"
        return args


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What the choice depends on, gathered apart so the rule is a pure function."""

    kvm_device_usable: bool
    paravirtual_nested_kvm: bool


def read_host_facts(
    dev_kvm: Path = Path("/dev/kvm"), sys_module: Path = Path("/sys/module")
) -> HostFacts:
    try:
        fd = os.open(dev_kvm, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        usable = False
    else:
        os.close(fd)
        usable = True
    return HostFacts(
        kvm_device_usable=usable,
        paravirtual_nested_kvm=(sys_module / "kvm_pvm").exists(),
    )


def decide(setting: str, facts: HostFacts) -> AccelChoice:
    """The rule: an explicit setting wins; ``auto`` takes KVM only where guests boot with it."""
    setting = setting.strip().lower()
    if setting == Accel.TCG:
        return AccelChoice(Accel.TCG, "tcg requested")
    if setting == Accel.KVM:
        if not facts.kvm_device_usable:
            raise ConfigError(
                "kvm requested but /dev/kvm cannot be opened",
                hint="load the kvm module and check permissions, or set accel to auto",
            )
        return AccelChoice(Accel.KVM, "kvm requested")
    if setting != "auto":
        raise ConfigError(f"accel must be auto, kvm or tcg, not {setting!r}")
    if not facts.kvm_device_usable:
        return AccelChoice(Accel.TCG, "/dev/kvm cannot be opened")
    if facts.paravirtual_nested_kvm:
        return AccelChoice(
            Accel.TCG,
            "/dev/kvm is a paravirtual nested KVM (kvm_pvm) that stock kernels cannot boot under",
        )
    return AccelChoice(Accel.KVM, "/dev/kvm is usable")


def choose_accel(setting: str | None = None) -> AccelChoice:
    """The accelerator for this host: ``setting`` or ``$HATCHERY_ACCEL`` or ``auto``."""
    chosen = setting or os.environ.get(ENV_VAR) or "auto"
    return decide(chosen, read_host_facts())
